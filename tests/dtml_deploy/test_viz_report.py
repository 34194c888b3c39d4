"""`dtml evaluate --report`: one self-contained HTML page whose tables hold the JSON report's numbers,
whose every image decodes, and which a real headless browser (Debian's chromium) shows with its table
and images; plus the charts drawn from the rows."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

pytest.importorskip("matplotlib", reason="the report needs matplotlib (the viz extra)")

from dtml_deploy.cli import app
from dtml_deploy.viz.figure import png_to_rgb
from dtml_deploy.viz.report_plots import distributions_figure, scatter_figure

CPU = ["--backend", "torch", "--device", "cpu", "--no-progress"]
METRICS = ("dice", "jaccard", "asd", "hd95", "asd_mm", "hd95_mm")
HEADERS = {"dice": "Dice (%)", "jaccard": "Jaccard (%)", "asd": "ASD (voxel)", "hd95": "95HD (voxel)",
           "asd_mm": "ASD (mm)", "hd95_mm": "95HD (mm)"}


class Page(HTMLParser):
    """Tables (header texts; rows of (text, attributes) cells), images and anything fetched from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.images: list[dict[str, str]] = []
        self.external: list[str] = []
        self._table: dict | None = None
        self._cell: dict | None = None
        self._in_head = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), {"head": [], "rows": []})
        elif tag == "thead":
            self._in_head = True
        elif tag == "tbody":
            self._in_head = False
        elif tag == "tr" and self._table is not None and not self._in_head:
            self._table["rows"].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = {"text": "", "attrs": a, "head": tag == "th"}
        elif tag == "img":
            self.images.append(a)
            if self._cell is not None:
                self._cell["img"] = a
        if tag in ("script", "link", "img", "iframe") and (a.get("src") or a.get("href") or "").startswith(
                ("http", "//")):
            self.external.append(a.get("src") or a.get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            if self._cell["head"]:
                self._table["head"].append(self._cell["text"])
            else:
                self._table["rows"][-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell["text"] += data


def _parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def _cli(*args: object):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


@pytest.fixture(scope="module")
def folder_report(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Real LA labels as ground truth; predictions eroded, dilated and empty (a NaN distance row)."""
    tmp = tmp_path_factory.mktemp("rep")
    pred, gt = tmp / "pred", tmp / "gt"
    pred.mkdir()
    shutil.copytree(sample_root / "labels", gt)
    for i, p in enumerate(sorted(gt.glob("*.nii.gz"))):
        img = nib.load(str(p))
        lab = np.asarray(img.dataobj) > 0
        m = [ndi.binary_erosion(lab, iterations=2), ndi.binary_dilation(lab, iterations=1),
             np.zeros_like(lab)][i]
        nib.save(nib.Nifti1Image(m.astype(np.uint8), img.affine, img.header), str(pred / p.name))
    r = _cli("evaluate", pred, gt, "--json", tmp / "e.json", "--report", tmp / "e.html")
    assert r.exit_code == 0, r.output
    return tmp / "e.html", json.loads((tmp / "e.json").read_text())


def _check_cases_table(page: Page, report: dict) -> None:
    table = page.tables["cases"]
    rows = report["cases"]
    assert len(table["rows"]) == len(rows)
    for cells, row in zip(table["rows"], rows):
        by_head = dict(zip(table["head"], cells))
        assert by_head["case"]["text"] == row["case"]
        for key in METRICS:
            cell = by_head[HEADERS[key]]
            if row[key] is None:
                assert cell["attrs"]["data-v"] == "" and cell["text"] == "n/a"
            else:
                assert float(cell["attrs"]["data-v"]) == row[key]  # the exact number of the JSON report
                factor = 100 if key in ("dice", "jaccard") else 1
                assert cell["text"] == f"{row[key] * factor:.2f}"
        assert "img" in by_head["preview"]


def test_folder_report_holds_the_json_numbers(folder_report: tuple[Path, dict]) -> None:
    html_path, report = folder_report
    page = _parse(html_path)
    _check_cases_table(page, report)
    summary = dict(zip(page.tables["summary"]["head"], page.tables["summary"]["rows"][0]))
    assert summary["cases"]["text"] == str(len(report["cases"]))
    for key in METRICS:
        mean, std = report["summary"][key]["mean"], report["summary"][key]["std"]
        cell = summary[HEADERS[key]]
        assert float(cell["attrs"]["data-mean"]) == mean and float(cell["attrs"]["data-std"]) == std
        factor = 100 if key in ("dice", "jaccard") else 1
        assert cell["text"] == f"{mean * factor:.2f} ± {std * factor:.2f}"
    assert list(summary)[2:6] == ["Dice (%)", "Jaccard (%)", "ASD (voxel)", "95HD (voxel)"]


def test_every_image_is_inline_and_decodes(folder_report: tuple[Path, dict]) -> None:
    html_path, report = folder_report
    page = _parse(html_path)
    assert not page.external and "<link" not in html_path.read_text()
    assert len(page.images) == len(report["cases"]) + 1  # a thumbnail per case + distributions (no QC here)
    for img in page.images:
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        rgb = png_to_rgb(base64.b64decode(data, validate=True))
        assert rgb.shape[0] > 50 and rgb.std() > 10  # a picture, not a blank
    thumbs = [png_to_rgb(base64.b64decode(i["src"].split(",", 1)[1])) for i in page.images if "thumb" in i["class"]]
    cyan = [int(((t[..., 0] < 40) & (t[..., 1] > 215) & (t[..., 2] > 215)).sum()) for t in thumbs]
    assert cyan[0] > 0 and cyan[1] > 0 and cyan[2] == 0  # the empty prediction draws no outline
    for t in thumbs:  # scoring folders has no second head: no heat at all
        t = t.astype(int)
        assert not ((t[..., 0] >= t[..., 1]) & (t[..., 1] >= t[..., 2]) & (t[..., 0] > t[..., 2] + 20)).any()


def test_model_report_scatter_flags_and_thumbnails(tiny_bundle_dir: Path, sample_root: Path,
                                                   tmp_path: Path) -> None:
    r = _cli("evaluate", "--model", tiny_bundle_dir, "--data", sample_root, "--cases", "labeled_2", *CPU,
             "--overlap", "0", "--batch", "9", "--json", tmp_path / "e.json", "--report", tmp_path / "e.html")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e.json").read_text())
    page = _parse(tmp_path / "e.html")
    _check_cases_table(page, report)
    table = page.tables["cases"]
    for cells, row in zip(table["rows"], report["cases"]):
        by_head = dict(zip(table["head"], cells))
        assert float(by_head["agreement"]["attrs"]["data-v"]) == row["agreement"]
        assert by_head["flagged"]["text"] == ("yes" if row["agreement"] < 0.8 else "")
    alts = [i["alt"] for i in page.images]
    assert "Dice against agreement" in alts and "distribution of each metric" in alts
    for img in (i for i in page.images if "thumb" in i["class"]):
        t = png_to_rgb(base64.b64decode(img["src"].split(",", 1)[1])).astype(int)
        magenta = (t[..., 0] > 215) & (t[..., 1] < 40) & (t[..., 2] > 215)
        heat = (t[..., 0] >= t[..., 1]) & (t[..., 1] >= t[..., 2]) & (t[..., 0] > t[..., 2] + 20)  # not grey
        assert magenta.sum() > 20 and heat.sum() > 0.2 * t[..., 0].size  # label outline; heads disagree widely


def test_scatter_and_distributions_plot_the_rows() -> None:
    rows = [{"case": f"c{i}", "dice": d, "jaccard": d / (2 - d), "asd": a, "hd95": 3 * a, "agreement": q}
            for i, (d, a, q) in enumerate([(0.9, 1.0, 0.95), (0.5, 4.0, 0.7), (0.8, float("nan"), 0.85)])]
    ax = scatter_figure(rows, "agreement", 0.8, "agreement").axes[0]
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(map(tuple, points)) == sorted((r["agreement"], 100 * r["dice"]) for r in rows)
    flagged = next(c for c in ax.collections if c.get_label() == "flagged").get_offsets()
    assert flagged.tolist() == [[0.7, 50.0]]
    assert [ln.get_xdata()[0] for ln in ax.lines] == [0.8]  # the threshold line
    axes = distributions_figure(rows).axes
    assert [a.get_title() for a in axes] == ["Dice %", "Jaccard %", "ASD vox (1 n/a)", "95HD vox (1 n/a)"]
    assert sorted(axes[2].collections[0].get_offsets()[:, 1]) == [1.0, 4.0]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_a_real_browser_shows_the_tables_and_images(folder_report: tuple[Path, dict], tmp_path: Path) -> None:
    html_path, report = folder_report
    shot = tmp_path / "shot.png"
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,1600", html_path.as_uri()],
                   check=True, capture_output=True, timeout=90)
    rgb = png_to_rgb(shot.read_bytes())
    header = np.all(rgb == (0xDD, 0xE6, 0xF0), axis=-1)  # the table headers' background
    rows_with_header = np.flatnonzero(header.sum(axis=1) > 300)
    assert rows_with_header.size > 20  # two header bands (summary and cases), each ~25 px tall, wide
    assert np.diff(rows_with_header).max() > 100  # ... far apart: both tables are there
    cyan = (rgb[..., 0] < 40) & (rgb[..., 1] > 215) & (rgb[..., 2] > 215)
    assert cyan.sum() > 50  # the thumbnails' outlines were decoded and painted
    blue = np.all(np.abs(rgb.astype(int) - (0x1F, 0x77, 0xB4)) < 8, axis=-1)
    assert blue.sum() > 20  # the distribution chart's points
    # The inline script sorts the case table (here on load, from the address).
    dom = subprocess.run([*base, "--dump-dom", html_path.as_uri() + "#sort=Dice%20(%25)"], check=True,
                         capture_output=True, timeout=90, text=True).stdout
    order = re.findall(r"<td>([A-Z0-9]{20})</td>", dom)
    expected = [r["case"] for r in sorted(report["cases"], key=lambda r: r["dice"])]
    assert order == expected and order != [r["case"] for r in report["cases"]]


def test_report_without_matplotlib_is_one_line(sample_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = _cli("evaluate", sample_root / "labels", sample_root / "labels", "--report", tmp_path / "r.html")
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --report needs matplotlib: pip install 'dtml[viz]'"
    assert not (tmp_path / "r.html").exists()
