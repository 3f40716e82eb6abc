"""Building, resuming, verifying and loading the stored reference; the CLI and its exit codes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bnaudit import frozen, record
from bnaudit.cli import main
from bnaudit.errors import ExitCode, InputError, Interrupted, ReferenceFailure
from bnaudit.reference import build, engine, store
from bnaudit.spec import default_spec, from_dict

PREC, CHECK = 128, 192  # agree on ~37 digits over two epochs: enough for a 30-digit threshold


def _small_spec():
    """The experiment on a 2 x 4 network: the same code paths, a twentieth of the arithmetic."""
    return from_dict({"name": "small", "model": {"hidden_layers": 2, "hidden_units": 4}}, base=default_spec())


@pytest.fixture(scope="module")
def spec_and_inputs():
    spec = _small_spec()
    return spec, frozen.load(spec)  # generated once into the cache (BNAUDIT_CACHE)


@pytest.fixture(scope="module")
def built(tmp_path_factory, spec_and_inputs):
    spec, fz = spec_and_inputs
    out = tmp_path_factory.mktemp("ref") / "r2"
    events = []
    ref = build.build(spec, fz, out, precision=PREC, check_precision=CHECK, epochs=2,
                      progress=lambda d, t, info: events.append((d, t, dict(info))))
    return ref, events


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.npy"))}


def _stop_after_row(row):
    """A progress callback that interrupts the build (as Ctrl-C would) once ``row`` is stored."""
    def progress(done, total, info):
        if info.get("agreement") is not None and info["row"] == row:
            raise KeyboardInterrupt
    return progress


def test_built_reference_loads_with_its_layout(built, spec_and_inputs):
    ref, events = built
    spec, fz = spec_and_inputs
    assert list(ref.rows) == [0, 1, 2] == record.snapshot_rows(2)
    cols = store.Columns.for_spec(spec)
    assert ref.hi.shape == (3, cols.total) and ref.lo.shape == (3, cols.total)
    assert ref.precision == PREC and ref.check_precision == CHECK and ref.frozen == fz.digest
    assert (ref.agreement >= 30).all()
    # row 0 holds the frozen initial parameters exactly (lo = 0)
    p_hi, p_lo = ref.section("params")
    n = cols.n_params
    assert np.array_equal(p_hi[0], fz.init[:n]) and not p_lo[0].any()
    # the progress callback saw every row, with the agreement
    assert [e[0] for e in events if e[2]["agreement"] is not None] == [0, 1, 2]
    # losses are finite and the double-double parts are consistent
    l_hi, l_lo = ref.section("losses")
    assert np.isfinite(l_hi).all() and (np.abs(l_lo) <= np.spacing(np.abs(l_hi)) / 2).all()


def test_stored_values_are_the_engine_values(built, spec_and_inputs):
    """The stored hi/lo pair is the engine's value rounded to double-double (independent recomputation)."""
    ref, _ = built
    spec, fz = spec_and_inputs
    net = engine.Network(spec, engine.new_context(PREC), fz.init, fz.inputs, fz.targets)
    net.train_epoch(0, fz.batches[0])
    values = net.flat_parameters()
    i = ref.row_index()[1]
    for k in (0, len(values) // 2, len(values) - 1):
        hi, lo = engine.double_double(values[k])
        assert (ref.hi[i, k], ref.lo[i, k]) == (hi, lo)


def test_interrupted_build_resumes_without_redoing_rows(tmp_path, built, spec_and_inputs):
    spec, fz = spec_and_inputs
    ref, _ = built
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted, match="rerun the same command to resume"):
        build.build(spec, fz, out, precision=PREC, check_precision=CHECK, epochs=2, progress=_stop_after_row(1))
    assert not (out / "manifest.json").exists(), "an interrupted build must not leave a loadable reference"
    assert (build.work_folder(out) / "state.json").exists()
    seen = []
    resumed = build.build(spec, fz, out, precision=PREC, check_precision=CHECK, epochs=2,
                          progress=lambda d, t, info: seen.append((d, dict(info))))
    assert seen[0][1]["resumed"] is True and seen[0][0] == 1, "the resumed build starts after row 1"
    assert [d for d, info in seen if info.get("agreement") is not None] == [2], "rows 0 and 1 were not redone"
    assert _file_hashes(out) == _file_hashes(ref.path), "resumed build differs from an uninterrupted one"
    assert not build.work_folder(out).exists()
    assert resumed.agreement.tolist() == ref.agreement.tolist()


