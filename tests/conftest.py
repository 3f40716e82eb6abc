"""Shared fixtures: real runs made once per session, and global numeric state restored."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import Phase, settings

from bnaudit import envinfo

# Mutation testing (mutation/run.py) runs every test file hundreds of times, each time on
# code with one deliberate bug: the same examples every time (the score does not depend on
# luck), no shrinking of a failure (only whether it fails matters) and no time limit per
# example (a busy machine is not a failure).
settings.register_profile("mutation", derandomize=True, database=None, deadline=None,
                          phases=(Phase.explicit, Phase.reuse, Phase.generate))


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Every CI log says which machine and libraries ran the tests."""
    snap = envinfo.snapshot()
    lines = [
        f"bnaudit environment: cpu {snap['cpu_model']!r}, isas {','.join(snap['supported_isas'])}, "
        f"logical cpus {snap['logical_cpus']}, numpy {snap['numpy']}, python {snap['python']}",
        f"cpu features: {' '.join(snap['cpu_features'])}",
        f"numerics variables: {snap['environment'] or 'none'}",
    ]
    try:
        import torch

        lines.append(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
                     f"build {envinfo.torch_build(torch)}")
    except ImportError:  # pragma: no cover
        lines.append("torch not installed")
    return lines


@pytest.fixture(autouse=True)
def _restore_numeric_state():
    """Tests may change torch threads, dtype or determinism, or mpmath precision: undo it."""
    import mpmath
    import torch

    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    def determinism() -> tuple[bool, bool]:
        return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()

    deterministic = determinism()
    prec = mpmath.mp.prec
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    # Only when changed: the first call of use_deterministic_algorithms in a process costs
    # seconds (mutation testing starts a process per mutant).
    if determinism() != deterministic:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    mpmath.mp.prec = prec


class RunFactory:
    """Real runs through the real launcher, made once per session and keyed by request.

    With ``BNAUDIT_TEST_RUNS`` set to a folder (mutation/run.py sets it, so that each
    mutant's session does not train the same runs again), a run is also kept there under
    a name derived from the request, spec contents included, and a complete record found
    there is reused.  The default test run leaves it unset: every session trains afresh.
    """

    def __init__(self, root: Path, keep: Path | None = None) -> None:
        self.root = root
        self.keep = keep
        self.cache: dict[tuple, Path] = {}

    def __call__(self, epochs: int = 3, *, key: str = "", perturb: str | None = None, spec_path: Path | None = None,
                 **controls) -> Path:
        from bnaudit import controls as ctl
        from bnaudit import launch
        from bnaudit.spec import load_spec

        ident = (epochs, key, perturb, str(spec_path), tuple(sorted(controls.items())))
        if ident not in self.cache:
            spec = load_spec(spec_path)
            c = ctl.Controls(**controls)
            config = ctl.RunConfig(
                controls=c, epochs=epochs,
                perturb=None if perturb is None else ctl.parse_perturbation(perturb, spec))
            out = self.root / f"run{len(self.cache)}-{c.label()}"
            if self.keep is not None:
                spec_text = "" if spec_path is None else Path(spec_path).read_text()
                name = hashlib.sha256(repr((*ident[:3], spec_text, ident[4])).encode()).hexdigest()[:16]
                out = self.keep / f"{name}-{c.label()}"
            if not (out / "record.json").exists():
                launch.run(spec, config, out, force=out.exists())
            self.cache[ident] = out
        return self.cache[ident]


@pytest.fixture(scope="session")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> RunFactory:
    """``make_run(epochs, dtype=..., threads=..., ...)`` -> path of a complete record folder."""
    keep = os.environ.get("BNAUDIT_TEST_RUNS")
    return RunFactory(tmp_path_factory.mktemp("runs"), Path(keep) if keep else None)


@pytest.fixture(scope="session")
def compare_runs(make_run: RunFactory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real 3-epoch runs test_compare and test_compare_cli compare (test_run shares some by request)."""
    nobn = tmp_path_factory.getbasetemp() / "compare-nobn.toml"
    nobn.write_text("[model]\nbatchnorm = false\n")
    return {
        "t1": make_run(3, threads=1),
        "same": make_run(3, dtype="float32", threads=1),
        "rerun": make_run(3, key="rerun", dtype="float32", threads=1),
        "t2": make_run(3, threads=2),
        "perturb": make_run(3, perturb="linear1.weight[0,0]:1"),
        "bf16": make_run(2, dtype="bfloat16"),
        "nobn": make_run(3, spec_path=nobn),
    }


@pytest.fixture(scope="session")
def cpu_isas() -> list[str]:
    return envinfo.supported_isas()


@pytest.fixture()
def cli(capsys):
    """Run the real CLI in-process: returns (exit code, stdout, stderr)."""
    from bnaudit.cli import main

    def invoke(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def pytest_configure(config: pytest.Config) -> None:
    # The tests check the committed reference/ folder, never one a user moved elsewhere.
    os.environ.pop("BNAUDIT_REFERENCE_DIR", None)
    # Under GitHub Actions an error line is followed by its annotation: tests that count lines
    # set GITHUB_ACTIONS themselves where they want it.
    os.environ.pop("GITHUB_ACTIONS", None)


@pytest.fixture(scope="session", autouse=True)
def bnaudit_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh, empty ``BNAUDIT_CACHE`` for every test session.

    Custom specs' frozen inputs and references are generated into it by the code under
    test, never reused from an earlier run (or an earlier version of the code).  Run
    processes inherit it through their environment.
    """
    previous = os.environ.get("BNAUDIT_CACHE")
    cache = tmp_path_factory.mktemp("bnaudit-cache")
    os.environ["BNAUDIT_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("BNAUDIT_CACHE", None)
    else:
        os.environ["BNAUDIT_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def committed_reference(pytestconfig: pytest.Config) -> Path:
    """The default spec's committed frozen inputs and mpmath reference: a checkout without them fails.

    Every test that reads them would otherwise skip or quietly build a replacement.
    """
    from bnaudit.spec import default_spec

    short = default_spec().short_hash
    root = Path(pytestconfig.rootpath) / "reference"
    missing = []
    for folder in (root / "frozen" / short, root / "mpmath" / short):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            missing.append(str(manifest))
            continue
        files = json.loads(manifest.read_text()).get("files", {})
        missing += [str(folder / name) for name in files if not (folder / name).is_file()]
    if missing:
        pytest.fail(f"committed reference data missing: {', '.join(missing)} (restore it from git; "
                    "`bnaudit frozen build` / `bnaudit reference build` regenerate it)", pytrace=False)
    return root / "mpmath" / short
