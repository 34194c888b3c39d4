"""`dtml evaluate`: scoring mask folders against labels (medpy is the reference) and segment-and-score.

Masks are derived from the real sample labels (identity, erosion, dilation, shift, empty). Reference values
come from `medpy.metric.binary` (dc, jc, hd95, asd) computed here; the toolkit claims bit-identical
results, and the JSON round trip of a float is exact, so the tolerance is 1e-12 relative.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

from dtml_deploy.cli import app

medpy_binary = pytest.importorskip("medpy.metric.binary", reason="medpy (dev extra) is the reference")

CPU = ["--backend", "torch", "--device", "cpu", "--no-progress"]
METRICS = ("dice", "jaccard", "asd", "hd95", "asd_mm", "hd95_mm")


def _ids(sample_root: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (sample_root / "labels").glob("*.nii.gz"))


def _cli(*args: str | Path):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _label(sample_root: Path, cid: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(sample_root / "labels" / f"{cid}.nii.gz"))
    return np.asarray(img.dataobj) > 0, img


def _save_mask(mask: np.ndarray, like: nib.Nifti1Image, path: Path, dtype=np.uint8) -> Path:
    img = nib.Nifti1Image(np.asarray(mask).astype(dtype), like.affine, header=like.header.copy())
    img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


def _medpy(pred: np.ndarray, gt: np.ndarray, spacing) -> dict[str, float]:
    return {
        "dice": medpy_binary.dc(pred, gt),
        "jaccard": medpy_binary.jc(pred, gt),
        "hd95": medpy_binary.hd95(pred, gt),
        "asd": medpy_binary.asd(pred, gt),
        "hd95_mm": medpy_binary.hd95(pred, gt, voxelspacing=spacing),
        "asd_mm": medpy_binary.asd(pred, gt, voxelspacing=spacing),
    }


def _header_order(table: str) -> list[int]:
    header = table.splitlines()[0]
    return [header.index(word) for word in ("Dice", "Jaccard", "ASD", "95HD")]


def _perturb(mask: np.ndarray, how: str) -> np.ndarray:
    cross = ndi.generate_binary_structure(3, 1)
    if how == "erode":
        return ndi.binary_erosion(mask, cross, iterations=2)
    if how == "dilate":
        return ndi.binary_dilation(mask, np.ones((3, 3, 3), bool), iterations=1)
    if how == "shift-erode":
        out = np.zeros_like(mask)
        out[3:] = mask[:-3]
        return ndi.binary_erosion(out, cross, iterations=1)
    raise ValueError(how)


@pytest.fixture(scope="module")
def gt_dir(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gt")
    for p in (sample_root / "labels").glob("*.nii.gz"):
        shutil.copy(p, folder / p.name)
    return folder


# ------------------------------------------------------------------------------------ PRED_DIR GT_DIR


def test_identical_masks_score_perfectly(sample_root: Path, gt_dir: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    for cid in _ids(sample_root):
        mask, like = _label(sample_root, cid)
        _save_mask(mask, like, pred / f"{cid}.nii.gz")
    r = _cli("evaluate", pred, gt_dir, "--json", tmp_path / "e.json", "--csv", tmp_path / "e.csv")
    assert r.exit_code == 0, r.output
    order = _header_order(r.stdout)
    assert order == sorted(order)
    rows = json.loads((tmp_path / "e.json").read_text())["cases"]
    assert sorted(row["case"] for row in rows) == _ids(sample_root)
    for row in rows:
        assert row["dice"] == 1.0 and row["jaccard"] == 1.0
        assert row["hd95"] == 0.0 and row["asd"] == 0.0
        assert row["hd95_mm"] == 0.0 and row["asd_mm"] == 0.0
    for cid in _ids(sample_root):
        (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith(cid)]
        assert line.split()[1:3] == ["100.00", "100.00"]


def test_perturbed_masks_match_medpy(sample_root: Path, gt_dir: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    expected = {}
    for cid, how in zip(_ids(sample_root), ("erode", "dilate", "shift-erode")):
        gt, like = _label(sample_root, cid)
        p = _perturb(gt, how)
        assert p.sum() > 0 and not np.array_equal(p, gt)
        _save_mask(p, like, pred / f"{cid}.nii.gz")
        # maps beside a mask (as `dtml segment --save-prob` writes them) are not scored as cases
        _save_mask(p * 0.75, like, pred / f"{cid}_prob.nii.gz", np.float32)
        expected[cid] = _medpy(p, gt, tuple(float(z) for z in like.header.get_zooms()[:3]))
    js, cs = tmp_path / "out" / "e.json", tmp_path / "out" / "e.csv"
    r = _cli("evaluate", pred, gt_dir, "--json", js, "--csv", cs)
    assert r.exit_code == 0, r.output

    # table: header in the paper's order, one row per case, then the mean line
    lines = r.stdout.strip().splitlines()
    order = _header_order(lines[0])
    assert order == sorted(order)
    assert "%" in lines[0]
    assert [ln.split()[0] for ln in lines[1:4]] == sorted(expected)
    assert lines[4].startswith("mean") and "n=3" in lines[4]
    for ln in lines[1:4]:
        cid = ln.split()[0]
        assert ln.split()[1] == f"{expected[cid]['dice'] * 100:.2f}"
        assert ln.split()[2] == f"{expected[cid]['jaccard'] * 100:.2f}"

    report = json.loads(js.read_text())
    rows = {row["case"]: row for row in report["cases"]}
    assert sorted(rows) == sorted(expected)
    for cid, ref in expected.items():
        for key in METRICS:
            assert rows[cid][key] == pytest.approx(ref[key], rel=1e-12, abs=0), (cid, key)

    summary = report["summary"]
    for key in METRICS:
        values = np.array([rows[c][key] for c in rows], dtype=np.float64)
        assert summary[key]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert summary[key]["std"] == pytest.approx(values.std(), rel=1e-12)
        assert summary[key]["count"] == 3 and summary[key]["nan_count"] == 0

    with cs.open(newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [row["case"] for row in csv_rows] == [row["case"] for row in report["cases"]]
    assert set(METRICS) <= set(csv_rows[0])
    for row in csv_rows:
        for key in METRICS:
            assert float(row[key]) == pytest.approx(rows[row["case"]][key], rel=1e-12)


def test_empty_prediction_is_left_out_of_surface_means(sample_root: Path, gt_dir: Path, tmp_path: Path) -> None:
    ids = _ids(sample_root)
    pred = tmp_path / "pred"
    pred.mkdir()
    gt0, like0 = _label(sample_root, ids[0])
    gt1, like1 = _label(sample_root, ids[1])
    eroded = _perturb(gt0, "erode")
    _save_mask(eroded, like0, pred / f"{ids[0]}.nii.gz")
    _save_mask(np.zeros_like(gt1), like1, pred / f"{ids[1]}.nii.gz")
    r = _cli("evaluate", pred, gt_dir, "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    assert "empty mask" in r.stdout
    report = json.loads((tmp_path / "e.json").read_text())
    rows = {row["case"]: row for row in report["cases"]}
    assert rows[ids[1]]["dice"] == 0.0 and rows[ids[1]]["jaccard"] == 0.0
    assert rows[ids[1]]["hd95"] is None and rows[ids[1]]["asd"] is None  # NaN is written as null
    assert "no prediction" in r.stderr and ids[2] in report["unscored_labels"]
    s = report["summary"]
    assert s["hd95"]["count"] == 1 and s["hd95"]["nan_count"] == 1
    assert s["hd95"]["mean"] == pytest.approx(medpy_binary.hd95(eroded, gt0), rel=1e-12)
    assert s["dice"]["mean"] == pytest.approx(medpy_binary.dc(eroded, gt0) / 2, rel=1e-12)


def test_missing_label_for_a_prediction(sample_root: Path, gt_dir: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    cid = _ids(sample_root)[0]
    mask, like = _label(sample_root, cid)
    _save_mask(mask, like, pred / f"{cid}.nii.gz")
    _save_mask(mask, like, pred / "NOLABELCASE.nii.gz")
    r = _cli("evaluate", pred, gt_dir, "--json", tmp_path / "e.json")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "NOLABELCASE" in lines[0]
    assert r.stdout == ""
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("where", ["pred", "gt"])
def test_non_binary_mask_is_an_error(sample_root: Path, gt_dir: Path, tmp_path: Path, where: str) -> None:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    cid = _ids(sample_root)[1]
    mask, like = _label(sample_root, cid)
    multi = mask.astype(np.uint8)
    multi[ndi.binary_erosion(mask, iterations=3)] = 2  # a two-label map, as multi-class tools write
    _save_mask(multi if where == "pred" else mask, like, pred / f"{cid}.nii.gz")
    _save_mask(multi if where == "gt" else mask, like, gt / f"{cid}.nii.gz")
    r = _cli("evaluate", pred, gt)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "not binary" in lines[0]
    assert str((pred if where == "pred" else gt) / f"{cid}.nii.gz") in lines[0]


def test_shape_mismatch_and_missing_folders(sample_root: Path, gt_dir: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    cid = _ids(sample_root)[2]
    mask, like = _label(sample_root, cid)
    _save_mask(mask[:, :, :40], like, pred / f"{cid}.nii.gz")
    r = _cli("evaluate", pred, gt_dir)
    assert r.exit_code == 2 and cid in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("evaluate", tmp_path / "nope", gt_dir)
    assert r.exit_code == 2 and "nope" in r.stderr
    r = _cli("evaluate", tmp_path / "empty_dir_missing")
    assert r.exit_code == 2 and r.stderr.startswith("error:")


# --------------------------------------------------------------------------------- --model --data


def test_model_mode_end_to_end(tiny_bundle_dir: Path, sample_root: Path, tmp_path: Path) -> None:
    """Segment-and-score of the `labeled_2` split (full 80x72x56 sample scans); the first case is then
    cross-checked against `dtml segment` with the same options followed by medpy on the written mask.
    `--overlap 0 --batch 9` keeps it to 18 windows (two forwards) per case on CPU."""
    fast = ["--overlap", "0", "--batch", "9"]
    js = tmp_path / "e.json"
    r = _cli("evaluate", "--model", tiny_bundle_dir, "--data", sample_root, "--cases", "labeled_2", *CPU, *fast,
             "--json", js, "--csv", tmp_path / "e.csv")
    assert r.exit_code == 0, r.output
    wanted = json.loads((sample_root / "splits.json").read_text())["labeled_2"]
    assert len(wanted) == 2
    lines = r.stdout.strip().splitlines()
    order = _header_order(lines[0])
    assert order == sorted(order)
    assert [ln.split()[0] for ln in lines[1:3]] == wanted
    assert "n=2" in lines[3]
    report = json.loads(js.read_text())
    assert [row["case"] for row in report["cases"]] == wanted
    assert report["cases_from"] == "labeled_2"
    assert report["engine"]["head"] == "mean" and report["engine"]["overlap"] == 0.0
    assert report["engine"]["protocol"] == "dtml" and report["engine"]["tta"] is False
    for row in report["cases"]:
        assert 0.0 <= row["dice"] <= 1.0 and 0.0 <= row["jaccard"] <= 1.0
        assert row["windows"] == 3 * 3 * 2  # 80x72x56 tiled by non-overlapping 32^3 windows
        assert 0.0 <= row["agreement"] <= 1.0
        assert row["seconds"] > 0
    for key in METRICS:
        vals = [row[key] for row in report["cases"] if row[key] is not None]  # null = NaN (empty mask)
        assert report["summary"][key]["mean"] == pytest.approx(float(np.mean(vals)), rel=1e-12)
    with (tmp_path / "e.csv").open(newline="") as f:
        assert [row["case"] for row in csv.DictReader(f)] == wanted

    cid = wanted[0]
    r = _cli("segment", sample_root / "images" / f"{cid}.nii.gz", "-o", tmp_path / "seg",
             "--model", tiny_bundle_dir, *CPU, *fast)
    assert r.exit_code == 0, r.output
    pred = np.asarray(nib.load(str(tmp_path / "seg" / f"{cid}.nii.gz")).dataobj) > 0
    gt, like = _label(sample_root, cid)
    assert pred.any()
    ref = _medpy(pred, gt, tuple(float(z) for z in like.header.get_zooms()[:3]))
    for key in METRICS:
        assert report["cases"][0][key] == pytest.approx(ref[key], rel=1e-12, abs=0), key


@pytest.mark.parametrize("cases", ["NOSUCHCASE", "labeled_99", "SN4LF8SGBSRQUPTDSX78,NOSUCHCASE"])
def test_unknown_case_id(tiny_bundle_dir: Path, sample_root: Path, tmp_path: Path, cases: str) -> None:
    r = _cli("evaluate", "--model", tiny_bundle_dir, "--data", sample_root, "--cases", cases, *CPU,
             "--json", tmp_path / "e.json")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert cases.split(",")[-1] in lines[0]
    assert not (tmp_path / "e.json").exists()


def test_model_without_data_is_an_error(tiny_bundle_dir: Path) -> None:
    r = _cli("evaluate", "--model", tiny_bundle_dir, *CPU)
    assert r.exit_code == 2
    assert r.stderr.startswith("error:") and "--data" in r.stderr


def test_results_carried_between_ranks_are_the_arrays_not_pictures() -> None:
    """Under torchrun a rank hands rank 0 a case's mask (bits) and uncertainty (1/255 steps) as text;
    rank 0 draws the thumbnail itself. An odd shape checks that the bit padding is cut off."""
    import json

    from dtml_deploy.evaluate import _packer, _unpack

    rng = np.random.default_rng(0)
    mask = (rng.random((13, 7, 5)) > 0.5).astype(np.uint8)
    unc = rng.random((13, 7, 5)).astype(np.float32)
    kept: dict = {}
    _packer(kept)("case", mask=mask, uncertainty=unc, label=mask, image=unc)
    kept = json.loads(json.dumps(kept))  # what the store carries
    assert set(kept) == {"shape", "mask", "uncertainty"}
    back = np.unpackbits(_unpack(kept["mask"]), count=mask.size).reshape(kept["shape"])
    np.testing.assert_array_equal(back, mask)
    np.testing.assert_allclose(_unpack(kept["uncertainty"]).reshape(mask.shape) / 255, unc, atol=0.5 / 255 + 1e-7)
