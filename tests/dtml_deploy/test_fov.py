"""A raw scan cropped before dtml saw it (z-scored over the crop, not the whole scan): a console warning
with what to do, in the JSON report too, and the QC's intensity part lowered; whole scans and data
already z-scored (LA2018's crops) never warn."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.cli import DEFAULT_MODEL, app
from dtml_deploy.config import IntensityConfig
from dtml_deploy.fov import FovRule, cropped_scan_warning, fov_part, in_plane_mm
from dtml_deploy.intensity import prepare
from dtml_deploy.qc import QCReference, score
from tests.conftest import crop_real_case, make_bundle, sample_ids

SHIPPED_QC = json.loads((DEFAULT_MODEL / "config.json").read_text())["qc"]


@pytest.mark.parametrize(("shape", "spacing"), [
    ((576, 576, 88), (0.625, 0.625, 0.625)),  # LA LGE-MRI as acquired: 360 mm in-plane
    ((640, 640, 44), (0.625, 0.625, 2.5)),  # another scanner's matrix, thicker slices
    ((44, 288, 288), (2.5, 1.25, 1.25)),  # slice axis first
    ((352, 352, 120), (0.9, 0.9, 1.0)),  # 317 mm
])
def test_whole_scans_never_warn(shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    assert cropped_scan_warning(shape, spacing, "zscore") is None and fov_part(shape, spacing, "zscore") == 1.0


def test_a_raw_crop_warns_and_scores_its_extent() -> None:
    shape, spacing = (244, 160, 88), (0.625,) * 3  # the largest LA2018 crop, given raw
    assert in_plane_mm(shape, spacing) == (152.5, 100.0)
    line = cropped_scan_warning(shape, spacing, "zscore")
    assert line is not None and "152 x 100 mm" in line and "give dtml the whole scan" in line
    assert fov_part(shape, spacing, "zscore") == pytest.approx(100.0 / FovRule().min_in_plane_mm)
    # the same crop already z-scored over its whole scan (as LA2018 ships) is what the networks learned from
    assert cropped_scan_warning(shape, spacing, "as stored") is None and fov_part(shape, spacing, "as stored") == 1.0


def test_the_la2018_sample_as_stored_never_warns(sample_root: Path) -> None:
    for cid in sample_ids(sample_root):
        img = nib.load(str(sample_root / "images" / f"{cid}.nii.gz"))
        _, how = prepare(img.get_fdata(dtype=np.float32), IntensityConfig())
        assert how == "as stored"
        assert cropped_scan_warning(img.shape, img.header.get_zooms()[:3], how) is None


def test_qc_intensity_part_takes_the_fov_part() -> None:
    ref = QCReference.from_dict(SHIPPED_QC)
    good = {"agreement": 0.95, "band_agreement": 0.9, "band_soft_agreement": 0.9, "volume_ml": 50.0,
            "intensity_distance": 0.1, "intensity_point_mass": 0.08, "intensity_smoothness": 0.97}
    whole = score({**good, "fov_part": 1.0}, ref)
    cropped = score({**good, "fov_part": 0.6}, ref)
    assert whole.parts["intensity"] == 1.0
    assert cropped.parts["intensity"] == pytest.approx(0.6) and cropped.flagged
    assert cropped.score == pytest.approx(whole.score * 0.6)


@pytest.mark.slow
def test_segment_warns_once_records_it_and_qc_sees_it(sample_root: Path, tmp_path: Path) -> None:
    """A real crop turned into raw scanner magnitudes (positive, not z-scored) against the same crop as
    LA2018 stores it."""
    crop = crop_real_case(sample_root, sample_ids(sample_root)[0], (48, 48, 32))
    z = crop.get_fdata(dtype=np.float32)
    raw = tmp_path / "raw_crop.nii.gz"
    nib.save(nib.Nifti1Image((z - z.min()) * 180.0 + 20.0, crop.affine), str(raw))
    stored = tmp_path / "stored_crop.nii.gz"
    nib.save(crop, str(stored))
    bundle = make_bundle(patch=(32, 32, 32))
    bundle.meta["qc"] = SHIPPED_QC
    path = bundle.save(tmp_path / "b")
    r = CliRunner().invoke(app, ["segment", str(raw), str(stored), "--model", str(path), "--device", "cpu",
                                 "--no-progress", "-o", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    warned = [ln.strip() for ln in r.output.splitlines() if "field of view" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: raw_crop: field of view 30 x 30 mm")
    cases = {Path(c["input"]).name: c for c in json.loads((tmp_path / "r.json").read_text())["cases"]}
    raw_case, stored_case = cases["raw_crop.nii.gz"], cases["stored_crop.nii.gz"]
    assert raw_case["intensity"] == "zscore" and stored_case["intensity"] == "as stored"
    assert raw_case["warnings"] == [warned[0].split("raw_crop: ", 1)[1]] and stored_case["warnings"] is None
    assert raw_case["qc"]["features"]["fov_part"] == pytest.approx(30.0 / 200.0)
    assert raw_case["qc"]["parts"]["intensity"] <= 0.15 + 1e-6 and raw_case["qc"]["flagged"]
    assert stored_case["qc"]["features"]["fov_part"] == 1.0


@pytest.mark.slow
def test_evaluate_with_a_model_warns_and_keeps_the_warning_in_its_rows(sample_root: Path, tmp_path: Path) -> None:
    cid = sample_ids(sample_root)[0]
    crop = crop_real_case(sample_root, cid, (48, 48, 32))
    z = crop.get_fdata(dtype=np.float32)
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "labels").mkdir()
    nib.save(nib.Nifti1Image((z - z.min()) * 180.0 + 20.0, crop.affine), str(tmp_path / "d" / "images" / "raw.nii.gz"))
    nib.save(crop_real_case(sample_root, cid, (48, 48, 32), "labels"), str(tmp_path / "d" / "labels" / "raw.nii.gz"))
    bundle = make_bundle(patch=(32, 32, 32))
    bundle.meta["qc"] = SHIPPED_QC
    path = bundle.save(tmp_path / "b")
    r = CliRunner().invoke(app, ["evaluate", "--model", str(path), "--data", str(tmp_path / "d"), "--device", "cpu",
                                 "--no-progress", "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert [ln for ln in r.output.splitlines() if "field of view" in ln] == [
        "warning: raw: " + cropped_scan_warning((48, 48, 32), (0.625,) * 3, "zscore")]
    row = json.loads((tmp_path / "e.json").read_text())["cases"][0]
    assert "field of view 30 x 30 mm" in row["warnings"] and row["qc_flagged"] is True
