"""Mask post-processing: keep the largest connected component (the paper's code does, by default)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# skimage.measure.label's default for 3D (what the paper's getLargestCC uses): full 26-connectivity.
_FULL = np.ones((3, 3, 3), dtype=bool)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected foreground component as uint8; an empty mask stays empty."""
    labels, n = ndimage.label(mask, structure=_FULL)
    if n <= 1:
        return (labels > 0).astype(np.uint8)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels == int(np.argmax(sizes))).astype(np.uint8)
