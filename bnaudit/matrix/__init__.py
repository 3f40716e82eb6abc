"""`bnaudit matrix`: a grid of controlled runs, and what in it changes the bits.

The pipeline of one matrix, one module per stage:

    options (``cli.lists``) -> ``plan``: Grid (one tuple of values per control) -> Plan (every
    configuration of every experiment variant, with its record folder) -> ``folder``: the matrix
    folder, its lock and what in it is finished -> ``execute``: each configuration in its own
    process through ``launch.run``, ``jobs`` at a time -> ``summary``: the records only, one
    function per analysis (classes of identical fingerprints, a verdict per control, ISA
    agreement, CPU pairs, slowdown of emulation) -> ``results.MatrixSummary``, with its sentences
    from ``findings`` (JSON here; rich tables and Markdown in ``report.matrix_view``).

A matrix folder holds ``matrix.json`` (the plan: which experiment, which grid), ``specs/``
(each variant's spec as TOML), ``runs/`` (one complete record per configuration, named by
``Controls.label()``, under ``runs/<variant>/`` when the matrix has several experiment
variants), ``summary.json`` and ``summary.md``.  Re-running the same command resumes: a
configuration whose folder holds a complete record of the same spec and config is not run
again.  A folder holding a matrix of another experiment or grid is refused (``--force``
starts it over).

The package imports neither torch nor mpmath: runs happen in child processes, and the
summary is numpy-only (``bnaudit.compare``).  This file imports nothing, so that a
submodule (``cli.lists`` reads ``plan``) loads only what it needs.
"""
