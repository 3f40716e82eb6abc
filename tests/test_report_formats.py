"""`bnaudit report`'s figure formats (SVG and 2x PNG) and its single self-contained HTML file."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bnaudit.errors import ExitCode

EPOCHS = 3  # the same requests as tests/test_report.py and test_compare*.py: made once per session
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SVG_NS = "{http://www.w3.org/2000/svg}"


# --------------------------------------------------------------------------- helpers


class _Page(HTMLParser):
    """Every tag's attributes, in order, as the browser's parser reads them."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def images(self) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == "img"]

    def links(self) -> list[str]:
        """Every URL the page refers to (src, href), whatever the tag."""
        return [v for _, a in self.tags for k, v in a.items() if k in ("src", "href", "srcset") and v is not None]


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks, after checking its signature and every CRC with plain Python."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    offset, chunks = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        offset += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", [k for k, _ in chunks]
    return chunks


def decoded_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG after decoding every pixel (PIL), not only its header."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size


def svg_root(data: bytes) -> ET.Element:
    """The SVG document's root element, after parsing the whole document as XML."""
    root = ET.fromstring(data)
    assert root.tag == f"{SVG_NS}svg", root.tag
    return root


def points(value: str | None) -> float:
    assert value is not None and value.endswith("pt"), value
    return float(value[:-2])


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runs(make_run) -> list[Path]:
    """Real short runs of two classes and a 1-ulp perturbed twin: every section of the report has a figure."""
    return [make_run(EPOCHS), make_run(EPOCHS, threads=2), make_run(EPOCHS, perturb="linear1.weight[0,0]:1")]


