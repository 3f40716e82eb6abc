"""One console policy for every command: nothing a user copies out of the output is ever cut.

Off a terminal (a CI log, a pipe, ``| cat``) rich assumes 80 columns, and at 80 columns
it folds text and squeezes tables: the fingerprint digest lost 7 of its 64 hex digits to
an ellipsis, record paths broke mid-name, a layer column shrank to ``l…``.  Here:

* text is never wrapped or cropped by bnaudit (``soft_wrap``): a long line is emitted
  whole and the terminal, if any, wraps it; a digest or a path stays one token;
* a table is laid out at the larger of the console's width and its own natural width,
  and never cropped: it keeps its shape, and what does not fit an 80-column terminal
  wraps there as plain lines do, every cell whole.

On a terminal a person reads the output at the width they have (80 columns is the
design width): prose wraps there at word boundaries, and a table whose words fit is
laid out at that width, its cells wrapping at spaces (a word longer than its column
folds onto the next line: wrapped, never cut).  Only a table whose longest words do
not fit keeps its natural width, as off a terminal.

Every view of ``bnaudit.report`` prints through a ``Console`` made here.
"""

from __future__ import annotations

from typing import Any

import rich.console
from rich.measure import Measurement
from rich.table import Column
from rich.text import Text

_UNBOUNDED = 100_000


class Console(rich.console.Console):
    """A rich console whose ``print`` never cuts (see the module's policy)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if self.is_terminal:
            kwargs.setdefault("overflow", "fold")
            words = max((self._natural_width(o, minimum=True) for o in objects if not isinstance(o, str)), default=0)
            if words <= self.width:
                for o in objects:
                    _fold_columns(o)
                super().print(*objects, **kwargs)
                return
        kwargs.setdefault("soft_wrap", True)
        natural = max((self._natural_width(o) for o in objects if not isinstance(o, str)), default=0)
        if natural <= self.width:
            super().print(*objects, **kwargs)
            return
        saved = self._width  # rich caps print(width=...) at the console's width: widen the console itself
        self.width = natural
        try:
            super().print(*objects, crop=False, **{k: v for k, v in kwargs.items() if k != "crop"})
        finally:
            self._width = saved

    def _natural_width(self, renderable: Any, *, minimum: bool = False) -> int:
        """The width a table takes laid out whole (``minimum``: the width of its longest words)."""
        if not hasattr(renderable, "__rich_console__") and not hasattr(renderable, "__rich__"):
            return 0
        if isinstance(renderable, Text):  # text is soft-wrapped, not laid out
            return 0
        m = Measurement.get(self, self.options.update(width=_UNBOUNDED), renderable)
        return m.minimum if minimum else m.maximum


def _fold_columns(renderable: Any) -> None:
    """A table squeezed to the terminal folds a word too long for its column instead of ending it in an ellipsis."""
    for column in getattr(renderable, "columns", ()):
        if isinstance(column, Column):
            column.overflow = "fold"


def stdout() -> Console:
    """The console of a command's output."""
    return Console()


def stderr() -> Console:
    """The console of progress bars and notes (stderr)."""
    return Console(stderr=True)
