"""Output for people.  rich and matplotlib live only here and in ``bnaudit.cli``.

``bnaudit report`` is a pipeline whose imports flow one way:

* ``model``: the ``Report`` dataclasses, what every format presents;
* ``build``: input folders -> verified records -> ``Report``;
* ``tables``: the tables and class colours every format shares;
* ``figures``, ``html``, ``markdown``, ``terminal``: one module per format, each importing
  only ``model``, ``tables`` and ``escape``;
* ``writer``: the report folder, written atomically (figures, report.md, index.html).

The other commands' views each present one result of their stage: ``compare_view``
(``compare``), ``ci_summary`` and ``junit`` (``check``), ``matrix_view`` (``matrix``),
``run_summary`` and ``reference_view`` (``run`` and ``reference``).

``escape`` is the leaf every view uses for untrusted text (paths, labels, names and
values read from records): one function per output, so that nothing in such text is
read as rich markup, Markdown, HTML or mathtext, and its control characters show as
visible escapes (and JUnit stays well-formed XML).
"""
