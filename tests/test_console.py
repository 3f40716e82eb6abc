"""Output that survives CI logs: at 80 columns off a terminal, no digest, path or name is cut.

Each command runs as a user pipes it (``bnaudit ... | cat``, COLUMNS=80), on record folders
whose path is longer than the terminal is wide.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from rich.table import Table

from bnaudit.report import console as console_policy

LONG = "a-record-folder-whose-name-alone-is-wider-than-an-eighty-column-terminal-" * 2


def _bnaudit(*args: str, codes: tuple[int, ...] = (0,)) -> str:
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("FORCE_COLOR", None)
    done = subprocess.run([sys.executable, "-m", "bnaudit", *args], capture_output=True, text=True, env=env)
    assert done.returncode in codes, done.stderr
    return done.stdout


def _whole(text: str, *tokens: str) -> None:
    """Nothing elided (rich's ellipsis ends a cut word; the legend's "a … b" is a range); every token on a line."""
    assert not re.search(r"\w…", text), text
    lines = text.splitlines()
    for token in tokens:
        assert any(token in line for line in lines), f"{token!r} is cut in:\n{text}"


@pytest.fixture(scope="module")
def long_runs(make_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    a = shutil.copytree(make_run(3), root / f"{LONG}a")
    b = shutil.copytree(make_run(3, perturb="linear1.weight[0,0]:1"), root / f"{LONG}b")
    return a, b


def test_run_prints_the_whole_fingerprint_and_record_path(tmp_path):
    out = tmp_path / LONG
    text = _bnaudit("run", "--dtype", "float32", "--epochs", "2", "--audit-every", "0", "--out", str(out))
    digest = json.loads((out / "fingerprint.json").read_text())["digest"]
    assert len(digest) == 64
    _whole(text, digest, str(out), "linear6")


def test_compare_prints_both_paths_whole(long_runs):
    a, b = long_runs
    text = _bnaudit("compare", str(a), str(b), codes=(1,))
    _whole(text, str(a), str(b), "DIFFERENT")


def test_report_on_the_terminal_keeps_every_name(long_runs):
    a, b = long_runs
    text = _bnaudit("report", str(a), str(b), "--terminal")
    _whole(text, "float32_t1_native_nondet_perturb", "Classes of bit-identical runs")
    head = [ln for ln in text.splitlines() if " vs " in ln]
    assert head and "float32_t1_native_nondet_perturb" in head[0], f"the heatmap's title is cut:\n{text}"


def test_matrix_prints_its_folder_whole(tmp_path):
    out = tmp_path / LONG
    text = _bnaudit("matrix", "--dtype", "float32", "--threads", "1", "--epochs", "2", "--audit-every", "0",
                    "--out", str(out))
    _whole(text, str(out))


def test_env_is_not_cut():
    _whole(_bnaudit("env"))


def test_baseline_and_check_print_paths_and_verdicts_whole(long_runs, tmp_path):
    a, b = long_runs
    base = tmp_path / f"{LONG}.json"
    text = _bnaudit("baseline", "create", "--record", str(a), "--out", str(base))
    digest = json.loads((a / "fingerprint.json").read_text())["digest"]
    _whole(text, str(base), digest[:16])
    text = _bnaudit("check", "--baseline", str(base), "--record", str(b), codes=(1,))
    _whole(text, str(base), "drift beyond exact", "tensor linear1.weight", "config.perturb.tensor")


def test_reference_verify_and_report_print_their_folders_whole(long_runs, tmp_path):
    from bnaudit import frozen

    shipped = frozen.shipped_root() / "mpmath"
    (folder,) = [f for f in shipped.iterdir() if f.is_dir() and not f.name.startswith(".")]
    copy = shutil.copytree(folder, tmp_path / LONG)
    text = _bnaudit("reference", "verify", "--reference", str(copy), "--epochs", "1", "--random-rows", "0")
    _whole(text, str(copy), "match bit for bit")
    report = tmp_path / f"{LONG}report"
    _whole(_bnaudit("report", *map(str, long_runs), "--out", str(report)), str(report))


def test_a_table_wider_than_the_console_keeps_its_cells_and_shape(capsys):
    console = console_policy.Console(width=80, force_terminal=False)
    table = Table(title="t")
    table.add_column("key")
    table.add_column("value")
    table.add_row("fingerprint", "f" * 64)
    table.add_row("record", "/" + "d" * 90)
    console.print(table)
    lines = capsys.readouterr().out.splitlines()
    assert any("f" * 64 in ln for ln in lines) and any("/" + "d" * 90 in ln for ln in lines)
    widths = {len(ln) for ln in lines[1:]}  # below the title every line of the table is as wide
    assert len(widths) == 1 and widths.pop() > 80
    assert console.width == 80, "the console's own width is restored"


def test_text_is_emitted_whole_not_wrapped(capsys):
    console = console_policy.Console(width=80, force_terminal=False)
    line = "path " + "/x" * 60
    console.print(line)
    assert capsys.readouterr().out == line + "\n"
