"""The wheel: what it carries, and that it runs from any folder for a user who cannot write to it.

The installed test is the real thing a user does: build the wheel, make a fresh virtual
environment, ``pip install`` the wheel into it with the pinned dependencies (torch comes
from the CPU wheel on disk), then run ``bnaudit run`` and ``bnaudit reference verify``
from a folder outside the checkout.  Where the tests run as root, the environment belongs
to an unprivileged user (``nobody``) and its bnaudit package to root, read-only, so a
write into the installation fails as it would on a shared machine; that needs a Python
the user can run, which this module looks for and names in the test's output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bnaudit"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_listed_packages_are_the_package_folders() -> None:
    """pyproject lists packages by hand (one is mapped from reference/): a new folder must be listed."""
    setuptools = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")
               if "__pycache__" not in p.parts}
    assert listed - {"bnaudit.shipped"} == folders
    assert setuptools["package-dir"] == {"bnaudit.shipped": "reference"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("bnaudit-*.whl")
    return path


def _sources() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_the_wheel_carries_every_module_and_the_shipped_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = _sources() - names
        assert not missing, f"not in the wheel: {sorted(missing)}"
        shipped = [p for p in (ROOT / "reference").rglob("*") if p.is_file() and ".lock" not in p.name
                   and not p.name.startswith(".")]
        assert any(p.suffix == ".npy" for p in shipped)
        for path in shipped:  # byte for byte what the checkout holds
            name = "bnaudit/shipped/" + path.relative_to(ROOT / "reference").as_posix()
            assert zf.read(name) == path.read_bytes(), name
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = zf.read(meta).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    from bnaudit import __version__

    assert f"\nVersion: {__version__}\n" in metadata
    assert "\nLicense-Expression: MIT\n" in metadata
    assert "Classifier: Typing :: Typed" in metadata


# --------------------------------------------------------------------------- installed


def _as_user(uid: int | None) -> dict:
    return {} if uid is None else {"user": uid, "group": _group_of(uid), "extra_groups": []}


def _group_of(uid: int) -> int:
    import pwd

    return pwd.getpwuid(uid).pw_gid


def _has_uid(uid: int) -> bool:
    import pwd

    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _interpreter_for(uid: int | None) -> str | None:
    """A Python >= 3.11 with venv that ``uid`` can run whole (its own standard library found)."""
    probe = ("import sys, ensurepip, venv; "
             "print(sys.version_info >= (3, 11) and sys.prefix == sys.base_prefix and sys.prefix)")
    candidates = [sys.executable, sys._base_executable]
    candidates += [shutil.which(f"python3.{minor}", path="/usr/local/bin:/usr/bin:/bin") or "" for minor in
                   (sys.version_info.minor, 12, 13, 11)]
    for python in dict.fromkeys(c for c in candidates if c):
        try:
            done = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, timeout=60,
                                  **_as_user(uid))
        except (OSError, subprocess.SubprocessError):
            continue
        prefix = done.stdout.strip()
        if done.returncode == 0 and prefix not in ("", "False") and Path(prefix, "lib").is_dir():
            return python
    return None


def _tree(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its sha256: the installation, to show nothing was written there."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


class Installed:
    """A fresh virtual environment with the wheel installed, and a way to run bnaudit in it."""

    def __init__(self, home: Path, uid: int | None) -> None:
        self.home, self.uid = home, uid
        self.venv = home / "venv"
        self.work = home / "work"

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
        # HOME: the user's own (nobody's is /nonexistent); the XDG cache goes there.
        return {**keep, "HOME": str(self.home), "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "MPLCONFIGDIR": str(self.home / "mpl"), "PATH": f"{self.venv / 'bin'}:{keep.get('PATH', '')}"}

    def __call__(self, *args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=cwd or self.work, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, **_as_user(self.uid))

    def site_package(self) -> Path:
        (found,) = self.venv.glob("lib/python3.*/site-packages/bnaudit")
        return found


@pytest.fixture(scope="module")
def installed(wheel: Path) -> Iterator[Installed]:
    uid = 65534 if os.geteuid() == 0 and _has_uid(65534) else None
    python = _interpreter_for(uid)
    if python is None and uid is not None:
        warnings.warn("no Python that an unprivileged user can run was found: the installed wheel is tested as "
                      "root (the installation snapshot still shows nothing is written there)", stacklevel=1)
        uid, python = None, _interpreter_for(None)
    assert python is not None, "no Python >= 3.11 with venv to install the wheel with"
    home = Path(tempfile.mkdtemp(prefix="bnaudit-wheel-"))
    try:
        home.chmod(0o755)
        own = shutil.copy(wheel, home / wheel.name)
        constraints = shutil.copy(ROOT / "constraints.txt", home / "constraints.txt")
        for path in (home, Path(own), Path(constraints)):
            if uid is not None:
                os.chown(path, uid, _group_of(uid))
        box = Installed(home, uid)
        done = box("mkdir", str(box.work), cwd=home)
        assert done.returncode == 0, done.stderr
        done = box(python, "-m", "venv", str(box.venv), cwd=home)
        assert done.returncode == 0, done.stderr
        # --no-compile: byte-compiling torch's sources would be more than half of the install's time.
        done = box(str(box.venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "-c",
                   str(constraints), str(own), cwd=home)
        assert done.returncode == 0, done.stderr[-3000:]
        package = box.site_package()
        if uid is not None:  # the installation belongs to root and is read-only, as on a shared machine
            for path in [package, *package.rglob("*")]:
                os.chown(path, 0, 0, follow_symlinks=False)
                path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        print(f"installed with {python} as {f'uid {uid}' if uid is not None else 'root'}")
        yield box
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(home)], check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_the_installed_wheel_runs_outside_the_checkout(installed: Installed, make_run) -> None:
    package = installed.site_package()
    before = _tree(package)
    assert not installed.work.resolve().is_relative_to(ROOT)
    which = installed("python", "-c", "import bnaudit, sys; print(bnaudit.__file__); print(sys.prefix)")
    assert which.stdout.splitlines() == [str(package / "__init__.py"), str(installed.venv)]

    run = installed("bnaudit", "run", "--epochs", "2", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    record = installed.work / summary["out"]
    assert record.is_relative_to(installed.work / "reports" / "runs") and (record / "fingerprint.json").is_file()
    # the same bits as a run of the checkout: the wheel carries the same frozen inputs and code
    checkout = json.loads((make_run(2) / "fingerprint.json").read_text())
    assert summary["digest"] == checkout["digest"]

    verify = installed("bnaudit", "reference", "verify", "--random-rows", "0")
    assert verify.returncode == 0, verify.stderr
    assert f"reference {package / 'shipped' / 'mpmath'}" in verify.stdout and "match bit for bit" in verify.stdout

    # a rebuild of the shipped data is refused with one line, not written into the installation
    frozen = installed("bnaudit", "frozen", "build")
    assert frozen.returncode == 5 and frozen.stdout == ""
    assert frozen.stderr.count("\n") == 1 and "inside the installed bnaudit package" in frozen.stderr
    assert _tree(package) == before
