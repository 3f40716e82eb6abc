"""Shared fixtures: real runs made once per session, and global numeric state restored."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bnaudit import envinfo


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
    deterministic = torch.are_deterministic_algorithms_enabled()
    prec = mpmath.mp.prec
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.use_deterministic_algorithms(deterministic)
    mpmath.mp.prec = prec


class RunFactory:
    """Real runs through the real launcher, made once per session and keyed by request."""

    def __init__(self, root: Path) -> None:
        self.root = root
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
            launch.run(spec, config, out)
            self.cache[ident] = out
        return self.cache[ident]


@pytest.fixture(scope="session")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> RunFactory:
    """``make_run(epochs, dtype=..., threads=..., ...)`` -> path of a complete record folder."""
    return RunFactory(tmp_path_factory.mktemp("runs"))


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
    os.environ.setdefault("BNAUDIT_CACHE", str(Path(config.rootpath) / ".pytest_cache" / "bnaudit"))
