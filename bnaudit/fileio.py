"""File utilities every stage uses: atomic writes, bounded strict reads, hashed arrays.

A leaf module (stdlib, numpy, ``bnaudit.errors`` and ``bnaudit.interrupts`` only), so
that no stage imports a downstream stage for a helper.  Two rules hold for everything
here:

* a write is atomic: it goes to a temporary name beside its target and is renamed into
  place when complete, so an interruption leaves the old content or the new, never a
  mix and never a half-written file that parses; a process that has been interrupted
  commits nothing, even where a library swallowed the interrupt;
* a read of an untrusted file is bounded and strict: a size limit, one read of the
  bytes (hash and parse the same bytes), no pickle, no NaN in JSON, and one clear
  ``InputError`` line for every way it can be wrong.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bnaudit import interrupts
from bnaudit.errors import InputError, OutputError

MAX_JSON_BYTES = 16 * 1024 * 1024
"""Largest JSON file read (a 1000-epoch fingerprint is about 0.5 MB)."""
MAX_NPY_BYTES = 1024 * 1024 * 1024
"""Largest .npy file read."""


# --------------------------------------------------------------------------- writing

PACKAGE = Path(__file__).resolve().parent
"""bnaudit's own package folder: never written to (in a wheel it holds the shipped data)."""


def refuse_installation(out: Path) -> None:
    """Refuse (exit 5) any output inside bnaudit's package folder.

    An installed bnaudit may be read-only, shared by users, or removed by ``pip
    uninstall``: what it ships (frozen inputs, the reference) is read there and written
    elsewhere.  In a source checkout the shipped data lives in ``reference/``, outside
    the package, so rebuilding it there is allowed.
    """
    try:
        inside = Path(os.path.abspath(out)).resolve().is_relative_to(PACKAGE)
    except (OSError, RuntimeError):  # a symlink loop: not ours to judge here
        return
    if inside:
        raise OutputError(f"{out} is inside the installed bnaudit package, which bnaudit never writes to; "
                          "choose another folder (--out)")


