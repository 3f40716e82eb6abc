"""Building, resuming, verifying and loading the stored reference; the CLI and its exit codes."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from bnaudit import frozen
from bnaudit.cli import main
from bnaudit.errors import ExitCode, InputError, Interrupted, ReferenceFailure
from bnaudit.layout import probe_schedule
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
    assert list(ref.rows) == [0, 1, 2] == probe_schedule(2)
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
    with pytest.raises(ReferenceFailure, match=r"failed \(the initial state\)"):
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
    assert "failed (the initial state)" in message and "--precision" in message
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
    assert err.startswith("bnaudit: error: reference precision check failed (the initial state)") and \
        "--precision" in err


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
    assert err.count("\n") == 1 and err.startswith("bnaudit: error: interrupted with 2 of 3 stored states done; "
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
    with pytest.raises(ReferenceFailure, match=r"row 1 value 5 \(params\) differs from its recomputation: stored "):
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
    assert not store.exists(spec)
    first = build.build(spec, fz, folder, epochs=1)
    assert store.exists(spec) and store.load(spec).path == folder == first.path
    assert store.load(spec).digest == first.digest and first.epochs == 1


def test_shipped_default_reference():
    """The reference in reference/mpmath/<hash>: manifest, size, agreement, and its first row recomputed."""
    spec = default_spec()
    fz = frozen.load(spec)
    assert store.exists(spec), "the committed reference of the default spec is missing from reference/mpmath"
    ref = store.load(spec)
    assert sum(p.stat().st_size for p in ref.path.iterdir()) < 16 * 1024 * 1024
    assert (ref.agreement >= 30).all(), f"precisions agree on only {ref.agreement.min()} digits"
    assert list(ref.rows) == probe_schedule(ref.epochs)
    assert build.verify(ref, fz, epochs=0, random_rows=0).rows == [0]


# --------------------------------------------------------------------------- damaged checkpoints

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, spec_and_inputs):
    """The work folder of a 2-epoch build interrupted once row 1 was stored (state.json: row 1, state.prev.json: 0)."""
    spec, fz = spec_and_inputs
    out = tmp_path_factory.mktemp("ckpt") / "r"
    with pytest.raises(Interrupted):
        build.build(spec, fz, out, precision=PREC, check_precision=CHECK, epochs=2, progress=_stop_after_row(1))
    work = build.work_folder(out)
    assert sorted(p.name for p in work.iterdir()) == ["job.json", "rows", "state.json", "state.prev.json"]
    assert sorted(p.name for p in (work / "rows").iterdir()) == ["000000.npz", "000001.npz"]
    return work


def _resume_damaged(tmp_path, checkpoint, spec_and_inputs, damage, jobs=1):
    """Copy the interrupted build's checkpoint, ``damage(work)`` it, resume; return (computed rows, note, out)."""
    spec, fz = spec_and_inputs
    out = tmp_path / "r"
    work = build.work_folder(out)
    shutil.copytree(checkpoint, work)
    damage(work)
    seen = []
    build.build(spec, fz, out, precision=PREC, check_precision=CHECK, epochs=2, jobs=jobs,
                progress=lambda d, t, info: seen.append(dict(info)))
    assert not work.exists()
    return [i["row"] for i in seen if i.get("agreement") is not None], seen[0]["note"], out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # what a kill inside a write leaves


def _alter_value(path: Path, k: int = 3) -> None:
    """Rewrite a row file with one value one ulp away: a well-formed file with a wrong value."""
    with np.load(path) as z:
        fields = {name: z[name] for name in z.files}
    fields["hi"][k] = np.nextafter(fields["hi"][k], np.inf)
    np.savez(path, **fields)


