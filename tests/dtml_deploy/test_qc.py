"""The per-case QC score: its parts on known answers, and the shipped model's calibrated score on real
LA cases and on scans that are not LA LGE-MRI (a CT, a cine-MRI frame, a real brain MRI, noise)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.backends.torch_backend import cpu_has_native_bf16
from dtml_deploy.bundle import Bundle
from dtml_deploy.cli import DEFAULT_MODEL, app
from dtml_deploy.predictor import Predictor
from dtml_deploy.qc import (
    SMOOTHNESS_SLACK,
    QCReference,
    head_features,
    intensity_stats,
    reference_of,
    score,
    warning_line,
)
from tests import phantoms

CPU_PRECISION = "bf16" if cpu_has_native_bf16() else "fp32"


@pytest.fixture(scope="module")
def shipped_ref() -> QCReference:
    ref = reference_of(Bundle.load(DEFAULT_MODEL).meta)
    assert ref is not None, "the shipped bundle carries no calibrated `qc` reference"
    return ref


def _features(**over: float) -> dict[str, float]:
    """A case that sits inside every training range, with `over` replacing some features."""
    f = {"agreement": 0.95, "band_agreement": 0.9, "band_soft_agreement": 0.9, "volume_ml": 50.0,
         "intensity_distance": 0.1, "intensity_point_mass": 0.08, "intensity_smoothness": 0.97}
    return {**f, **over}


def test_reference_statistics_come_from_the_labeled_cases_only(shipped_ref: QCReference) -> None:
    src = shipped_ref.source
    assert "labeled_16" in src and "unlabeled_16" in src  # volumes/intensity from one, threshold from the other
    lo, hi = shipped_ref.volume_ml
    assert 20 < lo < hi < 200  # mL: left atria
    assert 0.5 < shipped_ref.threshold < 1.0 and 0.9 < shipped_ref.smoothness < 1.0


def test_parts_on_known_answers(shipped_ref: QCReference) -> None:
    ref = shipped_ref
    good = score(_features(**{ref.agreement_feature: 1.0}), ref)
    assert good.parts == {"agreement": 1.0, "volume": 1.0, "intensity": 1.0} and not good.flagged
    lo, hi = ref.agreement_scale
    mid = score(_features(**{ref.agreement_feature: (lo + hi) / 2}), ref)
    assert mid.parts["agreement"] == pytest.approx(0.5) and mid.score == pytest.approx(0.5) and mid.flagged
    vmin, vmax = ref.volume_ml
    assert score(_features(volume_ml=0.0), ref).score == 0.0  # nothing found
    assert score(_features(volume_ml=4 * vmax), ref).parts["volume"] == pytest.approx(0.5)  # 2x past 2x max
    assert score(_features(volume_ml=vmin / 4), ref).parts["volume"] == pytest.approx(0.5)
    assert score(_features(volume_ml=vmin / 1.9), ref).parts["volume"] == 1.0  # within the slack
    far = 3 * ref.intensity_distance
    assert score(_features(intensity_distance=far), ref).parts["intensity"] == pytest.approx(0.5)
    noise_part = score(_features(intensity_smoothness=0.0), ref).parts["intensity"]  # no correlation at all
    assert noise_part == pytest.approx(SMOOTHNESS_SLACK * (1 - ref.smoothness)) and noise_part < 0.25


def test_intensity_stats_tell_noise_and_air_from_a_smooth_scan(rng: np.random.Generator) -> None:
    noise = intensity_stats(rng.standard_normal((40, 40, 30)))
    assert abs(noise["smoothness"]) < 0.02
    x = np.linspace(0, 6, 40)
    smooth = np.sin(x)[:, None, None] * np.cos(x)[None, :, None] * np.ones((1, 1, 30))
    assert intensity_stats(smooth)["smoothness"] > 0.95
    air = np.where(rng.random((40, 40, 30)) < 0.6, -1000.0, 40.0 + rng.normal(0, 15, (40, 40, 30)))
    assert intensity_stats(air)["point_mass"] == pytest.approx((air == -1000.0).mean())  # air fills one bin
    st = intensity_stats(rng.standard_normal((40, 40, 30)) * 7 + 300)  # scale-free: standardised first
    np.testing.assert_allclose(st["quantiles"], noise["quantiles"], atol=0.15)


def test_head_features_on_known_masks() -> None:
    p = np.zeros((30, 30, 30), np.float32)
    p[8:22, 8:22, 8:22] = 1.0
    same = head_features(p, p.copy(), (p > 0.5).astype(np.uint8), (p > 0.5).astype(np.uint8))
    assert same["agreement"] == same["band_agreement"] == same["band_soft_agreement"] == 1.0
    assert same["disagreement_ratio"] == 0.0 and same["lcc_removed"] == 0.0
    q = p.copy()
    q[8:22, 8:22, 8:10] = 0.0  # the second head misses two slices of the cube's 14
    raw = (p > 0.5).astype(np.uint8)
    raw[0, 0, 0] = 1  # a speck that LCC removes
    f = head_features(p, q, (p > 0.5).astype(np.uint8), raw)
    n_p, n_q = 14 ** 3, 14 * 14 * 12
    assert f["agreement"] == pytest.approx(2 * n_q / (n_p + n_q))
    assert f["disagreement_ratio"] == pytest.approx((n_p - n_q) / n_p)
    assert f["lcc_removed"] == pytest.approx(1 / (n_p + 1))
    assert f["band_agreement"] < f["agreement"]  # the disagreement sits on the boundary, where the band looks


def test_warning_line() -> None:
    qc = {"score": 0.41, "threshold": 0.93, "flagged": True, "parts": {"agreement": 0.9, "volume": 0.456}}
    assert warning_line("case7", qc) == ("warning: case7: QC score 0.41 below 0.93 (agreement 0.90, volume 0.46) "
                                         "- check this mask")
    assert warning_line("case7", {**qc, "flagged": False}) is None and warning_line("case7", None) is None


# ------------------------------------------------------------------------------- the shipped model


@pytest.fixture(scope="module")
def shipped_segmenter():
    return Predictor.load(DEFAULT_MODEL, device="cpu", precision=CPU_PRECISION).segmenter


@pytest.mark.slow
@pytest.mark.parametrize("scan", ["ct", "cine", "brain", "noise"])
def test_scans_that_are_not_la_lge_mri_are_flagged(shipped_segmenter, scan: str) -> None:
    made = {"ct": phantoms.ct_phantom, "cine": phantoms.cine_phantom, "brain": phantoms.brain_mri,
            "noise": phantoms.noise_volume}[scan]()
    if made is None:
        pytest.skip("nibabel's test data has no anatomical.nii")
    image, spacing = made
    seg = shipped_segmenter.segment_array(image, spacing, scan)
    assert seg.qc is not None and seg.qc.flagged, seg.qc
    assert seg.qc.score < 0.5 * seg.qc.threshold  # flagged with a margin, not by a hair


@pytest.mark.slow
@pytest.mark.parametrize("cid,good", [("6799D6LEBH3NSRV1KH27", True), ("A4R1S23KR0KU2WSYHK2X", False)])
def test_real_la_cases_good_and_failed(shipped_segmenter, la2018: Path, cid: str, good: bool) -> None:
    """Two calibration cases (the dtml default scored Dice 0.92 and 0.52 on them): the score lets the good
    one through and flags the failure."""
    img = nib.load(str(la2018 / "images" / f"{cid}.nii.gz"))
    seg = shipped_segmenter.segment_array(img.get_fdata(dtype=np.float32), (0.625,) * 3, cid)
    assert seg.qc is not None and seg.qc.flagged is (not good), seg.qc


@pytest.mark.slow
def test_console_warns_and_json_carries_the_score(tmp_path: Path) -> None:
    image, spacing = phantoms.noise_volume()
    src = tmp_path / "noise.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([*spacing, 1.0])), str(src))
    r = CliRunner().invoke(app, ["segment", str(src), "-o", str(tmp_path / "out"), "--device", "cpu",
                                 "--precision", CPU_PRECISION, "--no-progress", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output  # a flagged case is still segmented and written
    case = json.loads((tmp_path / "r.json").read_text())["cases"][0]
    qc = case["qc"]
    assert qc["flagged"] is True and qc["score"] < qc["threshold"]
    assert set(qc["parts"]) == {"agreement", "volume", "intensity"} and "intensity_smoothness" in qc["features"]
    line = [ln.strip() for ln in r.output.splitlines() if "QC score" in ln and ln.strip().startswith("warning:")]
    assert line == [warning_line("noise", qc)]


def test_evaluate_rows_carry_the_score_and_its_parts(sample_root: Path, tmp_path: Path,
                                                     shipped_ref: QCReference) -> None:
    """A small random bundle given the shipped calibration: every row has the score, its parts and the flag,
    consistent with each other."""
    from tests.conftest import make_bundle

    bundle = make_bundle(n_filters=4, patch=(32, 32, 32))
    bundle.meta["qc"] = shipped_ref.to_dict()
    path = bundle.save(tmp_path / "bundle")
    r = CliRunner().invoke(app, ["evaluate", "--model", str(path), "--data", str(sample_root), "--cases", "labeled_2",
                                 "--backend", "torch", "--device", "cpu", "--no-progress", "--overlap", "0",
                                 "--batch", "9", "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "e.json").read_text())["cases"]
    assert len(rows) == 2
    for row in rows:
        parts = [row["qc_agreement"], row["qc_volume"], row["qc_intensity"]]
        assert all(0.0 <= p <= 1.0 for p in parts)
        assert row["qc_score"] == pytest.approx(float(np.prod(parts)))
        assert row["qc_flagged"] is (row["qc_score"] < shipped_ref.threshold)
