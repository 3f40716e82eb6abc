"""`bnaudit report`: the folder it writes, its figures, its refusals, and the page in a real browser."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnaudit.errors import ExitCode

EPOCHS = 3  # the same runs as tests/test_compare*.py and test_check*.py: made once per session
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# --------------------------------------------------------------------------- helpers


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature, IHDR chunk and CRCs with plain Python."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name}: not a PNG signature"
    offset, chunks = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path.name}: bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        offset += 12 + length
    assert chunks[0][0] == b"IHDR" and len(chunks[0][1]) == 13, f"{path.name}: IHDR is not the first chunk"
    assert chunks[-1][0] == b"IEND", f"{path.name}: truncated (no IEND)"
    assert any(k == b"IDAT" for k, _ in chunks), f"{path.name}: no image data"
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert depth == 8 and colour in (2, 6), f"{path.name}: unexpected pixel format {depth}/{colour}"
    return width, height


def chromium_args(profile: Path) -> list[str]:
    return [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}"]


def reseal(folder: Path, meta: dict) -> None:
    """Write an edited record.json with its checksum recomputed, as a run that measured this would have."""
    from bnaudit import record

    meta["content_sha256"] = record.record_sha256(meta)
    (folder / "record.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runs(make_run) -> dict[str, Path]:
    """Real short runs: float32 at 1 and 2 threads, a 1-ulp perturbed twin, and float64."""
    return {
        "t1": make_run(EPOCHS),
        "t2": make_run(EPOCHS, threads=2),
        "perturb": make_run(EPOCHS, perturb="linear1.weight[0,0]:1"),
        "f64": make_run(EPOCHS, dtype="float64"),
    }


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory) -> Path:
    from bnaudit.cli import main

    out = tmp_path_factory.mktemp("report") / "rep"
    code = main(["report", *(str(p) for p in runs.values()), "--out", str(out)])
    assert code == 0
    return out


# --------------------------------------------------------------------------- the folder


def test_report_folder_has_html_markdown_and_valid_figures(written: Path) -> None:
    assert (written / "index.html").is_file() and (written / "report.md").is_file()
    pngs = sorted((written / "figures").glob("*.png"))
    names = {p.stem for p in pngs}
    # the classes overlaid and side by side (one figure, not one per class), the heatmaps, growth, BN, the grid
    assert {"seed_overlay", "seed_classes", "heatmap_pairs", "growth", "bn_conditioning", "matrix_grid"} <= names
    assert sum(n.startswith("seed_") for n in names) == 2, names
    for p in pngs:
        width, height = png_size(p)
        assert 800 <= width <= 4000 and 500 <= height <= 5000, f"{p.name}: {width}x{height} px"
        assert 10_000 < p.stat().st_size < 1_000_000, f"{p.name}: {p.stat().st_size} bytes"
    html = (written / "index.html").read_text()
    md = (written / "report.md").read_text()
    for p in pngs:
        rel = f"figures/{p.name}"
        assert f'src="{rel}"' in html, f"index.html does not show {rel}"
        assert f"({rel})" in md, f"report.md does not show {rel}"
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "index.html must not reach the network"
    assert "<script" not in html
    # no leftover temporary folder beside the report
    assert not [p for p in written.parent.iterdir() if ".partial-" in p.name]


def test_report_says_what_it_found(written: Path, runs: dict[str, Path]) -> None:
    md = (written / "report.md").read_text()
    assert "1-ulp baseline" in md  # the perturbed run was paired with its twin
    assert "float32_t2_native_nondet vs float32_t1_native_nondet" in md
    # threads 1 vs 2 part in the first traced step on this machine; a 1-ulp perturbation at the initial state
    assert "initial state" in md
    # The runs carry their divergence from the shipped mpmath reference: the report shows it.
    assert "no run carries a divergence from the mpmath reference" not in md
    assert "fewest correct bits (any layer or epoch)" in md
    from bnaudit import record

    for name in ("t1", "f64"):
        losses = record.load_record(runs[name]).arrays["losses"][-1]
        assert f"{losses[0]:.4g}" in md, f"final train MSE of {name} missing"


def test_the_findings_come_first_and_name_what_compare_json_says_for_the_same_runs(
        written: Path, runs: dict[str, Path], cli) -> None:
    """The story's sentences against `bnaudit compare --json` of each pair the report compares: the same first
    difference (where, share, ulps), the same growth per epoch, the same count of layers closer to exact."""
    import math

    from bnaudit import bits
    from bnaudit.compare import Difference
    from bnaudit.report import build, escape, story

    report = build.build_report(list(runs.values()))  # the inputs of `written`
    sentences = story.sentences(report)
    md = (written / "report.md").read_text()
    order = [md.index(h) for h in ("## Findings", "## Environment", "## Runs", "## 1. Divergence heatmaps",
                                   "## 4. The seed's figures")]
    assert order == sorted(order), order  # the story first, then the machines, then the figures
    for sentence in sentences:
        assert escape.markdown(sentence, block_start=True) in md
    assert sentences[0] == story.classes_sentence(report)
    assert any(p.kind == "perturb" for p in report.pairs)  # a pair that differs on every host
    for p in report.pairs:
        text = " ".join(story.pair_sentences(report, p))
        code, out, err = cli("compare", str(report.run(p.a).path), str(report.run(p.b).path), "--json")
        doc = json.loads(out)["pair"]
        assert code == (0 if doc["identical"] else 1), err
        if doc["identical"]:
            assert text == f"{p.b} and {p.a} are bit-identical."
            continue
        first = Difference(**doc["first"])
        assert f"parts from {p.a} {story.at(first.text)}." in text
        if doc["growth_rate"] is not None:
            assert f"grows x{math.exp(doc['growth_rate']):.3g} per epoch" in text
        closer = doc["closer_to_reference"]
        assert closer, "the runs carry the shipped reference: closeness is known"
        n = {side: sum(v == side for v in closer.values()) for side in ("a", "b", "tie")}
        assert (f"more correct bits in {n['a']} of {len(closer)} layers for {p.a}, {n['b']} for {p.b}, "
                f"{n['tie']} tied") in text
    # the fewest correct bits, rounded down: never more than the value itself
    for r in report.runs:
        ref = report.references[r.label]
        value, _ = story.fewest_bits(ref)
        shown = bits.correct_bits_text(value)
        assert float(shown) <= value < float(shown) + 0.1
        assert f"{shown} of {ref.precision}" in md
    env = md[md.index("## Environment"):md.index("## Runs")]
    for r in report.runs:  # the machine and library versions of every run
        e = r.record.fingerprint.environment
        assert escape.markdown(str(e["torch"]), cell=True) in env and str(e["torch_build"]["onednn"]) in env


def test_numpy_forward_matches_torch_float64(runs: dict[str, Path]) -> None:
    """The report's float64 eval-mode forward against torch's own modules (an independent oracle)."""
    import torch

    from bnaudit import bits, frozen, record, runner
    from bnaudit.report import build

    rec = record.load_record(runs["t1"])
    spec = rec.spec
    params = bits.to_float64(rec.arrays["params"][-1], rec.storage)
    buffers = bits.to_float64(rec.arrays["buffers"][-1], rec.storage)
    inputs = frozen.load(spec).inputs
    ours = build.numpy_forward(spec, rec.layout, params, buffers, inputs)

    model = runner.build_model(spec).double().eval()
    sd = model.state_dict()
    flat = np.concatenate([params, buffers])
    offset = 0
    for name, shape in spec.parameters() + spec.buffers():
        n = int(np.prod(shape))
        sd[name].copy_(torch.from_numpy(flat[offset:offset + n].reshape(shape)))
        offset += n
    with torch.no_grad():
        theirs = model(torch.from_numpy(inputs)).numpy()[:, 0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12, err_msg="eval-mode forward differs from torch")


def test_terminal_view(runs: dict[str, Path], cli) -> None:
    code, out, _ = cli("report", str(runs["t1"]), str(runs["t2"]), "--terminal")
    assert code == 0
    assert "Runs" in out and "Classes of bit-identical runs" in out
    assert "log10 max |Δ parameter|" in out  # the coarse heatmap of the differing pair
    assert any(ch in out for ch in "░▒▓█")


def divergence_block(rows: list[int], layers: list[str], bits_of: dict[str, list[float]], cap: int) -> dict:
    """A block in the reference stage's documented schema (bnaudit.divergence/1), built by hand here."""
    import base64

    series = [{"layer": layer, "kind": "linear" if layer.startswith("linear") else "bn", "what": what,
               "half_bits_row": None, "half_bits_kept_row": None}
              for layer in layers for what in ("weights", "activations")]
    table = np.array([bits_of[f"{s['layer']} {s['what']}"] for s in series])
    enc = {"max_abs": "<f4", "max_rel": "<f4", "max_ulps": "<f4", "correct_bits": "<f2"}
    block = {"schema": "bnaudit.divergence/1", "reference": {"spec_hash": "x", "digest": "y", "epochs": rows[-1],
                                                          "precision": 256, "check_precision": 512,
                                                          "agreement_digits_min": 70.0},
             "storage": "float32", "precision_bits": cap, "rows": rows, "series": series, "encoding": enc}
    for metric, dtype in enc.items():
        values = table if metric == "correct_bits" else np.exp2(-table)
        block[metric] = base64.b64encode(np.ascontiguousarray(values.astype(dtype)).tobytes()).decode()
    return block


