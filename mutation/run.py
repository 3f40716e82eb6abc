"""Mutation testing of bnaudit, one module at a time against that module's own tests.

Usage (from the repository root, with mutmut installed beside the test extra)::

    python3 -m pip install -c constraints.txt -e '.[test]' mutmut==3.8.1
    nice -n 10 python3 mutation/run.py bits frozen     # some modules
    nice -n 10 python3 mutation/run.py --all           # every module of mutation/modules.toml
    python3 mutation/run.py --list

For each module, ``mutation/modules.toml`` names the source files to mutate, the test
files to run against them and the equivalent mutants left out of the score (each with its
reason).  The run happens in a copy of the working tree (tracked and untracked, not
ignored, files) under ``mutation/work/<module>/`` (``--work DIR`` elsewhere), so the
checkout itself is never mutated.  mutmut writes its mutants to ``mutants/`` inside that
copy, maps every test to the functions it calls, and runs each mutant in a forked
process against the tests that call the mutated function.  The shared mutmut settings
are pyproject.toml's ``[tool.mutmut]`` section; this script adds ``only_mutate`` and the
test selection of the module.

A mutant counts as killed when a test fails or crashes on it, or it times out; as
surviving when the tests pass, when no test of the module calls the function, or when
mutmut cannot tell ("suspicious").  Printed per module: ``MODULE killed/total score``
(total = mutants less the listed equivalent ones), then every survivor as a diff, also
written to ``<work>/<module>/survivors.txt``.  Exit status 1 when a module scores below
``--fail-under`` (default 90 %).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES_FILE = ROOT / "mutation" / "modules.toml"
DEFAULT_WORK = ROOT / "mutation" / "work"

KILLED = {"killed", "timeout", "segfault", "caught by type check"}


@dataclass
class Equivalent:
    function: str
    removed: str
    added: str
    reason: str
    matched: int = 0


@dataclass
class Module:
    name: str
    sources: list[str]
    tests: list[str]
    equivalent: list[Equivalent] = field(default_factory=list)


@dataclass
class Score:
    module: str
    killed: int
    total: int
    excluded: int
    survivors: list[tuple[str, str, str]]  # (mutant, status, diff)
    stale: list[Equivalent]
    seconds: float

    @property
    def percent(self) -> float:
        return 100.0 * self.killed / self.total if self.total else 100.0

    def line(self) -> str:
        return f"{self.module} {self.killed}/{self.total} {self.percent:.1f}%"


def load_modules() -> dict[str, Module]:
    raw = tomllib.loads(MODULES_FILE.read_text())["modules"]
    out = {}
    for name, entry in raw.items():
        eq = [Equivalent(e["function"], e["removed"].strip(), e["added"].strip(), e["reason"])
              for e in entry.get("equivalent", [])]
        missing = [e for e in eq if not e.reason.strip()]
        if missing:
            raise SystemExit(f"{MODULES_FILE}: equivalent mutant in {name}.{missing[0].function} without a reason")
        out[name] = Module(name, list(entry["sources"]), list(entry["tests"]), eq)
    return out


# --------------------------------------------------------------------------- the work copy

def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _without_table(text: str, header: str) -> str:
    """``text`` less the TOML table ``[header]`` (up to the next table header)."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("["):
            skipping = stripped == f"[{header}]"
        if not skipping:
            out.append(line)
    return "".join(out)


def tree_files(work: Path) -> list[str]:
    """Tracked and untracked, not ignored, files of the checkout (the work folder left out)."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    skip = []
    with contextlib.suppress(ValueError):
        skip.append(work.resolve().relative_to(ROOT).as_posix() + "/")
    return [f for f in listed if f and not any(f.startswith(s) for s in skip) and (ROOT / f).is_file()]


def prepare(module: Module, work: Path, baseline: str | None = None) -> Path:
    """A fresh copy of the working tree for ``module``, its pyproject.toml set for the module.

    ``baseline``: a git revision whose version of the module's test files replaces the
    working tree's (to measure the score the tests had then, against today's code).
    """
    folder = work / module.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in tree_files(work):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    pyproject = (ROOT / "pyproject.toml").read_text()
    settings = dict(tomllib.loads(pyproject).get("tool", {}).get("mutmut", {}))
    if not settings:
        raise SystemExit("pyproject.toml has no [tool.mutmut] section")
    settings["only_mutate"] = module.sources
    settings["pytest_add_cli_args_test_selection"] = module.tests
    table = "\n[tool.mutmut]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items())
    (folder / "pyproject.toml").write_text(_without_table(pyproject, "tool.mutmut").rstrip() + "\n" + table)
    for test in sorted({t.split("::")[0] for t in module.tests} if baseline else ()):
        old = subprocess.run(["git", "show", f"{baseline}:{test}"], cwd=ROOT, capture_output=True)
        if old.returncode != 0:
            raise SystemExit(f"{module.name}: {test} does not exist at {baseline}")
        (folder / test).write_bytes(old.stdout)
    missing = [p for p in module.sources + [t.split("::")[0] for t in module.tests] if not (folder / p).is_file()]
    if missing:
        raise SystemExit(f"{module.name}: missing in the working tree: {', '.join(missing)}")
    return folder


# --------------------------------------------------------------------------- running and scoring

def _environment(folder: Path) -> dict[str, str]:
    """The tests' environment: no mutant chosen yet, and the real runs kept across mutants.

    Each mutant's pytest session would train the same 3-epoch runs again (tens of seconds
    a mutant); ``BNAUDIT_TEST_RUNS`` makes tests/conftest.py keep them in the work folder,
    made once by the unmutated code of mutmut's first pass.  Mutants of code that only a
    run's own process executes are invisible to mutmut's test mapping either way.
    """
    env = dict(os.environ)
    env.pop("MUTANT_UNDER_TEST", None)
    env["BNAUDIT_TEST_RUNS"] = str(folder / "test-runs")
    return env


def run_mutmut(folder: Path, log: Path) -> int:
    env = _environment(folder)
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", "1"], cwd=folder,
                              stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc.returncode


def rerun_survivors(module: Module, folder: Path, log: Path) -> int:
    """Run again, against the checkout's current test files, only the mutants that survived in ``folder``.

    For a test added to kill them: the copy's test files (and conftest.py) are refreshed,
    mutmut maps the new tests and re-runs the named mutants; the others keep their result.
    """
    from mutmut.stats import status_by_exit_code

    tests = {t.split("::")[0] for t in module.tests} | {"tests/conftest.py"}
    for test in sorted(tests):
        for target in (folder / test, folder / "mutants" / test):
            shutil.copy2(ROOT / test, target)
    names = []
    for source in module.sources:
        codes = json.loads((folder / "mutants" / (source + ".meta")).read_text())["exit_code_by_key"]
        names += [m for m, c in codes.items() if status_by_exit_code[c] not in KILLED]
    if not names:
        return 0
    (folder / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)  # map every test afresh
    env = _environment(folder)
    with log.open("w") as out:
        return subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", "1", *names], cwd=folder,
                              stdout=out, stderr=subprocess.STDOUT, env=env).returncode


def _changed_lines(diff: str) -> tuple[str, str]:
    removed = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return " ".join(r for r in removed if r), " ".join(a for a in added if a)


def _function_of(mutant: str) -> str:
    """``bnaudit.bits.x_from_float64__mutmut_12`` -> ``from_float64``; methods -> ``Class.method``."""
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key

    func, cls = orig_function_and_class_names_from_key(mutant)
    return f"{cls}.{func}" if cls else func


def score(module: Module, folder: Path, seconds: float) -> Score:
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    for e in module.equivalent:
        e.matched = 0
    killed = total = excluded = 0
    survivors = []
    old = Path.cwd()
    os.chdir(folder)
    try:
        for source in module.sources:
            meta = folder / "mutants" / (source + ".meta")
            if not meta.is_file():
                raise SystemExit(f"{module.name}: mutmut wrote no results for {source} (see {folder / 'mutmut.log'})")
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            for mutant, code in sorted(codes.items(), key=lambda kv: _natural(kv[0])):
                status = status_by_exit_code[code]
                diff = get_diff_for_mutant(mutant, path=source)
                removed, added = _changed_lines(diff)
                function = _function_of(mutant)
                match = [e for e in module.equivalent
                         if e.function == function and e.removed == removed and e.added == added]
                if match:
                    match[0].matched += 1
                    excluded += 1
                    continue
                total += 1
                if status in KILLED:
                    killed += 1
                else:
                    survivors.append((mutant, status, diff))
    finally:
        os.chdir(old)
    stale = [e for e in module.equivalent if not e.matched]
    return Score(module.name, killed, total, excluded, survivors, stale, seconds)


def _natural(name: str) -> tuple[str, int]:
    head, _, number = name.rpartition("_")
    return (head, int(number)) if number.isdigit() else (name, 0)


def report(s: Score, folder: Path) -> str:
    lines = [f"# {s.line()} ({s.excluded} equivalent left out; {s.seconds:.0f} s)"]
    for mutant, status, diff in s.survivors:
        lines += ["", f"## {mutant}: {status}", diff]
    for e in s.stale:
        lines += ["", f"warning: equivalent entry matches no mutant: {e.function}: {e.removed!r} -> {e.added!r}"]
    text = "\n".join(lines) + "\n"
    (folder / "survivors.txt").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="module names of mutation/modules.toml")
    parser.add_argument("--all", action="store_true", help="every module")
    parser.add_argument("--list", action="store_true", help="list the modules and their tests, run nothing")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where the work copies go")
    parser.add_argument("--fail-under", type=float, default=90.0, help="minimum score in percent")
    parser.add_argument("--score-only", action="store_true", help="re-read the results of an earlier run")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in its work copy (mutants with a result are not re-run)")
    parser.add_argument("--survivors", action="store_true",
                        help="re-run only the survivors of an earlier run against the current test files")
    parser.add_argument("--baseline", metavar="REV", help="use the module's test files as of git revision REV")
    parser.add_argument("--quiet", action="store_true", help="print the score lines only, not the survivors")
    args = parser.parse_args(argv)
    modules = load_modules()
    if args.list:
        for m in modules.values():
            print(f"{m.name}: {' '.join(m.sources)} <- {' '.join(m.tests)} ({len(m.equivalent)} equivalent)")
        return 0
    names = list(modules) if args.all else args.modules
    unknown = [n for n in names if n not in modules]
    if not names or unknown:
        parser.error(f"name modules from {', '.join(modules)} (or --all)" + (f"; unknown {unknown}" if unknown else ""))
    try:
        import mutmut
    except ImportError:
        print("mutmut is not installed: python3 -m pip install -c constraints.txt mutmut==3.8.1", file=sys.stderr)
        return 2
    print(f"mutmut {mutmut.__version__}, work copies in {args.work}", flush=True)
    scores = []
    for name in names:
        module = modules[name]
        folder = args.work / name
        started = time.perf_counter()
        if args.survivors:
            code = rerun_survivors(module, folder, folder / "survivors.log")
            if code != 0:
                print(f"{name}: mutmut failed (exit {code}); see {folder / 'survivors.log'}")
                scores.append(None)
                continue
        elif not args.score_only:
            if not (args.resume and (folder / "mutants").is_dir()):
                folder = prepare(module, args.work, args.baseline)
            code = run_mutmut(folder, folder / ("mutmut-resumed.log" if args.resume else "mutmut.log"))
            if code != 0:
                print(f"{name}: mutmut failed (exit {code}); see the mutmut log in {folder}")
                scores.append(None)
                continue
        s = score(module, folder, time.perf_counter() - started)
        text = report(s, folder)
        print(s.line() if args.quiet else text, flush=True)
        scores.append(s)
    print("\nmodule killed/total score")
    for name, s in zip(names, scores):
        print(s.line() if s else f"{name} failed")
    bad = [n for n, s in zip(names, scores) if s is None or s.percent < args.fail_under]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
