"""Intensity normalisation of a whole scan, as the training data was prepared."""

from __future__ import annotations

import numpy as np

from dtml_deploy.config import IntensityConfig
from dtml_deploy.errors import InputError


def normalise(image: np.ndarray, cfg: IntensityConfig, name: str = "image") -> np.ndarray:
    """z-score over all voxels (mean/std in float64) -> float32; a constant image is an error."""
    if cfg.mode == "none":
        return np.asarray(image, dtype=np.float32)
    mean = float(image.mean(dtype=np.float64))
    std = float(image.std(dtype=np.float64))
    if not std > 1e-8 * max(1.0, abs(mean)):
        raise InputError(f"{name}: constant image (every voxel is {mean:g}); nothing to segment")
    return ((image - mean) / std).astype(np.float32)