def real_operator_audit(rec, rows: list[int]) -> dict:
    """The operator audit (bnaudit.audit, torch + mpmath) of a record's own parameters at some rows."""
    import torch

    from bnaudit import audit, bits, controls, frozen, runner

    spec = rec.spec
    config = controls.RunConfig(controls.Controls(), epochs=rec.fingerprint.epochs, audit_every=1)
    observer = audit.OperatorAudit(spec, config)
    x = torch.from_numpy(frozen.load(spec).inputs[: spec.train.batch_size]).float()
    for row in rows:
        model = runner.build_model(spec).train()
        flat = np.concatenate([bits.to_float64(rec.arrays["params"][row], "float32"),
                               bits.to_float64(rec.arrays["buffers"][row], "float32")])
        sd, offset = model.state_dict(), 0
        for name, shape in spec.parameters() + spec.buffers():
            n = int(np.prod(shape))
            sd[name].copy_(torch.from_numpy(flat[offset:offset + n].reshape(shape)))
            offset += n
        observer.observe(row, model, x)
    return observer.result()


def test_reference_and_audit_blocks_are_drawn(runs: dict[str, Path], tmp_path: Path) -> None:
    """Records that carry a reference divergence and an operator audit get their heatmap and audit figure."""
    from bnaudit import record
    from bnaudit.report import writer

    copy = tmp_path / "withref"
    shutil.copytree(runs["t1"], copy)
    rec = record.load_record(copy)
    layers = [name for name, _, _, _ in rec.spec.layers()]
    rows = list(range(EPOCHS + 1))
    bits_of = {f"{layer} {what}": [max(0.0, 24.0 - 2.5 * r - k - (what == "activations")) for r in rows]
               for k, layer in enumerate(layers) for what in ("weights", "activations")}
    meta = json.loads((copy / "record.json").read_text())
    meta["extra"] = {"divergence": divergence_block(rows, layers, bits_of, 24),
                     "operator_audit": real_operator_audit(rec, [0, EPOCHS])}
    reseal(copy, meta)
    out = writer.write_report([copy], tmp_path / "rep")
    names = {Path(f).stem for f in out.files if f.endswith(".png")}
    assert {"heatmap_reference", "operator_audit", "growth"} <= names, names
    ref = out.report.references["float32_t1_native_nondet"]
    assert ref.layers == tuple(layers) and ref.precision == 24
    np.testing.assert_array_equal(ref.correct_bits[:, 1], np.array(bits_of["bn1 weights"], dtype=np.float16))
    aud = out.report.audits["float32_t1_native_nondet"]
    assert list(aud.rows) == [0, EPOCHS] and {"linear.out", "bn.out", "bn.invstd"} <= set(aud.operators)
    # a float32 run's Linear outputs are within a few ulps of exact at their scale (rounding theory)
    assert 0 < aud.operators["linear.out"].max() < 16, aud.operators["linear.out"]
    md = (out.out / "report.md").read_text()
    assert "fewest correct bits (any layer or epoch)" in md


