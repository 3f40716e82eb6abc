"""Untrusted text in every output: shown literally, never interpreted, and the JUnit XML always valid.

The escaping functions (``bnaudit.report.escape``) are checked against independent
readers of each format: rich's own console, markdown-it (CommonMark with GitHub's
tables and strikethrough), Python's HTML parser, ElementTree and matplotlib.  Then real
runs whose paths, folder names, spec name and environment carry markup and control
characters go through ``run``, ``compare``, ``report`` and the JUnit of ``check``.
"""

from __future__ import annotations

import dataclasses
import html as html_lib
import io
import json
import re
import shutil
import warnings
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from bnaudit.report import escape

MD = MarkdownIt("commonmark").enable(["table", "strikethrough"])
"""CommonMark (raw HTML on) with GitHub's tables and strikethrough: the reader of report.md and --markdown."""

SYNTAX = "\\`*_<>[]()!#|~$&:;=+-.\"' \t/"
"""Characters of Markdown, HTML, rich markup and mathtext, weighted into the generated text."""
HOSTILE_TEXT = st.text(st.one_of(st.sampled_from(SYNTAX), st.sampled_from("ab1é_"), st.characters()), max_size=40)
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
"""Every code point, lone surrogates and the characters XML 1.0 forbids included."""

ORDINARY = ["t1", "reports/runs/float32_t1_native_nondet-2351aff3-20250101T000000Z", "float32_t1_native_nondet",
            "effective.threadpools[libgomp].num_threads", "linear1.weight[0,0]:+1", "env.OMP_NUM_THREADS",
            "float32, 1 thread(s), isa native, non-deterministic", "bn-noisy-feature (spec 2351aff3d25e)",
            "final max |Δ parameter|", "epoch 0, step 0, phase forward, layer bn1, tensor bn1.out", "-", "24.0 of 24",
            "config.perturb.index: None -> [0, 0]", "/tmp/esc/base.json", "class(es) of bit-identical results"]
"""Plain paths, names and the tables' own words: every function must leave them as they are."""


