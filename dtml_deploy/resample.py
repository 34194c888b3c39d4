"""Trilinear resampling between a scan's voxel spacing and the model's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def spacing_differs(a: Sequence[float], b: Sequence[float], rtol: float = 1e-3) -> bool:
    """True when any axis spacing differs by more than `rtol` relative."""
    return any(abs(x - y) > rtol * max(abs(x), abs(y)) for x, y in zip(a, b))


def target_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Shape that covers the same physical extent at `new_spacing`."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, new_spacing))


def resize(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resize of a 3D float array to `shape` (align_corners=False), float32 out."""
    if tuple(array.shape) == tuple(shape):
        return np.asarray(array, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()