def test_a_truncated_temporary_row_file_is_ignored(tmp_path, built, checkpoint, spec_and_inputs):
    """A kill inside the row write leaves a hidden temporary file (it used to be read: BadZipFile)."""
    ref, _ = built

    def leftovers(work):
        for name in (".000002.tmp.npz", ".000002.npz.partial-k1ll3d"):
            (work / "rows" / name).write_bytes(b"PK\x03\x04 half a zip")
        (work / ".state.json.partial-k1ll3d").write_text('{"epoch": 2, "ma')

    computed, note, out = _resume_damaged(tmp_path, checkpoint, spec_and_inputs, leftovers)
    assert computed == [2] and note is None
    assert _file_hashes(out) == _file_hashes(ref.path)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_truncated_last_row_falls_back_one_row(tmp_path, built, checkpoint, spec_and_inputs, jobs):
    ref, _ = built
    computed, note, out = _resume_damaged(tmp_path, checkpoint, spec_and_inputs,
                                          lambda work: _truncate(work / "rows" / "000001.npz"), jobs=jobs)
    assert note == (f"build checkpoint in {tmp_path / '.r.partial'}: the stored state after epoch 1 was unreadable "
                    "(not an .npz: truncated or corrupt); resumed from the initial state")
    assert computed == [1, 2]
    assert _file_hashes(out) == _file_hashes(ref.path), "resumed build differs from an uninterrupted one"


def test_an_altered_last_row_is_refused_and_recomputed(tmp_path, built, checkpoint, spec_and_inputs):
    """The issue's case: a row changed after it was written no longer reaches the final reference."""
    ref, _ = built
    computed, note, out = _resume_damaged(tmp_path, checkpoint, spec_and_inputs,
                                          lambda work: _alter_value(work / "rows" / "000001.npz"))
    assert note == (f"build checkpoint in {tmp_path / '.r.partial'}: the stored state after epoch 1 was changed after "
                    "it was written (its sha256 is not the one recorded); resumed from the initial state")
    assert computed == [1, 2]
    assert _file_hashes(out) == _file_hashes(ref.path)


@pytest.mark.parametrize("garbage", [b"", b"\x00garbage\xff", b'{"epoch": 1, "steps": 40, "main": ["1a:'])
def test_garbage_in_state_json_falls_back_to_the_previous_state(tmp_path, built, checkpoint, spec_and_inputs,
                                                                 garbage):
    ref, _ = built
    computed, note, out = _resume_damaged(tmp_path, checkpoint, spec_and_inputs,
                                          lambda work: (work / "state.json").write_bytes(garbage))
    assert note == (f"build checkpoint in {tmp_path / '.r.partial'}: state.json was unreadable (not JSON: "
                    "truncated or corrupt); resumed from the initial state")
    assert computed == [1, 2]
    assert _file_hashes(out) == _file_hashes(ref.path)


def test_an_edited_exact_state_is_refused(tmp_path, built, checkpoint, spec_and_inputs):
    """One hex digit of a mantissa changed: still JSON, another trajectory; the seal refuses it."""
    ref, _ = built

    def edit(work):
        doc = json.loads((work / "state.json").read_text())
        man, exp = doc["main"][0].split(":")
        doc["main"][0] = f"{man[:-1]}{'1' if man[-1] != '1' else '3'}:{exp}"
        (work / "state.json").write_text(json.dumps(doc, sort_keys=True))

    computed, note, out = _resume_damaged(tmp_path, checkpoint, spec_and_inputs, edit)
    assert note == (f"build checkpoint in {tmp_path / '.r.partial'}: state.json was changed after it was written "
                    "(its seal does not match its content); resumed from the initial state")
    assert computed == [1, 2] and _file_hashes(out) == _file_hashes(ref.path)


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete"])
def test_a_damaged_earlier_row_starts_the_build_over(tmp_path, built, checkpoint, spec_and_inputs, damage):
    ref, _ = built
    row0 = Path("rows") / "000000.npz"
    act = {"truncate": lambda w: _truncate(w / row0), "alter": lambda w: _alter_value(w / row0, k=0),
           "delete": lambda w: (w / row0).unlink()}[damage]
    was = {"truncate": "was unreadable (not an .npz: truncated or corrupt)",
           "alter": "was changed after it was written (its sha256 is not the one recorded)",
           "delete": "was missing"}[damage]
    computed, note, out = _resume_damaged(tmp_path, checkpoint, spec_and_inputs, act)
    assert note == (f"build checkpoint in {tmp_path / '.r.partial'}: the initial state {was}; the build starts over "
                    "from the initial state (only the last stored state can be recomputed from the checkpoint)")
    assert computed == [0, 1, 2]
    assert _file_hashes(out) == _file_hashes(ref.path)