def _report(runs: list[Path], out: Path, *extra: str) -> Path:
    from bnaudit.cli import main

    assert main(["report", *(str(p) for p in runs), "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def folder(runs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _report(runs, tmp_path_factory.mktemp("formats") / "rep")


@pytest.fixture(scope="module")
def single(runs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _report(runs, tmp_path_factory.mktemp("single") / "report.html", "--single-file")


# --------------------------------------------------------------------------- the folder's figures


def test_every_figure_is_written_as_svg_and_as_png(folder: Path) -> None:
    pngs = {p.stem for p in (folder / "figures").glob("*.png")}
    svgs = {p.stem for p in (folder / "figures").glob("*.svg")}
    assert pngs == svgs and {"seed_overlay", "heatmap_pairs", "growth", "bn_conditioning", "matrix_grid"} <= pngs
    assert {p.suffix for p in (folder / "figures").iterdir()} == {".png", ".svg"}
    page = _Page((folder / "index.html").read_text(encoding="utf-8"))
    shown = [a["src"] for a in page.images()]
    assert sorted(shown) == sorted(f"figures/{n}.png" for n in pngs), shown  # the page shows the PNGs
    assert sorted(x for x in page.links() if x.endswith(".svg")) == sorted(f"figures/{n}.svg" for n in svgs)
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert all(f"(figures/{n}.png)" in md for n in pngs) and ".svg" not in md  # Markdown keeps its PNGs
    manifest = (folder / "report.json").read_text(encoding="utf-8")
    assert all(f'"figures/{n}.svg"' in manifest for n in svgs)  # report.json hashes the SVGs too


def test_the_png_has_twice_the_pixels_the_page_lays_out(folder: Path) -> None:
    from bnaudit.report import figures

    assert figures.PNG_SCALE == 2
    page = _Page((folder / "index.html").read_text(encoding="utf-8"))
    for img in page.images():
        width, height = int(img["width"] or 0), int(img["height"] or 0)
        data = (folder / str(img["src"])).read_bytes()
        chunks = png_chunks(data)
        assert struct.unpack(">II", chunks[0][1][:8]) == (2 * width, 2 * height), img["src"]
        assert decoded_size(data) == (2 * width, 2 * height), img["src"]
        # the layout is the one the page had at 1x: DPI layout pixels per inch of the figure
        svg = svg_root((folder / str(img["src"])).with_suffix(".svg").read_bytes())
        assert int(points(svg.get("width")) / 72 * figures.DPI) == width, (svg.get("width"), width)
        assert int(points(svg.get("height")) / 72 * figures.DPI) == height, (svg.get("height"), height)


def test_figures_carry_no_date(folder: Path) -> None:
    for png in (folder / "figures").glob("*.png"):
        chunks = png_chunks(png.read_bytes())
        assert b"tIME" not in {k for k, _ in chunks}, png.name
        texts = [body for kind, body in chunks if kind in (b"tEXt", b"iTXt", b"zTXt")]
        assert texts == [b"Software\x00bnaudit"], (png.name, texts)
    for svg in (folder / "figures").glob("*.svg"):
        data = svg.read_bytes()
        root = svg_root(data)
        assert not [e for e in root.iter() if e.tag.endswith("}date")], svg.name
        assert not re.search(rb"\d{4}-\d\d-\d\dT\d\d:\d\d", data), f"{svg.name} holds a timestamp"


def test_the_svg_is_vector_with_its_text_as_outlines(folder: Path) -> None:
    """Text is drawn as paths (no font needed to view it); rasters appear only as the images matplotlib embeds."""
    for svg in (folder / "figures").glob("*.svg"):
        root = svg_root(svg.read_bytes())
        assert not list(root.iter(f"{SVG_NS}text")), svg.name
        assert len(list(root.iter(f"{SVG_NS}path"))) > 50, svg.name
        for image in root.iter(f"{SVG_NS}image"):  # a colour bar's gradient: inline, never a file beside it
            href = image.get("{http://www.w3.org/1999/xlink}href") or image.get("href") or ""
            assert href.startswith("data:image/png;base64,"), (svg.name, href[:40])


def test_two_reports_of_the_same_inputs_are_byte_identical(folder: Path, runs: list[Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the user's matplotlib settings and SOURCE_DATE_EPOCH say: the figures' bytes are the inputs'."""
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "svg.hashsalt", "someone else's")
    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    again = tree(_report(runs, tmp_path / "again"))
    first = tree(folder)
    assert sorted(again) == sorted(first)
    differ = [name for name in first if first[name] != again[name]]
    assert not differ, f"not reproducible: {differ}"
    assert sum(name.endswith(".svg") for name in first) >= 5


def test_hostile_figure_text_keeps_the_svg_well_formed(tmp_path: Path) -> None:
    """Run labels reach the SVG (as outlines, and as the XML comments matplotlib writes beside them)."""
    import matplotlib.pyplot as plt

    from bnaudit.report import figures

    hostile = "a --> <!-- b ]]> & <script>x</script> \x1b[31m \x00 \ud800 $x$ --"
    fig, axes = figures._new(4, 3)
    axes[0, 0].plot([0, 1], [0, 1], label=hostile)
    axes[0, 0].legend()
    axes[0, 0].set_title(hostile)
    info = figures._save(fig, tmp_path, "hostile", "seed", hostile, "caption")
    assert plt.fignum_exists(fig.number) is False
    svg_root((tmp_path / "hostile.svg").read_bytes())
    assert info.svg == f"{tmp_path.name}/hostile.svg" and info.path == f"{tmp_path.name}/hostile.png"


# --------------------------------------------------------------------------- one self-contained file


def test_single_file_is_one_page_with_every_figure_inlined(single: Path, folder: Path) -> None:
    assert sorted(p.name for p in single.parent.iterdir()) == [single.name], "nothing else is written"
    text = single.read_text(encoding="utf-8")
    page = _Page(text)
    images = page.images()
    ours = _Page((folder / "index.html").read_text(encoding="utf-8")).images()
    assert len(images) == len(ours) >= 5
    for img, twin in zip(images, ours, strict=True):
        src = str(img["src"])
        head, _, payload = src.partition(",")
        assert head == "data:image/svg+xml;base64", head[:60]
        data = base64.b64decode(payload, validate=True)
        assert data == (folder / str(twin["src"])).with_suffix(".svg").read_bytes(), twin["src"]  # the same figure
        svg_root(data)
        assert (img["width"], img["height"], img["alt"]) == (twin["width"], twin["height"], twin["alt"])
    relative = [u for u in page.links() if not u.startswith(("data:", "#"))]
    assert not relative, f"the page still links files: {relative}"
    assert "figures/" not in re.sub(r'"data:[^"]*"', "", text)
    assert "<script" not in text
    # the same page as the folder's, but for its figures
    strip = re.compile(r'<img src="[^"]*"|<meta name="generator"[^>]*>| <a href="figures/[^"]*">[^<]*</a>')
    assert strip.sub("", text) == strip.sub("", (folder / "index.html").read_text(encoding="utf-8"))


def test_single_file_needs_force_to_replace_itself(runs: list[Path], tmp_path: Path, cli) -> None:
    out = tmp_path / "r.html"
    code, _, err = cli("report", str(runs[0]), "--out", str(out), "--single-file")
    assert code == 0, err
    before = out.read_bytes()
    code, _, err = cli("report", *(str(p) for p in runs), "--out", str(out), "--single-file")
    assert code == ExitCode.OUTPUT == 5 and "--force" in err
    one_error_line(err)
    assert out.read_bytes() == before
    code, _, err = cli("report", *(str(p) for p in runs), "--out", str(out), "--single-file", "--force")
    assert code == 0, err
    after = out.read_bytes()
    assert after != before and len(_Page(after.decode()).images()) > len(_Page(before.decode()).images())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # no lock, no temporary file left
    assert oct(out.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("content", [
    b"<!DOCTYPE html>\n<html><head><title>my notes</title></head></html>\n",
    b"",
    b"plain text",
])
def test_force_never_replaces_a_file_bnaudit_did_not_write(runs: list[Path], tmp_path: Path, cli,
                                                           content: bytes) -> None:
    out = tmp_path / "mine.html"
    out.write_bytes(content)
    code, _, err = cli("report", str(runs[0]), "--out", str(out), "--single-file", "--force")
    assert code == ExitCode.OUTPUT and "not a single-file report" in err
    one_error_line(err)
    assert out.read_bytes() == content


def test_a_folder_index_html_is_not_a_single_file_report(folder: Path, runs: list[Path], tmp_path: Path,
                                                         cli) -> None:
    """index.html of a report folder is bnaudit's, but replacing it alone would break the folder's report.json."""
    copy = tmp_path / "rep"
    shutil.copytree(folder, copy)
    code, _, err = cli("report", str(runs[0]), "--out", str(copy / "index.html"), "--single-file", "--force")
    assert code == ExitCode.OUTPUT and "not a single-file report" in err
    one_error_line(err)
    assert tree(copy) == tree(folder)


def test_a_folder_link_or_fifo_is_refused(runs: list[Path], tmp_path: Path, cli) -> None:
    folder = tmp_path / "taken.html"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    target = tmp_path / "target.html"
    target.write_text("mine")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    fifo = tmp_path / "pipe.html"
    os.mkfifo(fifo)
    for path, words in ((folder, "is a folder"), (link, "symbolic link"), (fifo, "not a plain file")):
        for force in ((), ("--force",)):
            code, _, err = cli("report", str(runs[0]), "--out", str(path), "--single-file", *force)
            assert code == ExitCode.OUTPUT and words in err, (path, err)
            one_error_line(err)
    assert (folder / "keep.txt").read_text() == "mine" and target.read_text() == "mine" and link.is_symlink()
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.html", "pipe.html", "taken.html", "target.html"]


def test_single_file_is_a_usage_error_without_an_html_name(runs: list[Path], tmp_path: Path, cli) -> None:
    for args in (("--terminal",), ("--out", str(tmp_path / "rep"))):
        code, _, err = cli("report", str(runs[0]), "--single-file", *args)
        assert code == ExitCode.USAGE and "--out NAME.html" in err
        one_error_line(err)
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_the_old_file_and_nothing_else(runs: list[Path], tmp_path: Path, cli,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from bnaudit.report import html

    out = tmp_path / "r.html"
    assert cli("report", str(runs[0]), "--out", str(out), "--single-file")[0] == 0
    before = hashlib.sha256(out.read_bytes()).hexdigest()

    def full_disk(*args: object, **kwargs: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(html, "render", full_disk)
    code, _, err = cli("report", str(runs[0]), "--out", str(out), "--single-file", "--force")
    assert code == ExitCode.OUTPUT and "No space left on device" in err
    one_error_line(err)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


@pytest.mark.skipif(CHROMIUM is None,
                    reason="chromium is not installed (Debian package 'chromium'); .ci/run installs it")
def test_single_file_decodes_in_headless_chromium(single: Path, tmp_path: Path) -> None:
    """Moved away from where it was written, every inlined figure still decodes, at the size the page gives it."""
    moved = tmp_path / "elsewhere" / "page.html"
    moved.parent.mkdir()
    script = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
              "{ img.setAttribute('data-natural', img.naturalWidth + 'x' + img.naturalHeight); "
              "img.removeAttribute('src'); } document.body.setAttribute('data-loaded', document.images.length); "
              "});</script>")
    moved.write_text(single.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    dom = subprocess.run([CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=10000", "--dump-dom", moved.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    tags = re.findall(r"<img [^>]*>", dom)
    assert tags and f'data-loaded="{len(tags)}"' in dom, "the load handler did not run"
    for tag in tags:
        natural = re.search(r'data-natural="(\d+)x(\d+)"', tag)
        assert natural and int(natural[1]) > 0 and int(natural[2]) > 0, f"not decoded: {tag[:200]}"
