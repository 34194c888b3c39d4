"""A per-case quality-control score: how far a segmentation is from the cases the model handles well.

The score is a product of parts, each 1.0 for a case that looks like the model's good cases and falling
towards 0 the further it is from them:

- `agreement`: how well the two heads (M_s and M_d, two different tasks) agree near the mask's boundary,
  mapped so that the calibration's best case scores 1 (see `QCReference.agreement_scale`);
- `volume`: the mask's volume against the range of the training labels' volumes, with a factor 2 of
  slack either side (an empty mask scores 0);
- `intensity`: the input's intensity profile against the training scans': the shape of its histogram
  (standardised, so scanner scaling does not matter), the share of voxels in one value (air, an empty
  background) and the smoothness of neighbouring voxels (noise has none), each with slack beyond the
  training scans' extreme (1.5x; 3x for smoothness). A CT, a cine frame or noise lies far outside. A raw
  scan z-scored here whose field of view is far smaller than a whole acquisition (cropped before dtml saw
  it) scores its in-plane extent over 200 mm at most (dtml_deploy/fov.py).

The reference statistics (label volumes, intensity quantiles) come from the bundle's labeled training
cases and travel in its config.json under `qc`; the threshold was picked for recall on a calibration set
(the developers' 64 unlabeled LA cases, checked by leave-one-out: benchmarks/qc_calibration.py). Features
that the score does not use are reported too, so a report can be recalibrated without re-running the
networks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from dtml_deploy.engine.postprocess import largest_component
from dtml_deploy.fov import fov_part
from dtml_deploy.qc_reference import QUANTILES, QCReference
from dtml_deploy.qc_reference import reference_of as reference_of  # re-exported for the QC's callers

BAND = 3  # voxels on each side of the mask's surface that make up the boundary band


@dataclass
class QCResult:
    """The score, its parts (each in [0, 1]) and every feature measured."""

    score: float
    parts: dict[str, float]
    features: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None

    @property
    def flagged(self) -> bool:
        return self.threshold is not None and self.score < self.threshold

    def summary(self) -> str:
        """'agreement 0.91, volume 1.00, intensity 0.42' for a console line."""
        return ", ".join(f"{k} {v:.2f}" for k, v in self.parts.items())

    def to_dict(self) -> dict[str, Any]:
        return {"score": _round(self.score), "threshold": self.threshold, "flagged": self.flagged,
                "parts": {k: _round(v) for k, v in self.parts.items()},
                "features": {k: _round(v) for k, v in self.features.items()}}


def _round(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 5)


def _standardised(x: np.ndarray) -> np.ndarray:
    v = np.asarray(x, dtype=np.float32)
    std = float(v.std(dtype=np.float64))
    return (v - float(v.mean(dtype=np.float64))) / (std if std > 0 else 1.0)


def intensity_stats(x: np.ndarray) -> dict[str, Any]:
    """Shape statistics of a scan's intensities, standardised over the scan itself (so neither the
    scanner's scale nor a z-scoring before cropping matters):
    `quantiles` of the histogram; `point_mass`, the share of voxels in its fullest bin (air or an empty
    background puts a large share there, LA crops have none); `smoothness`, the mean correlation of
    neighbouring voxels along the three axes (an MRI is smooth at 0.625 mm, noise is not)."""
    v = _standardised(x)
    flat = v.ravel()
    sample = flat[:: max(flat.size // 1_000_000, 1)]  # quantiles move by far less than the scans differ
    hist, _ = np.histogram(sample, bins=64, range=(-4.0, 6.0))
    corr = [float(np.mean(v[tuple(slice(1, None) if i == a else slice(None) for i in range(3))]
                          * v[tuple(slice(None, -1) if i == a else slice(None) for i in range(3))], dtype=np.float64))
            for a in range(3) if v.shape[a] > 1]
    return {"quantiles": np.quantile(sample, QUANTILES), "point_mass": float(hist.max()) / sample.size,
            "smoothness": float(np.mean(corr)) if corr else 0.0}


def intensity_features(x: np.ndarray, ref: QCReference) -> dict[str, float]:
    """The scan's distance from the training scans' intensity profile, and its point mass and smoothness."""
    st = intensity_stats(x)
    dist = float(np.abs(st["quantiles"] - np.asarray(ref.intensity_quantiles)).mean())
    return {"intensity_distance": dist, "intensity_point_mass": st["point_mass"],
            "intensity_smoothness": st["smoothness"]}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _band(mask: np.ndarray, width: int) -> np.ndarray:
    """Voxels within `width` of the mask's surface, on both sides (cropped to the mask's box + width)."""
    ball = ndimage.generate_binary_structure(3, 1)
    return ndimage.binary_dilation(mask, ball, width) & ~ndimage.binary_erosion(mask, ball, width)


def _crop_box(masks: list[np.ndarray], margin: int) -> tuple[slice, ...] | None:
    union = np.logical_or.reduce(masks)
    if not union.any():
        return None
    idx = np.nonzero(union)
    return tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in idx)


def head_features(p_seg: np.ndarray, p_dis: np.ndarray, mask: np.ndarray, raw_mask: np.ndarray,
                  threshold: float = 0.5, tta_spread: np.ndarray | None = None) -> dict[str, float]:
    """Model-side features of one case: the heads' agreement (whole mask and boundary band), their
    disagreement volume relative to the mask, the share of the mask LCC removed and, with TTA, the mean
    spread between flips in the band. `mask` is the final mask, `raw_mask` the head's before LCC."""
    a, b, m = p_seg > threshold, p_dis > threshold, mask.astype(bool)
    n_raw = int(raw_mask.sum())
    f = {"agreement": _dice(a, b), "lcc_removed": 0.0 if n_raw == 0 else 1.0 - int(m.sum()) / n_raw,
         "disagreement_ratio": float((a ^ b).sum()) / max(int(m.sum()), 1)}
    box = _crop_box([a, b, m], BAND + 1)
    if box is None:
        f.update(band_agreement=1.0, band_soft_agreement=1.0)
        if tta_spread is not None:
            f["tta_spread"] = 0.0
        return f
    band = _band(m[box], BAND) if m.any() else (a[box] | b[box])
    f["band_agreement"] = _dice(a[box] & band, b[box] & band)
    diff = np.abs(p_seg[box][band].astype(np.float64) - p_dis[box][band])
    f["band_soft_agreement"] = 1.0 - float(diff.mean()) if diff.size else 1.0
    if tta_spread is not None:
        f["tta_spread"] = float(tta_spread[box][band].mean()) if band.any() else 0.0
    return f


