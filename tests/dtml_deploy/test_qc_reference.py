"""The bundle's `qc` block is checked like the rest of config.json: every bad value stops the bundle from
loading with the field named, a missing block runs without QC and says so once, an empty one is refused."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.bundle import Bundle
from dtml_deploy.cli import DEFAULT_MODEL, app
from dtml_deploy.errors import BundleError
from dtml_deploy.qc_reference import QCReference
from tests.conftest import crop_real_case, make_bundle, sample_ids

SHIPPED_QC = json.loads((DEFAULT_MODEL / "config.json").read_text())["qc"]

# (edit of the shipped block, the field the error must name); None as a value removes that key
BAD = [
    ({"threshold": -0.5}, "qc.threshold"),
    ({"threshold": 1.5}, "qc.threshold"),
    ({"threshold": "0.85"}, "qc.threshold"),
    ({"threshold": True}, "qc.threshold"),
    ({"threshold": None}, "qc.threshold is missing"),
    ({"volume_ml": [126.0, 33.0]}, "qc.volume_ml"),
    ({"volume_ml": [-5.0, 126.0]}, "qc.volume_ml"),
    ({"volume_ml": [0.0, 0.0]}, "qc.volume_ml"),
    ({"volume_ml": [33.0]}, "qc.volume_ml"),
    ({"agreement_feature": "dice"}, "qc.agreement_feature"),
    ({"agreement_feature": "tta_spread"}, "qc.agreement_feature"),
    ({"agreement_scale": [0.5, 0.5]}, "qc.agreement_scale"),
    ({"agreement_scale": [0.8, 0.5]}, "qc.agreement_scale"),
    ({"agreement_scale": [0.5, "x"]}, "qc.agreement_scale"),
    ({"intensity_quantiles": [0.0] * 100_000}, "qc.intensity_quantiles"),
    ({"intensity_quantiles": [0.0] * 8}, "qc.intensity_quantiles"),
    ({"intensity_quantiles": list(range(9))[::-1]}, "qc.intensity_quantiles"),
    ({"intensity_distance": 0}, "qc.intensity_distance"),
    ({"point_mass": -0.1}, "qc.point_mass"),
    ({"smoothness": 1.0}, "qc.smoothness"),
    ({"unknown_feature_weight": 2.0}, "unknown key(s) ['unknown_feature_weight']"),
]


def _edited(edit: dict) -> dict:
    qc = {**SHIPPED_QC, **edit}
    return {k: v for k, v in qc.items() if v is not None}


def test_the_shipped_block_is_valid() -> None:
    ref = QCReference.from_dict(SHIPPED_QC)
    assert 0 < ref.threshold < 1 and ref.volume_ml[0] < ref.volume_ml[1]


@pytest.mark.parametrize(("edit", "named"), BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_a_bad_block_stops_the_bundle_naming_the_field(tmp_path: Path, edit: dict, named: str) -> None:
    path = make_bundle(n_filters=2, patch=(16, 16, 16)).save(tmp_path / "b")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "qc": _edited(edit)}))
    with pytest.raises(BundleError, match=r"config\.json: ") as e:
        Bundle.load(path)
    assert named in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize(("block", "named"), [({}, "qc.volume_ml is missing"), (None, "qc must be a JSON object"),
                                              ([], "qc must be a JSON object")])
def test_an_empty_or_null_block_is_refused(tmp_path: Path, block: object, named: str) -> None:
    path = make_bundle(n_filters=2, patch=(16, 16, 16)).save(tmp_path / "b")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "qc": block}))
    with pytest.raises(BundleError, match=named):
        Bundle.load(path)


@pytest.mark.slow
def test_segment_refuses_a_bad_block_in_one_line_and_runs_without_one_saying_so_once(
        sample_root: Path, tmp_path: Path) -> None:
    scan = tmp_path / "scan.nii.gz"
    nib.save(crop_real_case(sample_root, sample_ids(sample_root)[0], (32, 32, 32)), str(scan))
    bundle = make_bundle(patch=(32, 32, 32)).save(tmp_path / "b")
    cfg = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**cfg, "qc": _edited({"threshold": -1})}))
    args = ["segment", str(scan), "--model", str(bundle), "--device", "cpu", "--no-progress"]
    bad = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert [ln for ln in bad.output.splitlines() if ln.startswith("error:")] == [
        ln for ln in bad.output.splitlines() if ln.strip()]
    assert "qc.threshold must be a finite number in [0, 1], got -1" in bad.output
    assert not (tmp_path / "bad").exists()
    (bundle / "config.json").write_text(json.dumps(cfg))  # no qc key at all
    ok = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "ok"), "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("no `qc` block") == 1
    case = json.loads((tmp_path / "r.json").read_text())["cases"][0]
    assert case["status"] == "ok" and case["qc"] is None
    assert np.asarray(nib.load(tmp_path / "ok" / "scan.nii.gz").dataobj).shape == (32, 32, 32)


@pytest.mark.slow  # 3 x 64 leave-one-out fits: seconds
def test_the_shipped_threshold_is_the_recall_first_rule_fitted_on_the_calibration_rows() -> None:
    """The bundle's threshold and scale are what benchmarks/qc_threshold.py fits on the 64 calibration
    rows stored in the JSON, and the rule's held-out (leave-one-out) recall of Dice < 0.85 is at least 0.9."""
    from benchmarks.qc_threshold import calibrate, choose_threshold

    # the rule on a known answer: 4 failures, recall 0.75 must catch the 3 lowest and no more
    scores = [0.1, 0.3, 0.5, 0.6, 0.7, 0.9, 0.95]
    dice = [0.5, 0.8, 0.9, 0.84, 0.92, 0.83, 0.9]
    assert choose_threshold(scores, dice, 0.85, 0.75) == pytest.approx(0.65)
    assert choose_threshold(scores, dice, 0.85, 1.0) == pytest.approx(0.925)
    doc = json.loads((Path(__file__).parents[2] / "benchmarks" / "results" / "qc_calibration_cpu.json").read_text())
    rows = [r for r in doc["cases"] if (r["config"], r["precision"], r["head"]) == ("dtml", "bf16", "mean")]
    assert len(rows) == 64
    result, ref = calibrate(rows, doc["qc_reference"], SHIPPED_QC["agreement_feature"])
    assert result["cross_validated"]["dice<0.85"]["recall"] >= 0.9
    assert ref["threshold"] == SHIPPED_QC["threshold"] == doc["qc"]["threshold"]
    assert list(ref["agreement_scale"]) == SHIPPED_QC["agreement_scale"]