def test_malformed_blocks_are_refused_at_load(runs: dict[str, Path], tmp_path: Path, cli) -> None:
    """A block is decoded once, when its record loads: a malformed one refuses the input, naming it."""
    for extra in ({"divergence": {"schema": "bnaudit.divergence/1", "rows": "x"}}, {"operator_audit": [1, 2]}):
        copy = tmp_path / "odd"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(runs["t1"], copy)
        meta = json.loads((copy / "record.json").read_text())
        meta["extra"] = extra
        reseal(copy, meta)
        code, _, err = cli("report", str(copy), "--out", str(tmp_path / "rep"))
        assert code == ExitCode.BAD_INPUT and str(copy) in err and "block" in err and err.count("\n") == 1, err
        assert not (tmp_path / "rep").exists()


def test_skipped_audit_is_noted(runs: dict[str, Path], tmp_path: Path) -> None:
    from bnaudit.report import build

    copy = tmp_path / "skipped"
    shutil.copytree(runs["t1"], copy)
    meta = json.loads((copy / "record.json").read_text())
    meta["extra"] = {"operator_audit": {
        "schema": "bnaudit.audit/1", "every": 10, "storage": "float32", "rows": [], "errors": {},
        "max_amplification": {}, "flags": [], "n_flags": 0, "thresholds": {"mean_over_std": 100},
        "skipped": "bf16-mixed runs are not audited"}}
    reseal(copy, meta)
    report = build.build_report([copy])
    assert not report.audits
    assert f"{copy}: operator audit skipped (bf16-mixed runs are not audited)" in report.notes, report.notes


