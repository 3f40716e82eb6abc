"""Untrusted text made safe for each output: the terminal, Markdown, HTML, JUnit XML and figures.

Paths, folder names, run labels, spec names, a record's environment values, layer and
tensor names read from a file, error messages: any of them may hold text that an output
would interpret (rich markup such as ``[/tmp]``, Markdown emphasis, HTML tags) or control
characters that reach a terminal raw (``\\x1b[31m``) or make XML invalid.  Every format
passes such text through one function of this module, the one for where it lands; text
the formats write themselves (headings, rich styles, ``<br>``) does not go through it.

Every function leaves ordinary text (printable, no syntax of its target) as it is (``html``
as ``html.escape`` always wrote it), so the outputs for plain paths and names do not
change.  Non-printable characters (C0 and C1 controls, line and paragraph separators,
format characters, surrogates) become the visible escape Python writes for them
(``\\x1b``, ``\\n``, ``\\u202e``), so that a value stays on one line and shows what it holds.
A typed backslash is kept: the text ``\\x1b`` and an escaped ESC look alike, but neither
ever reaches a terminal as a control sequence.
"""

from __future__ import annotations

import html as _html
import re

from rich.text import Text

__all__ = ["figure_text", "html", "markdown", "markdown_code", "printable", "terminal", "xml"]

_MD_SPECIAL = frozenset("\\`*<~$&")
"""Characters that can start Markdown (GitHub-flavoured, with its math) syntax anywhere in a line."""
_MD_BLOCK_START = re.compile(r"(#{1,6}|[-+]|\d{1,9}[.)])(?= |$)|-(?=-)|[\[>]")
"""What makes the start of a line a heading, a list item, a thematic break, a quote or a link definition."""


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """``str(text)`` with every non-printable character replaced by its visible escape (``\\x1b``, ``\\n``).

    ``keep_newlines``: a text block whose line breaks are the caller's keeps them.
    """
    s = str(text)
    if s.isprintable():
        return s
    if keep_newlines:
        return "\n".join(printable(line) for line in s.split("\n"))
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in s)


def terminal(text: object, style: str = "") -> Text:
    """A rich ``Text`` of ``text``: rich reads neither markup (``[bold]``) nor emoji codes in it.

    Use it for every untrusted value given to rich: a ``str`` cell of a ``Table``, a title
    or ``console.print`` argument is parsed as markup, which misreads ``job[/tmp]/r`` or
    fails on it (a ``Text`` is taken as it is).
    """
    return Text(printable(text), style=style)


def markdown(text: object, *, cell: bool = False, link: bool = False, block_start: bool = False) -> str:
    """``text`` as literal Markdown inline text: nothing in it becomes emphasis, code, a link, HTML or math.

    ``cell``: it sits in a table cell (``|`` is escaped too); ``link``: in a link's or
    image's text (every bracket is escaped); ``block_start``: it opens a line or a list
    item, where ``# ``, ``- ``, ``---``, ``1. ``, ``>`` and ``[x]:`` would start a block.
    ``_`` between two letters or digits (``cpu_model``) cannot emphasise and is left as it
    is, and so is a bracket not followed by ``(`` or ``[`` (``threadpools[libgomp]``), which
    cannot link; ``>`` only quotes at the start of a line.
    """
    s = printable(text)
    out = []
    for i, ch in enumerate(s):
        before = s[i - 1] if i else " "
        after = s[i + 1] if i + 1 < len(s) else " "
        if (ch in _MD_SPECIAL or (cell and ch == "|") or (link and ch in "[]")
                or (ch == "_" and not (before.isalnum() and after.isalnum()))
                or (ch == "]" and after in "([")):
            out.append("\\" + ch)
        else:
            out.append(ch)
    escaped = "".join(out)
    if block_start:
        found = _MD_BLOCK_START.match(escaped)
        if found:
            end = found.end()
            escaped = escaped[:end - 1] + "\\" + escaped[end - 1:]
    return escaped


def markdown_code(text: object, *, cell: bool = False) -> str:
    """``text`` as a Markdown code span, backticks and surrounding spaces included (``cell``: in a table)."""
    s = printable(text)
    if cell:
        s = s.replace("|", "\\|")  # GitHub splits table cells at | even inside code spans
    fence = "`" * (max((len(run) for run in re.findall("`+", s)), default=0) + 1)
    # A code span drops one space at each end when both ends have one, and a backtick at an
    # end would merge with the fence: pad so that the span shows exactly ``s``.
    pad = " " if (not s or s[0] == "`" or s[-1] == "`" or (s[0] == s[-1] == " " and s.strip(" "))) else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def html(text: object) -> str:
    """``text`` as HTML text or a quoted attribute value: ``& < > " '`` as entities, controls visible."""
    return _html.escape(printable(text), quote=True)


def xml(text: object, *, multiline: bool = False) -> str:
    """``text`` for an XML 1.0 document, before ElementTree escapes ``& < > "``.

    Every character XML 1.0 forbids (``\\x00``-``\\x08``, ``\\x0b``, ``\\x0c``, ``\\x0e``-``\\x1f``,
    surrogates, ``\\ufffe``, ``\\uffff``) is non-printable and so becomes its visible escape,
    as do the other controls; ``multiline`` keeps the line breaks of a text block.
    """
    return printable(text, keep_newlines=multiline)


def figure_text(text: object) -> str:
    """``text`` for a matplotlib title, label or legend entry (its line breaks kept).

    Two ``$`` would start mathtext, and a name that is no formula fails the whole figure;
    ``\\$`` is matplotlib's literal dollar.  Controls are made visible (matplotlib would
    warn about each missing glyph, the raw character in the warning).
    """
    return printable(text, keep_newlines=True).replace("$", r"\$")

