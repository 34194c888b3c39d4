"""`dtml segment --preview` end to end: the PNG beside the mask is drawn from the very arrays written
(mask, uncertainty, image), listed in the JSON report, and part of the case's all-or-nothing unit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

pytest.importorskip("matplotlib", reason="previews need matplotlib (the viz extra)")

from dtml_deploy.cli import app
from dtml_deploy.viz.figure import png_to_rgb
from dtml_deploy.viz.preview import preview_png, preview_title
from tests.conftest import make_bundle

CPU = ["--backend", "torch", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def scan(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48x48x32 real sub-volume around the atrium (4 windows of 32^3), geometry kept by nibabel."""
    cid = sorted((sample_root / "images").glob("*.nii.gz"))[0].name
    img = nib.load(str(sample_root / "images" / cid))
    lab = np.asarray(nib.load(str(sample_root / "labels" / cid)).dataobj) > 0
    centre = ndi.center_of_mass(lab)
    size = (48, 48, 32)
    start = [int(np.clip(round(c - s / 2), 0, n - s)) for c, s, n in zip(centre, size, img.shape)]
    crop = img.slicer[tuple(slice(a, a + s) for a, s in zip(start, size))]
    path = tmp_path_factory.mktemp("scan") / "case01.nii.gz"
    nib.save(crop, str(path))
    return path


@pytest.fixture(scope="module")
def bundle_dir(scan: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = np.asarray(nib.load(str(scan)).get_fdata(dtype=np.float32))
    return make_bundle(centre_on=img[8:40, 8:40, :32]).save(tmp_path_factory.mktemp("b") / "bundle")


def _cli(*args: object):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def test_preview_is_drawn_from_the_written_arrays(scan: Path, bundle_dir: Path, tmp_path: Path) -> None:
    out, js = tmp_path / "out", tmp_path / "r.json"
    r = _cli("segment", scan, "-o", out, "--model", bundle_dir, *CPU, "--preview", "--save-uncertainty",
             "--json", js)
    assert r.exit_code == 0, r.output
    report = json.loads(js.read_text())
    case = report["cases"][0]
    assert case["preview"] == str(out / "case01_preview.png")
    written = png_to_rgb((out / "case01_preview.png").read_bytes())
    img = nib.load(str(scan))
    mask = np.asarray(nib.load(str(out / "case01.nii.gz")).dataobj)
    unc = np.asarray(nib.load(str(out / "case01_uncertainty.nii.gz")).dataobj)
    assert 0 < mask.sum() < mask.size and unc.max() > 0  # a real outline and a real heat map
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    # the title names the head that ran and the QC score (the heads' agreement for a bundle without QC stats)
    score, name = (case["qc"]["score"], "QC") if case.get("qc") else (case["agreement"], "agreement")
    title = preview_title("case01", report["engine"]["head"], mask, spacing, score, name)
    redrawn = png_to_rgb(preview_png(mask, img.affine, spacing, title, image=img.get_fdata(dtype=np.float32),
                                     uncertainty=unc))
    np.testing.assert_array_equal(written, redrawn)


def test_preview_without_saved_maps_and_its_outputs_exist_check(scan: Path, bundle_dir: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _cli("segment", scan, "-o", out, "--model", bundle_dir, *CPU, "--preview").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["case01.nii.gz", "case01_preview.png"]
    (out / "case01.nii.gz").unlink()
    r = _cli("segment", scan, "-o", out, "--model", bundle_dir, *CPU, "--preview")
    assert r.exit_code == 2 and "case01_preview.png: exists" in r.stderr  # never replaced silently


def test_preview_joins_the_case_unit(scan: Path, bundle_dir: Path, tmp_path: Path) -> None:
    """When the preview cannot be put in place, the mask written with it is taken back."""
    out = tmp_path / "out"
    (out / "case01_preview.png").mkdir(parents=True)
    r = _cli("segment", scan, "-o", out, "--model", bundle_dir, *CPU, "--preview", "--overwrite")
    assert r.exit_code == 2
    assert next(ln for ln in r.stderr.splitlines() if ln.startswith("error:")).endswith("case01_preview.png")
    assert sorted(p.name for p in out.iterdir()) == ["case01_preview.png"]  # just the folder in the way


def test_preview_without_matplotlib_is_one_line(scan: Path, bundle_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    r = _cli("segment", scan, "-o", tmp_path / "out", "--model", bundle_dir, *CPU, "--preview")
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --preview needs matplotlib: pip install 'dtml[viz]'"
    assert not (tmp_path / "out").exists()