def test_perturbed_run_alone_draws_its_own_chaos_floor(runs: dict[str, Path], tmp_path: Path) -> None:
    """A --perturb record carries its twin's divergence (worker block): the 1-ulp line needs no twin input."""
    from bnaudit import record
    from bnaudit.report import writer

    fp = record.load(runs["perturb"])
    assert fp.floor is not None, "the worker records the chaos floor in every perturbed record"
    out = writer.write_report([runs["perturb"]], tmp_path / "rep")
    (label,) = out.report.floors
    assert label == fp.label == "float32_t1_native_nondet_perturb"
    floor = out.report.floors[label]
    assert floor.max_abs[0] > 0 and len(floor.rows) == EPOCHS + 1
    np.testing.assert_array_equal(floor.max_abs, fp.floor.max_abs)
    assert "figures/growth.png" in out.files


def test_matrix_folder_is_read_with_its_labels(runs: dict[str, Path], tmp_path: Path) -> None:
    from bnaudit.report import build

    matrix = tmp_path / "m"
    for name in ("t1", "t2"):
        shutil.copytree(runs[name], matrix / "runs" / f"cfg-{name}")
    (matrix / "matrix.json").write_text(json.dumps({"runs": [{"folder": "runs/cfg-t1"}, {"folder": "runs/cfg-t2"}]}))
    report = build.build_report([matrix])
    assert [r.label for r in report.runs] == ["cfg-t1", "cfg-t2"]
    assert len(report.classes) == 2 and len(report.pairs) == 1


# --------------------------------------------------------------------------- refusals