class _Html(HTMLParser):
    """The tags and the text of an HTML fragment, as a browser reads them."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.chunks: list[str] = []
        self.feed(source)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def shown(text: str) -> str:
    """What a reader of any format must see for ``text``: its characters, controls as visible escapes."""
    return escape.printable(text)


def trimmed(text: str) -> bool:
    """Markdown drops leading and trailing spaces of a paragraph or a cell; the tests keep to text without."""
    return text == text.strip() != ""


# --------------------------------------------------------------------------- the functions


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_left_as_it_is(text: str) -> None:
    assert escape.printable(text) == text
    assert escape.terminal(text).plain == text
    assert escape.markdown(text) == text
    assert escape.markdown(text, block_start=True) == (text if text != "-" else "\\-")  # "- -": a nested list
    assert escape.markdown(text, cell=True) == text.replace("|", "\\|")
    assert escape.markdown_code(text) == f"`{text}`"
    assert escape.html(text) == html_lib.escape(text)  # what the page always wrote
    assert escape.xml(text) == escape.xml(text, multiline=True) == text
    assert escape.figure_text(text) == text


@given(ANY_TEXT)
def test_printable_is_one_visible_line(text: str) -> None:
    out = escape.printable(text)
    assert out.isprintable(), repr(out)
    assert escape.printable(out) == out
    if text.isprintable():
        assert out == text


@pytest.mark.parametrize(("text", "visible"), [
    ("a\x1b[31mb", "a\\x1b[31mb"), ("line\nnext", "line\\nnext"), ("\x00\x07\x7f\x9b", "\\x00\\x07\\x7f\\x9b"),
    ("\u202edcba", "\\u202edcba"), ("tab\there", "tab\\there"), ("\ud800", "\\ud800")])
def test_controls_become_their_python_escapes(text: str, visible: str) -> None:
    assert escape.printable(text) == visible


@given(HOSTILE_TEXT)
def test_rich_prints_terminal_text_literally(text: str) -> None:
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=10_000, force_terminal=True, color_system="truecolor")
    console.print(escape.terminal(text), no_wrap=True, overflow="crop")
    assert buf.getvalue() == shown(text) + "\n", "rich read markup or emoji, or a control character came through"


@given(HOSTILE_TEXT.filter(trimmed))
def test_markdown_text_renders_as_itself(text: str) -> None:
    page = _Html(MD.render(escape.markdown(text, block_start=True)))
    assert page.tags == ["p"], f"{text!r} became {page.tags}"
    assert page.text == shown(text) + "\n"


@given(HOSTILE_TEXT.filter(trimmed))
def test_markdown_cell_renders_as_itself(text: str) -> None:
    rendered = MD.render(f"| a | b |\n|---|---|\n| {escape.markdown(text, cell=True)} | x |\n")
    tags = _Html(rendered).tags
    assert tags == ["table", "thead", "tr", "th", "th", "tbody", "tr", "td", "td"], f"{text!r}: {tags}"
    assert [html_lib.unescape(c) for c in re.findall(r"<td>(.*?)</td>", rendered)] == [shown(text), "x"]


@given(HOSTILE_TEXT.filter(bool))
def test_markdown_code_span_holds_the_text(text: str) -> None:
    page = _Html(MD.render(f"see {escape.markdown_code(text)} here"))
    assert page.tags == ["p", "code"], f"{text!r}: {page.tags}"
    code = re.fullmatch(r"<p>see <code>(.*)</code> here</p>\n", MD.render(f"see {escape.markdown_code(text)} here"),
                        re.S)
    assert code is not None and html_lib.unescape(code.group(1)) == shown(text)


@given(HOSTILE_TEXT.filter(lambda t: t and "|" not in t))
def test_markdown_code_span_in_a_cell(text: str) -> None:
    # (a | in a cell's code span is written \|: GitHub reads it as |, markdown-it keeps the backslash)
    rendered = MD.render(f"| a |\n|---|\n| {escape.markdown_code(text, cell=True)} |\n")
    code = re.search(r"<td><code>(.*)</code></td>", rendered, re.S)
    assert code is not None and html_lib.unescape(code.group(1)) == shown(text), rendered


def test_markdown_link_text_and_block_starts() -> None:
    for text in ("a] (b", "x](javascript:alert(1))", "[y]", "![z](w)"):
        rendered = MD.render(f"![{escape.markdown(text, link=True)}](figures/a.png)")
        assert re.fullmatch(r'<p><img src="figures/a.png" alt="(.*)" /></p>\n', rendered), rendered
        assert html_lib.unescape(re.search(r'alt="(.*)"', rendered).group(1)) == text  # type: ignore[union-attr]
    for text in ("# heading", "- item", "+ item", "1. first", "2) second", "[ref]: /url", "> quote", "---"):
        assert _Html(MD.render(f"- {escape.markdown(text, block_start=True)}")).tags == ["ul", "li"], text


@given(ANY_TEXT)
def test_html_text_is_text(text: str) -> None:
    page = _Html(f"<p title=\"{escape.html(text)}\">{escape.html(text)}</p>")
    assert page.tags == ["p"] and page.text == shown(text)


@given(ANY_TEXT)
def test_xml_is_always_well_formed(text: str) -> None:
    root = ET.Element("case", name=escape.xml(text))
    root.text = escape.xml(text + "\n" + text, multiline=True)
    back = ET.fromstring(ET.tostring(root, encoding="unicode"))
    assert back.get("name") == shown(text)
    assert back.text == "\n".join(shown(line) for line in f"{text}\n{text}".split("\n"))  # its own lines kept


@settings(max_examples=25, deadline=None)
@given(HOSTILE_TEXT)
def test_figure_text_is_drawn_as_it_is(text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    label = ax.set_title(escape.figure_text(text))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig.savefig(io.BytesIO(), format="png")
        # A glyph the font lacks is named in a warning: it must be a visible character, never a raw control.
        assert all(str(w.message).isprintable() for w in caught), [str(w.message) for w in caught]
        # matplotlib's own reading of the string: (what it draws, whether as mathtext)
        assert label._preprocess_math(label.get_text()) == (shown(text), False)  # type: ignore[attr-defined]
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- real records

SPEC_NAME = "[bold]x\x1b[31m :smile: $a$ <i>&amp;</i> `t` *e* _u_ | p"
"""A spec name (any string the spec loader takes): rich markup, an ANSI colour, an emoji code, HTML, Markdown."""
FOLDER_A = "[bold]r\x1b[31m\n:smile: $\\frac$ <i>i `t` *e* |p &amp;"
"""A folder name: markup, controls, an emoji code, a formula mathtext cannot parse, HTML, Markdown."""
FOLDER_A2 = "a2 [blink]\x1b[5m\x07"
FOLDER_B = "[red]q\x1b]0;t\x07\x0b\x1f"
CPU_MODEL = "[red]EVIL\x1b]0;t\x07 <script>x</script> `c` *e* |"
ENV_KEY, ENV_VALUE = "X[/b]\x1b[2J", "v[i]\x00"
HTML_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "dl", "dt", "dd", "nav", "ul", "li", "a",
             "table", "thead", "tbody", "tr", "th", "td", "span", "p", "figure", "img", "figcaption", "b"}
"""Every tag index.html writes itself."""
MD_TAGS = {"h1", "h2", "h3", "p", "ul", "li", "strong", "em", "code", "img", "table", "thead", "tbody", "tr", "th",
           "td", "br"}
"""Every tag the Markdown of report.md and compare --markdown renders to."""


def one_visible_text(out: str) -> None:
    """Terminal output holds no raw control character: each line is printable."""
    bad = [line for line in out.split("\n") if not line.isprintable()]
    assert not bad, f"raw control characters reach the terminal: {bad[:3]!r}"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """Real 2-epoch runs of a spec with a hostile name, in hostile folders; b's record also names a hostile CPU.

    a and a2 are bit-identical (a2 is a copy of a's folder), so the report labels them by folder name;
    b runs 2 threads, so it differs from a, and its environment (edited, record resealed) differs too.
    """
    import contextlib

    from bnaudit import record
    from bnaudit.cli import main

    root = tmp_path_factory.mktemp("hostile")
    spec = root / "hostile.toml"
    spec.write_text(f"name = {json.dumps(SPEC_NAME)}\n", encoding="utf-8")  # JSON's \u001b is TOML's too
    a, a2, b = root / FOLDER_A, root / FOLDER_A2, root / FOLDER_B
    printed = io.StringIO()
    with contextlib.chdir(root), contextlib.redirect_stdout(printed):  # --out as typed: the folder name alone
        assert main(["run", "--epochs", "2", "--audit-every", "1", "--spec", str(spec), "--out", FOLDER_A]) == 0
        assert main(["run", "--epochs", "2", "--audit-every", "0", "--threads", "2", "--spec", str(spec),
                     "--out", FOLDER_B]) == 0
    shutil.copytree(a, a2)
    meta = json.loads((b / "record.json").read_text(encoding="utf-8"))
    meta["environment"]["cpu_model"] = CPU_MODEL
    meta["environment"]["environment"][ENV_KEY] = ENV_VALUE
    meta["content_sha256"] = record.record_sha256(meta)  # sealed, as a run on that machine would have written it
    (b / "record.json").write_text(json.dumps(meta), encoding="utf-8")
    return {"a": a, "a2": a2, "b": b, "spec": spec, "run_output": printed.getvalue()}


@pytest.mark.parametrize("out", ["job[/tmp]/r", "[nightly]/r"])
def test_run_out_path_is_printed_literally(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str) -> None:
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli("run", "--epochs", "1", "--audit-every", "0", "--out", out)
    assert code == 0, stderr
    assert (tmp_path / out / "record.json").is_file()
    assert f" {out} " in next(line for line in stdout.splitlines() if "record" in line), stdout


def test_run_of_a_hostile_spec_and_folder(hostile) -> None:
    out = str(hostile["run_output"])
    one_visible_text(out)
    records = [line for line in out.splitlines() if line.startswith("record ")]
    assert len(records) == 2
    assert f" {shown(FOLDER_A)} " in records[0] and f" {shown(FOLDER_B)} " in records[1], records


def test_compare_shows_hostile_text_literally(cli, hostile, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per fact: the checks below read whole values
    a, b, a2 = (str(hostile[k]) for k in ("a", "b", "a2"))
    code, out, err = cli("compare", a, b)
    assert code == 1, err
    one_visible_text(out)
    for text in (f"  a  {a}  (float32_t1_native_nondet)", f"  b  {b}  (float32_t2_native_nondet)", CPU_MODEL,
                 "env." + ENV_KEY, ENV_VALUE):
        assert shown(text) in out, f"{shown(text)!r} not in the output"

    code, out, _ = cli("compare", "--markdown", a, b)
    page = _Html(MD.render(out))
    assert set(page.tags) <= MD_TAGS, f"Markdown injected {set(page.tags) - MD_TAGS}"
    for text in (a, b, CPU_MODEL, ENV_VALUE):
        assert shown(text) in page.text

    code, out, _ = cli("compare", "--json", a, b)
    one_visible_text(out)
    diff = {k: (va, vb) for k, va, vb in json.loads(out)["pair"]["environment_diff"]}
    assert diff["environment.cpu_model"][1] == CPU_MODEL  # JSON carries the value itself
    assert json.loads(out)["pair"]["a"] == a

    code, out, _ = cli("compare", a, b, a2)
    assert code == 1
    one_visible_text(out)
    for text in (f"    {a}  (", f"    {a2}  (", f"    {b}  ("):
        assert shown(text) in out
    code, out, _ = cli("compare", "--markdown", a, b, a2)
    page = _Html(MD.render(out))
    assert set(page.tags) <= MD_TAGS, f"Markdown injected {set(page.tags) - MD_TAGS}"
    assert all(shown(p) in page.text for p in (a, a2, b))


def test_report_shows_hostile_text_literally(cli, hostile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    a, b, a2 = (str(hostile[k]) for k in ("a", "b", "a2"))
    label_a = f"float32_t1_native_nondet ({FOLDER_A})"  # the folder names the run: a2 has the same configuration
    code, out, err = cli("report", "--terminal", a, b, a2)
    assert code == 0, err
    one_visible_text(out)
    for text in (f"bnaudit report: experiment {SPEC_NAME}", label_a, f"float32_t1_native_nondet ({FOLDER_A2})"):
        assert shown(text) in out, f"{shown(text)!r} not in the output"

    folder = tmp_path / "rep"
    code, out, err = cli("report", "--out", str(folder), a, b, a2)
    assert code == 0, err
    one_visible_text(out + err)  # matplotlib's warnings too: a missing glyph would quote the raw character
    page = _Html(MD.render((folder / "report.md").read_text(encoding="utf-8")))
    assert set(page.tags) <= MD_TAGS, f"report.md injected {set(page.tags) - MD_TAGS}"
    for text in (SPEC_NAME, label_a, a, b, "classes of bit-identical results (A: " + label_a):
        assert shown(text) in page.text, f"{shown(text)!r} not in report.md as text"
    page = _Html((folder / "index.html").read_text(encoding="utf-8"))
    assert set(page.tags) <= HTML_TAGS, f"index.html injected {set(page.tags) - HTML_TAGS}"
    for text in ("bnaudit report: " + SPEC_NAME, label_a, a, b):
        assert shown(text) in page.text, f"{shown(text)!r} not in index.html as text"


@pytest.fixture(scope="module")
def checked(hostile, tmp_path_factory: pytest.TempPathFactory):
    """A real check of b against a baseline made from a: drift, with b's hostile path and environment."""
    from bnaudit import gate

    base = tmp_path_factory.mktemp("baseline") / "base.json"
    gate.make_baseline(base, source=Path(hostile["a"]))
    return gate.check([base], records=[Path(hostile["b"])])


def test_check_outputs_of_a_hostile_record(checked, hostile) -> None:
    from bnaudit.report import ci_summary, junit

    assert not checked.passed
    lines = ci_summary.lines(checked)
    one_visible_text("\n".join(lines))
    assert "environment.cpu_model: AMD" in lines[0] and "[red]EVIL\\x1b]0;t\\x07 <script>" in lines[0]
    root = ET.fromstring(junit.to_xml(checked))
    failure = root.find("testsuite/testcase/failure")
    assert failure is not None and failure.get("message") == lines[0]
    assert f"run: {shown(hostile['b'])} (2 epochs compared)" in (failure.text or "")
    page = _Html(MD.render(ci_summary.markdown(checked)))
    assert set(page.tags) <= MD_TAGS | {"h2", "details", "summary"}, page.tags
    assert "[red]EVIL\\x1b]0;t\\x07 <script>" in page.text


@settings(max_examples=60, deadline=None)
@given(name=ANY_TEXT, path=ANY_TEXT, key=ANY_TEXT, value=ANY_TEXT, tensor=ANY_TEXT)
def test_junit_is_valid_xml_whatever_the_strings(checked, name: str, path: str, key: str, value: str,
                                                 tensor: str) -> None:
    from bnaudit.report import junit

    case = checked.cases[0]
    first = dataclasses.replace(case.first, layer=tensor, tensor=tensor) if case.first is not None else None
    odd = dataclasses.replace(case, name=name, dtype=name, baseline=path, candidate=path, accepted_by=path or None,
                              first=first, environment_diff=((key, value, path), *case.environment_diff))
    result = dataclasses.replace(checked, cases=(odd, case), accept_classes=(path,))
    root = ET.fromstring(junit.to_xml(result, timestamp=value))
    assert root.find("testsuite/testcase").get("name") == shown(name)  # type: ignore[union-attr]


def test_audit_table_of_a_hostile_block(hostile) -> None:
    """Layer names and fields of a decoded block (read from a file) are never markup in `bnaudit run`'s tables."""
    from rich.console import Console

    from bnaudit import record
    from bnaudit.report import reference_view

    block = record.load_record(Path(hostile["a"])).fingerprint.audit
    assert block is not None
    layer = next(iter(block.errors))
    odd = dataclasses.replace(block, storage="[/x]\x1b[31m", errors={"[bold]l\x1b[2J :smile:": block.errors[layer]})
    buf = io.StringIO()
    reference_view.render_audit(odd, out=Console(file=buf, width=400))
    one_visible_text(buf.getvalue())
    assert "([/x]\\x1b[31m)" in buf.getvalue() and "[bold]l\\x1b[2J :smile:" in buf.getvalue()


def test_env_table_of_a_hostile_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from bnaudit.report import run_summary

    buf = io.StringIO()
    monkeypatch.setattr(run_summary, "console", Console(file=buf, width=400))
    run_summary.render_env({"cpu_model": "job[/tmp] :smile:", "environment": {"OMP[/b]": "1\x1b[2J"}})
    one_visible_text(buf.getvalue())
    assert "job[/tmp] :smile:" in buf.getvalue() and "OMP[/b]=1\\x1b[2J" in buf.getvalue()