def test_two_processes_build_the_same_reference_and_resume(tmp_path, built, spec_and_inputs):
    """--jobs 2 (check precision in a child process): interrupted, resumed, bit-identical to one process."""
    spec, fz = spec_and_inputs
    ref, _ = built
    out = tmp_path / "two"
    with pytest.raises(Interrupted, match="rerun the same command to resume"):
        build.build(spec, fz, out, precision=PREC, check_precision=CHECK, epochs=2, progress=_stop_after_row(1),
                    jobs=2)
    seen = []
    build.build(spec, fz, out, precision=PREC, check_precision=CHECK, epochs=2, jobs=2,
                progress=lambda d, t, info: seen.append(info.get("agreement")))
    computed = [a for a in seen if a is not None]
    assert len(computed) == 1 and round(computed[0], 2) == ref.agreement[2], "only row 2 was computed after resuming"
    assert _file_hashes(out) == _file_hashes(ref.path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["jobs"] == 2 and manifest["build"]["cpu_seconds"] > 0


def test_a_failing_check_process_is_one_reference_error(tmp_path, spec_and_inputs, monkeypatch):
    """The child cannot start (here: an interpreter that exits 1 at once): one line, exit 8, nothing written."""
    spec, fz = spec_and_inputs
    monkeypatch.setattr(build.sys, "executable", shutil.which("false"))
    with pytest.raises(ReferenceFailure) as info:
        build.build(spec, fz, tmp_path / "r", precision=PREC, check_precision=CHECK, epochs=1, jobs=2)
    assert "check process stopped without a result (exit code 1)" in info.value.message
    assert "\n" not in info.value.message and info.value.exit_code == ExitCode.REFERENCE
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("jobs", [1, 2])
def test_disagreeing_precisions_stop_either_way(tmp_path, spec_and_inputs, jobs):
    spec, fz = spec_and_inputs
    with pytest.raises(ReferenceFailure, match="epoch row 0"):
        build.build(spec, fz, tmp_path / "low", precision=64, check_precision=96, epochs=1, jobs=jobs)


def test_finished_rows_of_an_interrupted_build_give_a_prefix_reference(tmp_path, built, spec_and_inputs):
    spec, fz = spec_and_inputs
    ref, _ = built
    out = tmp_path / "prefix"
    with pytest.raises(Interrupted, match="rerun the same command to resume"):
        build.build(spec, fz, out, precision=PREC, check_precision=CHECK, epochs=2, progress=_stop_after_row(2))
    computed = []
    one = build.build(spec, fz, out, precision=PREC, check_precision=CHECK, epochs=1,
                      progress=lambda d, t, info: computed.append(info.get("agreement")))
    assert computed == [None], "a prefix of finished rows is written without computing"
    assert one.epochs == 1 and np.array_equal(one.hi.view("<u8"), ref.hi[:2].view("<u8"))
    assert build.work_folder(out).exists(), "the longer build's checkpoint is kept"
    two = build.build(spec, fz, out, precision=PREC, check_precision=CHECK, epochs=2, force=True)
    assert _file_hashes(two.path) == _file_hashes(ref.path)
    assert not build.work_folder(out).exists()


def test_disagreeing_precisions_fail_with_reference_exit_code(tmp_path, spec_and_inputs):
    spec, fz = spec_and_inputs
    with pytest.raises(ReferenceFailure) as info:
        build.build(spec, fz, tmp_path / "low", precision=64, check_precision=96, epochs=1)
    message = info.value.message
    assert "epoch row 0" in message and "--precision" in message
    assert info.value.exit_code == ExitCode.REFERENCE == 8
    assert not (tmp_path / "low" / "manifest.json").exists()


def _spec_file(tmp_path: Path) -> str:
    path = tmp_path / "small.toml"
    path.write_text('name = "small"\n[model]\nhidden_layers = 2\nhidden_units = 4\n')
    return str(path)


def test_cli_build_failure_exits_8(tmp_path, capsys):
    code = main(["reference", "build", "--spec", _spec_file(tmp_path), "--epochs", "1", "--precision", "64",
                 "--check-precision", "96", "--out", str(tmp_path / "low")])
    assert code == ExitCode.REFERENCE
    err = capsys.readouterr().err
    assert err.startswith("bnaudit: error: reference precision check failed at epoch row 0") and "--precision" in err


@pytest.mark.parametrize("args", [["--precision", "128", "--check-precision", "128"], ["--precision", "32"],
                                  ["--epochs", "0"], ["--min-digits", "0"], ["--jobs", "3"], ["--jobs", "0"]])
def test_cli_build_bad_options_exit_2(tmp_path, capsys, args):
    code = main(["reference", "build", "--spec", _spec_file(tmp_path), *args, "--out", str(tmp_path / "x")])
    assert code == ExitCode.USAGE
    assert capsys.readouterr().err.startswith("bnaudit: error: ")
    assert not (tmp_path / "x").exists() and not build.work_folder(tmp_path / "x").exists()


def test_cli_build_and_verify(tmp_path, capsys, built):
    ref, _ = built
    out = tmp_path / "cli"
    spec_file = _spec_file(tmp_path)
    code = main(["reference", "build", "--spec", spec_file, "--epochs", "1", "--precision", str(PREC),
                 "--check-precision", str(CHECK), "--out", str(out)])
    assert code == 0
    assert "agreement" in capsys.readouterr().out
    # the same rows as the library build: bit for bit
    again = store.read(out)
    assert np.array_equal(again.hi.view("<u8"), ref.hi[:2].view("<u8"))
    assert main(["reference", "build", "--spec", spec_file, "--epochs", "1", "--out", str(out)]) == ExitCode.OUTPUT
    capsys.readouterr()
    assert main(["reference", "verify", "--spec", spec_file, "--reference", str(out), "--epochs", "1"]) == 0
    assert "match bit for bit" in capsys.readouterr().out


def test_cli_interrupt_is_one_line_exit_130_and_the_rerun_resumes(tmp_path, capsys, monkeypatch, built):
    """Ctrl-C inside the arithmetic (here: raised by the second training epoch) during a --jobs 2 build."""
    ref, _ = built
    out, spec_file = tmp_path / "cli", _spec_file(tmp_path)
    args = ["reference", "build", "--spec", spec_file, "--epochs", "2", "--precision", str(PREC),
            "--check-precision", str(CHECK), "--out", str(out), "--jobs", "2"]
    real = engine.Network.train_epoch

    def interrupted(self, epoch, order):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch, order)

    monkeypatch.setattr(engine.Network, "train_epoch", interrupted)
    assert main(args) == ExitCode.INTERRUPTED == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bnaudit: error: interrupted with 2 of 3 stored rows done; "
                                                    "rerun the same command to resume")
    # Outside the build loop, typer would swallow the interrupt into a silent 130: still one line.
    assert main(["reference", "verify", "--spec", spec_file, "--reference", str(ref.path)]) == 130
    assert capsys.readouterr().err == "bnaudit: error: interrupted\n"
    monkeypatch.undo()
    assert main(args) == 0
    assert _file_hashes(out) == _file_hashes(ref.path)