def test_different_specs_are_refused_with_exit_4(runs: dict[str, Path], make_run, tmp_path: Path, cli) -> None:
    spec = tmp_path / "other.toml"
    spec.write_text("[model]\nbn_eps = 1e-3\n")
    other = make_run(2, spec_path=spec)
    out = tmp_path / "rep"
    code, _, err = cli("report", str(runs["t1"]), str(other), "--out", str(out))
    assert code == ExitCode.MISMATCH == 4
    assert err.count("\n") == 1, err
    assert str(other) in err and "spec" in err
    assert not out.exists()
    # A matrix of two experiment variants is refused with the way out; one variant's folder is reported.
    matrix = tmp_path / "m"
    shutil.copytree(runs["t1"], matrix / "runs" / "bn" / "float32_t1_native_nondet")
    shutil.copytree(other, matrix / "runs" / "eps" / "float32_t1_native_nondet")
    code, _, err = cli("report", str(matrix), "--out", str(out))
    assert code == 4 and "MATRIX/runs/bn" in err and err.count("\n") == 1, err
    code, _, err = cli("report", str(matrix / "runs" / "bn"), "--out", str(out))
    assert code == 0, err
    assert (out / "index.html").is_file()


def test_missing_run_is_named_with_exit_3(tmp_path: Path, cli, runs: dict[str, Path]) -> None:
    missing = tmp_path / "no-such-run"
    code, _, err = cli("report", str(runs["t1"]), str(missing), "--out", str(tmp_path / "rep"))
    assert code == ExitCode.BAD_INPUT == 3
    assert str(missing) in err and err.count("\n") == 1
    assert not (tmp_path / "rep").exists()


def test_partial_run_is_named_with_exit_3(tmp_path: Path, cli, runs: dict[str, Path]) -> None:
    partial = tmp_path / "half"
    shutil.copytree(runs["t1"], partial)
    (partial / "record.json").unlink()  # what an interrupted write leaves: arrays without record.json
    code, _, err = cli("report", str(partial), "--out", str(tmp_path / "rep"))
    assert code == 3 and str(partial) in err and err.count("\n") == 1


def test_matrix_with_missing_or_partial_run_is_named(tmp_path: Path, cli, runs: dict[str, Path]) -> None:
    matrix = tmp_path / "m"
    shutil.copytree(runs["t1"], matrix / "runs" / "a")
    (matrix / "matrix.json").write_text(json.dumps({"runs": [{"folder": "runs/a"}, {"folder": "runs/b"}]}))
    code, _, err = cli("report", str(matrix), "--out", str(tmp_path / "rep"))
    assert code == 3 and str(matrix / "runs" / "b") in err and "missing" in err
    leftover = matrix / "runs" / ".b.partial-x1"
    leftover.mkdir()
    (matrix / "matrix.json").write_text(json.dumps({"runs": [{"folder": "runs/a"}]}))
    code, _, err = cli("report", str(matrix), "--out", str(tmp_path / "rep"))
    assert code == 3 and str(leftover) in err and "partial" in err


def test_existing_output_needs_force(tmp_path: Path, cli, runs: dict[str, Path]) -> None:
    out = tmp_path / "rep"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("report", str(runs["t1"]), "--out", str(out))
    assert code == ExitCode.OUTPUT == 5 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_report_without_out_or_terminal_is_a_usage_error(cli, runs: dict[str, Path]) -> None:
    code, _, err = cli("report", str(runs["t1"]))
    assert code == ExitCode.USAGE and "--out" in err


# --------------------------------------------------------------------------- no torch, properties


