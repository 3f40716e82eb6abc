"""The check precision's trajectory in a process of its own (``bnaudit reference build --jobs 2``).

Started by ``build.trajectory`` as ``python -m bnaudit.reference.check_process``.
Protocol: one pickled request on stdin, (spec, frozen, precision, start, epochs, rows,
resume); pickled messages on stdout, ("row", row, values as mpf tuples, exact state
text, CPU seconds so far) per stored row, then ("done",) or ("error", one line).
Nothing else is written to stdout.  Values cross the pipe as mpmath's exact
(sign, mantissa, exponent, bitcount) tuples, so the parent sees the same bits as if it
had computed them itself.
"""

from __future__ import annotations

import pickle
import sys
import time
from typing import Any, BinaryIO


def follow(request: tuple[Any, ...], out: BinaryIO) -> None:
    """Run the trajectory of ``request`` and send each stored row to ``out``."""
    from bnaudit.reference import engine
    from bnaudit.reference.build import Trajectory

    spec, frozen, prec, start, epochs, rows, resume = request
    traj = Trajectory(spec, frozen, prec)
    if resume is not None:
        traj.resume(resume, "check")
    for row, values in traj.walk(frozen, start, epochs, rows, resume is not None):
        state = [engine.to_exact(v) for v in traj.net.flat_state()]
        pickle.dump(("row", row, [v._mpf_ for v in values], state, time.process_time()), out)
        out.flush()


def main() -> int:
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # anything else printed must not corrupt the protocol
    try:
        follow(pickle.load(sys.stdin.buffer), out)
        pickle.dump(("done",), out)
    except KeyboardInterrupt:  # the parent is interrupted too and reports it
        return 130
    except BrokenPipeError:  # the parent stopped reading (it failed or was interrupted)
        return 1
    except Exception as exc:  # the parent reports it as one line
        pickle.dump(("error", f"{type(exc).__name__}: {exc}"), out)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