@contextlib.contextmanager
def atomic_folder(out: Path, what: str) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` when the block succeeds.

    The block writes everything into the yielded folder (the file that marks the folder
    complete last).  On success an existing ``out`` is first renamed aside, the new
    folder renamed into place, and the old one removed, so no moment leaves a mix of
    old and new files, and an interruption loses neither.  On any failure the temporary
    folder is removed; an OSError becomes one OutputError line naming ``what``.
    """
    out = Path(out)
    refuse_installation(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        tmp.chmod(0o755)
    except OSError as exc:
        raise OutputError(f"cannot write {what} to {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
        with interrupts.held():  # the renames and the removal are done whole, or not begun
            interrupts.check()  # an interrupt a library swallowed still commits nothing
            old = None
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                out.rename(old / out.name)
            tmp.rename(out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write {what} to {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(out: Path, data: bytes) -> None:
    """Write a file under a temporary name in its folder, then rename it into place."""
    out = Path(out)
    refuse_installation(out)
    if out.is_dir():
        raise OutputError(f"{out} is a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        interrupts.check()
        os.replace(tmp, out)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
        raise


def write_text_atomic(out: Path, text: str) -> None:
    """``write_bytes_atomic`` of UTF-8 text."""
    write_bytes_atomic(out, text.encode("utf-8"))


MARKERS = {
    "record": ("record.json", "bnaudit.record/"),
    "frozen inputs": ("manifest.json", "bnaudit.frozen/"),
    "reference": ("manifest.json", "bnaudit.reference/"),
    "report": ("report.json", "bnaudit.report/"),
    "matrix": ("matrix.json", "bnaudit.matrix/"),
    "bundle": ("bundle.json", "bnaudit.bundle/"),
}
"""Each kind of folder bnaudit writes, by the file that marks it and that file's schema prefix."""


def folder_kind(folder: Path) -> str | None:
    """The kind of bnaudit folder ``folder`` is (a key of MARKERS), or None for anything else."""
    for kind, (marker, schema) in MARKERS.items():
        path = Path(folder) / marker
        if path.is_file() and not path.is_symlink():
            try:
                found = parse_json(read_bounded(path, kind, MAX_JSON_BYTES), str(path), kind).get("schema")
            except InputError:
                continue
            if isinstance(found, str) and found.startswith(schema):
                return kind
    return None


def _leftovers(out: Path) -> list[Path]:
    """Temporary folders and files an interrupted write of ``out`` left beside it."""
    try:
        return [p for p in out.parent.iterdir()
                if p.name.startswith((f".{out.name}.partial-", f".{out.name}.old-"))]
    except OSError:
        return []


def remove_leftovers(out: Path) -> None:
    """Remove what an interrupted write of ``out`` left beside it (call it under the output's lock)."""
    for left in _leftovers(out):
        if left.is_dir() and not left.is_symlink():
            shutil.rmtree(left, ignore_errors=True)
        else:
            left.unlink(missing_ok=True)


def prepare_output(out: Path, *, force: bool, kind: str) -> None:
    """Check that ``out`` may receive a new ``kind`` folder; clean what an interrupted write left.

    Only bnaudit's own folders are ever replaced: an empty folder or a missing one is
    taken; a folder of the same kind is replaced only with ``force``; a folder of
    another kind, or one holding files bnaudit did not write, is refused with or
    without ``force`` (exit 5), so no user's folder is ever deleted.  Call it under the
    output's lock (``OutputLock``): the leftovers it removes are then nobody's.
    """
    out = Path(out)
    refuse_installation(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        found = folder_kind(out)
        if found is None:
            raise OutputError(f"--out {out} holds files that bnaudit did not write; refusing to replace it "
                              "(with or without --force): choose another folder")
        if found != kind:
            raise OutputError(f"--out {out} is a bnaudit {found}, not a {kind}; refusing to replace it "
                              "(with or without --force)")
        if not force:
            raise OutputError(f"--out {out} already holds a {kind}; choose another folder or pass --force")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".bnaudit-probe-", dir=out.parent)).rmdir()  # can we write here?
    except OSError as exc:
        raise OutputError(f"cannot write to {out.parent}: {exc.strerror or exc}") from None
    remove_leftovers(out)


class OutputLock:
    """One bnaudit writer per output at a time: an flock on a lock file (which holds the owner's pid).

    The kernel drops the lock when its owner dies, however it dies, so a stale file is
    simply taken over; a live owner makes the second writer stop with one line.  The
    file is removed on release while still locked, and a new owner checks that the file
    it locked is still the one at the path, so two owners never hold it at once.
    """

    def __init__(self, path: Path, what: str, *, wait: bool = False) -> None:
        self.path, self.what, self.wait = Path(path), what, wait
        self.fd: int | None = None

    @classmethod
    def beside(cls, out: Path, what: str, *, wait: bool = False) -> OutputLock:
        """The lock of an output folder or file: ``.<name>.lock`` in the same folder.

        ``wait``: block until a live owner is done (for caches that several runs may fill
        at once) instead of refusing.
        """
        out = Path(out)
        refuse_installation(out)
        return cls(out.parent / f".{out.name}.lock", what, wait=wait)

    def __enter__(self) -> OutputLock:
        refuse_installation(self.path.parent)
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                raise OutputError(f"cannot write to {self.path.parent}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise OutputError(f"{self.what} is in use by another bnaudit (pid {owner})") from None
            try:  # the previous owner may have removed the file between our open and our lock
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = -1
            if current != os.fstat(fd).st_ino:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.fd = fd
            return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)  # while still locked: the next owner then locks a new file
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- JSON

def dumps(doc: Any) -> str:
    """The file form of a bnaudit JSON document: keys sorted, one-space indent, strict, newline."""
    return json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n"


def canonical_sha256(doc: Mapping[str, Any]) -> str:
    """sha256 of a JSON document's canonical form (keys sorted, compact, ASCII, no NaN).

    Every checksum over a JSON document (a fingerprint's content, a baseline's seal)
    is this function of the document with the checksum fields themselves removed by
    the caller; one definition, so that two checksums cannot cover different bytes.
    """
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def json_number(x: float | int | None) -> float | int | str | None:
    """A number for strict JSON: itself when finite, non-finite floats as the strings "inf", "-inf", "nan".

    The one encoding of a non-finite number in bnaudit's JSON (matrix summaries, check
    results): a string, so that the file stays strict JSON and the value stays readable.
    """
    if x is None or isinstance(x, int):
        return x
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def json_numbers(value: Any) -> Any:
    """A document with every float in it as ``json_number`` writes it (dicts, lists and tuples walked)."""
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, dict):
        return {k: json_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_numbers(v) for v in value]
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard constant {name}")


def read_bounded(path: Path, what: str, max_bytes: int) -> bytes:
    """The bytes of a regular file, at most ``max_bytes`` of them, read once.

    A FIFO, a device (``/dev/zero`` reports size 0 and never ends) or a folder is
    refused before a byte is read: the file is opened without blocking and checked with
    fstat on the open descriptor (no window for a swap in between), and at most
    ``max_bytes + 1`` bytes are ever read, whatever the size the file reports.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a {what} file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"{path}: is a folder, not a {what} file")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: not a regular file (a pipe or a device), refused as a {what}")
        if info.st_size > max_bytes:
            raise InputError(f"{path}: {info.st_size} bytes is larger than any {what} ({max_bytes} bytes)")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if total > max_bytes:
        raise InputError(f"{path}: larger than any {what} ({max_bytes} bytes)")
    return b"".join(chunks)


def parse_json(data: bytes, where: str, what: str) -> dict[str, Any]:
    """A JSON object from untrusted bytes: strict (no NaN), one clear error."""
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{where}: not a valid {what} (not JSON: {str(exc)[:80]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{where}: not a valid {what} (top level is not an object)")
    return raw


def read_json(path: Path, what: str, *, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from an untrusted file: size-limited, strict (no NaN), one clear error."""
    path = Path(path)
    return parse_json(read_bounded(path, what, max_bytes), str(path), what)


# --------------------------------------------------------------------------- arrays

def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of an array (contiguous, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def read_npy(path: Path, sha256: str, *, against: str, max_bytes: int = MAX_NPY_BYTES) -> np.ndarray:
    """A plain .npy array from an untrusted file, refused unless its bytes have this sha256.

    The bytes are hashed and parsed from one read (no window for the file to change in
    between), with pickling off.  ``against`` names where the hash came from.
    """
    blob = read_bounded(Path(path), ".npy array", max_bytes)
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise InputError(f"{path}: sha256 does not match {against} (tampered or corrupt)")
    try:
        return np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a plain .npy array ({str(exc)[:60]})") from None


def b64encode(array: np.ndarray) -> str:
    """An array's raw bytes (C order, its own dtype) as base64 text."""
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def b64decode(text: Any, dtype: str, shape: tuple[int, ...], where: str, field: str) -> np.ndarray:
    """An array of exactly this dtype and shape from untrusted base64 text."""
    if not isinstance(text, str):
        raise InputError(f"{where}: field {field!r} has the wrong type")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise InputError(f"{where}: field {field!r} is not base64") from None
    want = math.prod(shape) * np.dtype(dtype).itemsize
    if len(raw) != want:
        raise InputError(f"{where}: field {field!r} has {len(raw)} bytes, expected {want}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