def case_features(image: np.ndarray, p_seg: np.ndarray, p_dis: np.ndarray, head: str, threshold: float = 0.5,
                  spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), lcc: bool = True,
                  tta_spread: np.ndarray | None = None, reference: QCReference | None = None,
                  intensity: str | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """The final mask of `head` from both heads' maps, and every QC feature (on the network's grid);
    `intensity` is what intensity.prepare did to the scan ('zscore' makes a small field of view count)."""
    prob = {"seg": p_seg, "sdm": p_dis}.get(head)
    prob = 0.5 * (p_seg + p_dis) if prob is None else prob
    raw = (prob > threshold).astype(np.uint8)
    mask = largest_component(raw) if lcc else raw
    f = head_features(p_seg, p_dis, mask, raw, threshold, tta_spread)
    f["volume_ml"] = float(mask.sum()) * float(np.prod(spacing)) / 1000.0
    if reference is not None:
        f.update(intensity_features(image, reference))
        f["fov_part"] = fov_part(image.shape, spacing, intensity)
    return mask, f


# How far beyond the training cases' extreme a statistic may lie before its part drops below 1: the
# 16 labeled cases do not span every good scan (the calibration set has good masks of 23 mL, and scans
# 1.6x farther from the intensity profile than any training scan).
VOLUME_SLACK = 2.0
INTENSITY_SLACK = 1.5
# Neighbour correlation depends on content too (a tight crop around the atrium is less smooth than the
# training crops), so its shortfall from 1 gets more room; noise has a shortfall of 1, 20x the training's.
SMOOTHNESS_SLACK = 3.0


def _within(value: float, limit: float) -> float:
    """1.0 up to `limit`, then limit / value: a statistic twice past its limit scores 0.5."""
    return 1.0 if value <= limit else float(limit / value)


def score(features: Mapping[str, float], ref: QCReference) -> QCResult:
    """Combine the features into the score (the product of the parts)."""
    lo, hi = ref.agreement_scale
    parts = {"agreement": float(np.clip((features[ref.agreement_feature] - lo) / (hi - lo), 0.0, 1.0))}
    v, (vmin, vmax) = features["volume_ml"], ref.volume_ml
    parts["volume"] = 0.0 if v <= 0 else min(_within(v, VOLUME_SLACK * vmax), _within(vmin / VOLUME_SLACK / v, 1.0))
    if "intensity_distance" in features:
        parts["intensity"] = min(
            _within(features["intensity_distance"], INTENSITY_SLACK * ref.intensity_distance),
            _within(features["intensity_point_mass"], INTENSITY_SLACK * ref.point_mass),
            _within(1.0 - features["intensity_smoothness"], SMOOTHNESS_SLACK * (1.0 - ref.smoothness)),
            features.get("fov_part", 1.0))  # a raw scan cropped before it was z-scored (dtml_deploy/fov.py)
    return QCResult(score=float(np.prod(list(parts.values()))), parts=parts, features=dict(features),
                    threshold=ref.threshold)


def assess(image: np.ndarray, p_seg: np.ndarray, p_dis: np.ndarray, head: str, ref: QCReference,
           threshold: float = 0.5, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), lcc: bool = True,
           tta_spread: np.ndarray | None = None, intensity: str | None = None) -> QCResult:
    """The QC score of one case from the network input and both heads' maps (on the network's grid)."""
    _, feats = case_features(image, p_seg, p_dis, head, threshold, spacing, lcc, tta_spread, ref, intensity)
    return score(feats, ref)


def warning_line(case: str, qc: Mapping[str, Any] | None) -> str | None:
    """The console's line for a flagged case (from a report's `qc` dict), None when not flagged."""
    if not qc or not qc.get("flagged"):
        return None
    parts = ", ".join(f"{k} {v:.2f}" for k, v in qc["parts"].items())
    return f"warning: {case}: QC score {qc['score']:.2f} below {qc['threshold']:.2f} ({parts}) - check this mask"