def test_report_code_imports_neither_torch_nor_mpmath() -> None:
    code = ("import sys; import bnaudit.report.model, bnaudit.report.build, bnaudit.report.tables, "
            "bnaudit.report.figures, bnaudit.report.html, bnaudit.report.markdown, bnaudit.report.terminal, "
            "bnaudit.report.writer, bnaudit.cli.report; "
            "bad = [m for m in ('torch', 'mpmath') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


FORMATS = ("figures", "html", "markdown", "terminal")


def report_imports() -> dict[str, set[str]]:
    """bnaudit.report module -> the bnaudit.report modules it imports anywhere in its file (functions too)."""
    import ast

    folder = Path(__file__).resolve().parent.parent / "bnaudit" / "report"
    names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    out: dict[str, set[str]] = {}
    for name in names:
        found: set[str] = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "bnaudit.report":
                found.update(a.name for a in node.names if a.name in names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnaudit.report."):
                found.add(node.module.rpartition(".")[2])
            elif isinstance(node, ast.Import):
                found.update(a.name.rpartition(".")[2] for a in node.names if a.name.startswith("bnaudit.report."))
        out[name] = found - {name}
    return out


def test_formats_depend_only_on_the_model_and_tables() -> None:
    """pip-audit's formats and diffoscope's presenters: no format imports another, nor the build or the writer.

    ``escape`` (untrusted text made literal for each output) and ``console`` (the one
    terminal policy) are leaves every view may use; ``story`` (the findings in sentences)
    reads the model alone, and every view and the tables may use it.
    """
    graph = report_imports()
    assert graph["model"] == set(), graph["model"]
    assert graph["escape"] == set(), graph["escape"]
    assert graph["console"] == set(), graph["console"]
    assert graph["story"] <= {"model"}, graph["story"]
    assert graph["tables"] <= {"model", "story"}, graph["tables"]
    for name in FORMATS:
        assert graph[name] <= {"model", "tables", "story", "escape", "console"}, \
            f"{name} imports {sorted(graph[name])}"
    assert graph["build"] <= {"model"}, graph["build"]
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, "import cycle in bnaudit.report: " + " -> ".join((*path, node))
        if node not in done:
            for nxt in sorted(graph[node]):
                visit(nxt, (*path, node))
            done.add(node)

    for node in sorted(graph):
        visit(node, ())


def test_class_colours_stay_apart_and_their_text_reads() -> None:
    """The colours HTML swatches and figures share: matplotlib's tab10 first, then ten more; every pair apart in
    CIELAB (computed here from the CIE formulas), each visible on white, its text at 4.5:1 or more."""
    import itertools

    import matplotlib.pyplot as plt
    from matplotlib import colors as mcolors

    from bnaudit.report.tables import CLASS_COLOURS, contrast, text_colour

    tab10 = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]
    assert CLASS_COLOURS[:10] == tuple(mcolors.to_hex(c) for c in tab10) and len(set(CLASS_COLOURS)) == 20

    def lab(colour: str) -> tuple[float, float, float]:
        rgb = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in mcolors.to_rgb(colour)]
        xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ rgb
        f = [t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116
             for t in xyz / np.array([0.95047, 1.0, 1.08883])]
        return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])

    closest = min(math.dist(lab(a), lab(b)) for a, b in itertools.combinations(CLASS_COLOURS, 2))
    assert closest >= 25, closest  # tab20, the palette before, had two colours 16.6 apart

    for colour in CLASS_COLOURS:
        assert contrast(colour, "#ffffff") >= 2.0, colour  # a line of it shows on the page (tab20's least: 1.45)
        assert contrast(colour, text_colour(colour)) >= 4.5, colour  # a class letter on it reads
    assert round(contrast("#000000", "#ffffff"), 6) == 21.0 and contrast("#777777", "#777777") == 1.0

def test_runs_are_labelled_by_their_fingerprint(runs: dict[str, Path], tmp_path: Path) -> None:
    """One configuration label everywhere: ``Fingerprint.label`` (an emulated CPU keeps its model's case)."""
    import dataclasses

    from bnaudit import controls
    from bnaudit.report import build, model

    assert model.CONTROL_KEYS == tuple(f.name for f in dataclasses.fields(controls.Controls))
    copy = tmp_path / "haswell"
    shutil.copytree(runs["t1"], copy)
    meta = json.loads((copy / "record.json").read_text())
    meta["config"]["controls"]["cpu_model"] = "Haswell"
    reseal(copy, meta)
    report = build.build_report([runs["t1"], copy])
    assert [r.label for r in report.runs] == ["float32_t1_native_nondet", "float32_t1_native_nondet_cpu-Haswell"]
    assert report.varying_controls == ["cpu_model"]
    assert report.runs[1].config_text.endswith("cpu_model Haswell")
    assert [c.members for c in report.classes] == [("float32_t1_native_nondet",
                                                    "float32_t1_native_nondet_cpu-Haswell")]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 800))