def test_verify_detects_tampering(tmp_path, capsys, built):
    ref, _ = built
    copy = tmp_path / "tampered"
    shutil.copytree(ref.path, copy)
    hi = np.load(copy / "values_hi.npy")
    hi[1, 5] = np.nextafter(hi[1, 5], np.inf)
    np.save(copy / "values_hi.npy", hi)
    assert main(["reference", "verify", "--spec", _spec_file(tmp_path), "--reference", str(copy)]) == ExitCode.BAD_INPUT
    assert "sha256 does not match" in capsys.readouterr().err
    # a consistent manifest over a wrong value: recomputation catches it
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["values_hi.npy"] = hashlib.sha256((copy / "values_hi.npy").read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReferenceFailure, match=r"row 1 value 5 \(params\) differs"):
        build.verify(store.read(copy), frozen.load(_small_spec()), epochs=1)


@pytest.mark.parametrize("edit", ["schema", "rows", "spec_hash", "agreement"])
def test_malformed_manifests_are_bad_input(tmp_path, built, edit):
    ref, _ = built
    copy = tmp_path / "bad"
    shutil.copytree(ref.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest[edit] = {"schema": "x", "rows": [0, 1], "spec_hash": "0" * 64, "agreement": "many"}[edit]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError):
        store.read(copy)


def test_missing_reference_is_reference_error(tmp_path):
    with pytest.raises(ReferenceFailure, match="no mpmath reference"):
        store.load(_small_spec(), tmp_path / "nothing")


def test_custom_spec_reference_is_cached_by_spec_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("BNAUDIT_CACHE", str(tmp_path / "cache"))
    spec = from_dict({"model": {"hidden_layers": 1, "hidden_units": 4}, "train": {"epochs": 2}}, base=default_spec())
    fz = frozen.load(spec)
    folder = store.folder_for(spec)
    assert folder == tmp_path / "cache" / "reference" / spec.hash
    first = build.build_cached(spec, fz, epochs=1)
    assert first.path == folder and first.epochs == 1
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    again = build.build_cached(spec, fz, epochs=1)
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp and again.digest == first.digest


def test_shipped_default_reference():
    """The reference in reference/mpmath/<hash>: manifest, size, agreement, and its first row recomputed."""
    spec = default_spec()
    fz = frozen.load(spec)
    if not store.exists(spec):
        pytest.skip("no shipped reference in this checkout")
    ref = store.load(spec)
    assert store.size_bytes(ref.path) < 16 * 1024 * 1024
    assert (ref.agreement >= 30).all(), f"precisions agree on only {ref.agreement.min()} digits"
    assert list(ref.rows) == record.snapshot_rows(ref.epochs)
    assert build.verify(ref, fz, epochs=0) == [0]