def test_both_states_unreadable_start_the_build_over(tmp_path, built, checkpoint, spec_and_inputs):
    ref, _ = built

    def both(work):
        (work / "state.json").write_text("{}")
        (work / "state.prev.json").unlink()

    computed, note, out = _resume_damaged(tmp_path, checkpoint, spec_and_inputs, both)
    assert note == (f"build checkpoint in {tmp_path / '.r.partial'}: state.json was changed after it was written "
                    "(its seal does not match its content); state.prev.json was missing; the build starts over "
                    "from the initial state")
    assert computed == [0, 1, 2] and _file_hashes(out) == _file_hashes(ref.path)


def test_an_unreadable_job_starts_the_build_over(tmp_path, built, checkpoint, spec_and_inputs):
    ref, _ = built
    computed, note, out = _resume_damaged(tmp_path, checkpoint, spec_and_inputs,
                                          lambda work: (work / "job.json").write_text("{"))
    assert note == (f"build checkpoint in {tmp_path / '.r.partial'}: job.json was unreadable; the build starts "
                    "over from the initial state")
    assert computed == [0, 1, 2] and _file_hashes(out) == _file_hashes(ref.path)


def test_cli_damaged_checkpoint_is_one_note_line(tmp_path, capsys, built, checkpoint):
    ref, _ = built
    out = tmp_path / "cli"
    shutil.copytree(checkpoint, build.work_folder(out))
    _truncate(build.work_folder(out) / "rows" / "000001.npz")
    code = main(["reference", "build", "--spec", _spec_file(tmp_path), "--epochs", "2", "--precision", str(PREC),
                 "--check-precision", str(CHECK), "--out", str(out), "--jobs", "1"])
    assert code == 0
    assert capsys.readouterr().err == (f"bnaudit: note: build checkpoint in {tmp_path / '.cli.partial'}: the stored "
                                       "state after epoch 1 was unreadable (not an .npz: truncated or corrupt); "
                                       "resumed from the initial state\n")
    assert _file_hashes(out) == _file_hashes(ref.path)


# --------------------------------------------------------------------------- verify: random rows and all rows

@pytest.fixture(scope="module")
def built6(tmp_path_factory, spec_and_inputs):
    """A 6-epoch reference (rows 0..6): room for rows beyond the verified prefix."""
    spec, fz = spec_and_inputs
    return build.build(spec, fz, tmp_path_factory.mktemp("ref6") / "r6", precision=PREC, check_precision=CHECK,
                       epochs=6)


