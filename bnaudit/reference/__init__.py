"""The mpmath high-precision reference: engine, build, stored trajectory.

``engine`` computes the experiment in mpmath (no torch); ``build`` runs it at two
precisions (the second one in ``check_process`` with ``--jobs 2``) and writes the
stored reference; ``store`` reads it with numpy only, so that comparison and
reporting never need mpmath.
"""