def test_class_names_are_unique_and_short(n: int) -> None:
    from bnaudit.report.build import _class_names

    names = _class_names(n)
    assert len(set(names)) == n and all(1 <= len(x) <= 3 and x.isupper() for x in names)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3000), layers=st.integers(1, 12), seed=st.integers(0, 2**32 - 1),
       nan_share=st.floats(0, 1))
def test_terminal_heatmap_partitions_epochs(rows: int, layers: int, seed: int, nan_share: float) -> None:
    from bnaudit.report.terminal import COLUMNS, epoch_bins, heatmap_lines

    bins = epoch_bins(rows)
    assert 1 <= len(bins) <= COLUMNS
    assert np.array_equal(np.concatenate(bins), np.arange(rows)), "bins must cover every epoch row once, in order"
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, layers))
    values[rng.random((rows, layers)) < nan_share] = np.nan
    names = tuple(f"layer{i}" for i in range(layers))
    lines = heatmap_lines(values, np.arange(rows), names, -3.0, 3.0)
    assert len(lines) == layers + 1
    assert {len(line.plain) for line in lines} == {len(names[-1]) + 1 + len(bins)}


# --------------------------------------------------------------------------- the page in a browser


@pytest.mark.skipif(CHROMIUM is None,
                    reason="chromium is not installed (Debian package 'chromium'); .ci/run installs it")
def test_html_renders_in_headless_chromium(written: Path, tmp_path: Path) -> None:
    """Screenshot the page, and check in the live DOM that every figure decoded (naturalWidth > 0)."""
    shot = tmp_path / "shot.png"
    run = subprocess.run([*chromium_args(tmp_path / "profile1"), f"--screenshot={shot}", "--window-size=1400,2400",
                          "--hide-scrollbars", (written / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"no screenshot: {run.stderr[-600:]}"
    width, height = png_size(shot)
    assert (width, height) == (1400, 2400)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels[..., :3].std() > 0.05, "the screenshot is blank"

    # A probe page beside index.html (same relative figure paths) records each image's decoded size.
    probe = written.parent / "probe.html"
    script = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
              "{ img.setAttribute('data-natural', img.naturalWidth + 'x' + img.naturalHeight); } "
              "document.body.setAttribute('data-loaded', document.images.length); });</script>")
    page = (written / "index.html").read_text().replace("</body>", script + "</body>")
    probe.write_text(page.replace('src="figures/', f'src="{written.name}/figures/'))
    try:
        dom = subprocess.run([*chromium_args(tmp_path / "profile2"), "--virtual-time-budget=10000", "--dump-dom",
                              probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    finally:
        probe.unlink()
    images = re.findall(r'<img [^>]*src="[^"]*/figures/([^"]+)"[^>]*>', dom)
    assert images, "no figures in the rendered DOM"
    assert f'data-loaded="{len(images)}"' in dom, "the load handler did not run"
    for tag in re.findall(r"<img [^>]*>", dom):
        natural = re.search(r'data-natural="(\d+)x(\d+)"', tag)
        name = re.search(r'src="([^"]+)"', tag)
        assert natural and int(natural.group(1)) > 0 and int(natural.group(2)) > 0, f"not loaded: {name and name[1]}"
        w, h = png_size(written / "figures" / Path(name[1]).name)  # type: ignore[index]
        assert (int(natural.group(1)), int(natural.group(2))) == (w, h)