def _tampered_copy(ref, folder: Path, row: int, k: int) -> store.StoredReference:
    """A copy of ``ref`` with value k of ``row`` one ulp off and a manifest that agrees (sha256 recomputed)."""
    shutil.copytree(ref.path, folder)
    hi = np.load(folder / "values_hi.npy")
    hi[ref.row_index()[row], k] = np.nextafter(hi[ref.row_index()[row], k], np.inf)
    np.save(folder / "values_hi.npy", hi)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["values_hi.npy"] = hashlib.sha256((folder / "values_hi.npy").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return store.read(folder)


def test_verify_draws_spread_rows_reproducibly_by_seed(built6, spec_and_inputs):
    _, fz = spec_and_inputs
    first = build.verify(built6, fz, epochs=1, random_rows=2, within=6, seed=11)
    again = build.verify(built6, fz, epochs=1, random_rows=2, within=6, seed=11)
    assert first.drawn == again.drawn and first.seed == 11 and first.pool == (2, 6)
    assert first.rows == [0, 1, *first.drawn]
    # one row from each of the stretches 2..3 and 4..6 of the pool, whatever the seed
    draws = {tuple(build._spread_draw([2, 3, 4, 5, 6], 2, build.random.Random(s))) for s in range(20)}
    assert all(a in (2, 3) and b in (4, 5, 6) for a, b in draws) and len(draws) > 1
    # without a seed one is chosen and returned; the bound limits the pool
    free = build.verify(built6, fz, epochs=2, random_rows=1, within=4)
    assert free.pool == (3, 4) and free.drawn[0] in (3, 4) and 0 <= free.seed < 1_000_000
    assert build.verify(built6, fz, epochs=2, random_rows=5, within=4, seed=0).drawn == [3, 4]


def test_verify_random_rows_and_all_catch_a_row_the_prefix_misses(tmp_path, built6, spec_and_inputs):
    _, fz = spec_and_inputs
    bad = _tampered_copy(built6, tmp_path / "bad", row=5, k=7)
    assert build.verify(bad, fz, epochs=2, random_rows=0).rows == [0, 1, 2], "the old default could not see it"
    seed = next(s for s in range(100) if 5 in build._spread_draw([3, 4, 5, 6], 2, build.random.Random(s)))
    message = r"row 5 value 7 \(params\) differs from its recomputation: stored \S+ \+ \S+, recomputed \S+ \+ \S+$"
    with pytest.raises(ReferenceFailure, match=message) as info:
        build.verify(bad, fz, epochs=2, random_rows=2, within=6, seed=seed)
    assert info.value.exit_code == ExitCode.REFERENCE and "\n" not in info.value.message
    with pytest.raises(ReferenceFailure, match=message):
        build.verify(bad, fz, epochs=None)


def test_cli_verify_all_and_random_lines(tmp_path, capsys, built6):
    spec_file, folder = _spec_file(tmp_path), str(built6.path)
    assert main(["reference", "verify", "--spec", spec_file, "--reference", folder, "--epochs", "all"]) == 0
    line = capsys.readouterr().out
    assert re.fullmatch(rf"reference {re.escape(folder)} verified: manifest sha256 OK, all 7 stored states \(the "
                        rf"initial state to after epoch 6\) recomputed from the initial state at {PREC} bits match "
                        r"bit for bit \(\d+\.\d s\); 6 epochs stored, "
                        r"precisions agree on >= \d+\.\d digits\n", line), line
    assert main(["reference", "verify", "--spec", spec_file, "--reference", folder, "--seed", "11",
                 "--random-rows", "2"]) == 0
    drawn = build.verify(built6, frozen.load(_small_spec()), epochs=2, random_rows=2, seed=11).drawn
    line = capsys.readouterr().out
    assert (f"the initial state and the states after epochs 1-2, and after epochs {drawn[0]}, {drawn[1]} (drawn "
            "from after epochs 3-6, --seed 11) recomputed") in line, line
    assert main(["reference", "verify", "--spec", spec_file, "--reference", folder, "--epochs", "1",
                 "--random-rows", "0"]) == 0
    assert ("manifest sha256 OK, the initial state and the state after epoch 1 recomputed from the initial state"
            in capsys.readouterr().out)


@pytest.mark.parametrize("args", [["--epochs", "some"], ["--epochs", "-1"], ["--random-rows", "-1"],
                                  ["--seed", "-3"]])
def test_cli_verify_bad_options_exit_2(tmp_path, capsys, built6, args):
    code = main(["reference", "verify", "--spec", _spec_file(tmp_path), "--reference", str(built6.path), *args])
    assert code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.startswith("bnaudit: error: ") and err.count("\n") == 1

