"""Intensity normalisation, as the training data was prepared: z-score over the whole scan.

LA2018 (and every paper in this line) ships images that were z-scored over the whole original scan
and then cropped around the atrium. Z-scoring such a crop again would shift its intensities away
from what the networks saw, so the default policy, `auto`, z-scores a scan only when it does not
already look z-scored: z-scored data has negative values, a mean within a few units of 0 and a
standard deviation near 1 (LA2018 crops: mean 0.05-1.9, std 0.31-1.65, min < -0.44), while raw
scanner output (MRI magnitudes, [0, 1]-scaled images, CT in HU) fails at least one of these tests.
The policy that was applied is reported per case.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dtml_deploy.config import IntensityConfig
from dtml_deploy.errors import InputError

Policy = Literal["auto", "zscore", "none"]
POLICIES: tuple[str, ...] = ("auto", "zscore", "none")


def normalise(image: np.ndarray, cfg: IntensityConfig, name: str = "image") -> np.ndarray:
    """z-score over all voxels, computed in float64 -> float32; a constant image is an error."""
    if cfg.mode == "none":
        return np.asarray(image, dtype=np.float32)
    x = np.asarray(image, dtype=np.float64)
    mean, std = float(x.mean()), float(x.std())
    if not std > 1e-8 * max(1.0, abs(mean)):
        raise InputError(f"{name}: constant image (every voxel is {mean:g}); nothing to segment")
    return ((x - mean) / std).astype(np.float32)


def looks_zscored(image: np.ndarray) -> bool:
    """True for data that was already z-scored (possibly over a larger scan, then cropped)."""
    x = np.asarray(image)
    mean, std = float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64))
    return float(x.min()) < 0.0 and abs(mean) < 3.0 and 0.25 <= std <= 4.0


def prepare(image: np.ndarray, cfg: IntensityConfig, policy: Policy = "auto",
            name: str = "image") -> tuple[np.ndarray, str]:
    """Network input for `image` and a word saying what was done ('zscore', 'as stored')."""
    if policy not in POLICIES:
        raise ValueError(f"intensity policy must be one of {POLICIES}, got {policy!r}")
    if np.iscomplexobj(image):  # arrays handed in directly; files are checked when read
        raise InputError(f"{name}: complex-valued image; pass its magnitude or real part")
    x = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():  # files are checked when read; arrays handed in directly are checked here
        raise InputError(f"{name}: {int(x.size - finite.sum())} voxels are NaN or infinite")
    if float(x.max()) == float(x.min()):
        raise InputError(f"{name}: constant image (every voxel is {float(x.min()):g}); nothing to segment")
    if cfg.mode == "none" or policy == "none" or (policy == "auto" and looks_zscored(x)):
        return x, "as stored"
    return normalise(x, cfg, name), "zscore"
