"""Per-window weights for stitching: constant (the paper's plain average) or Gaussian.

Weights are separable: a window's weight is the outer product of one vector per axis. Because the
windows also form a Cartesian grid, the total weight at any voxel is the outer product of per-axis
sums, so the engine never accumulates a weight volume.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch

Blend = Literal["gaussian", "constant"]
BLENDS: tuple[str, ...] = get_args(Blend)
SIGMA_SCALE = 0.125  # sigma = patch / 8, as nnU-Net
AXIS_FLOOR = 1e-3  # per-axis floor, so the border of a window keeps a usable weight


@functools.lru_cache(maxsize=32)
def axis_weights(patch: int, blend: Blend) -> np.ndarray:
    """The 1D weight profile of one axis of a window (float64, max 1)."""
    if blend == "constant":
        return np.ones(patch)
    if blend != "gaussian":
        raise ValueError(f"blend must be 'constant' or 'gaussian', got {blend!r}")
    x = np.arange(patch, dtype=np.float64) - (patch - 1) / 2.0
    w = np.exp(-0.5 * (x / (patch * SIGMA_SCALE)) ** 2)
    return np.maximum(w / w.max(), AXIS_FLOOR)


def window_weight(patch: Sequence[int], blend: Blend, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Weights of shape `patch`, fp32 on `device`; None for constant blending (no multiply needed)."""
    if blend == "constant":
        return None
    wx, wy, wz = (axis_weights(int(p), blend) for p in patch)
    return torch.from_numpy((wx[:, None, None] * wy[None, :, None] * wz[None, None, :]).astype(np.float32)).to(device)


def weight_sums(shape: Sequence[int], patch: Sequence[int], starts_per_axis: Sequence[Sequence[int]],
                blend: Blend) -> list[np.ndarray]:
    """Per-axis sums of window weights; their outer product is the total weight at every voxel."""
    sums = []
    for a in range(3):
        w = axis_weights(int(patch[a]), blend)
        total = np.zeros(int(shape[a]), dtype=np.float64)
        for s in starts_per_axis[a]:
            total[s:s + int(patch[a])] += w
        sums.append(total)
    return sums
