"""Ground-truth signed distance map (SDM) of a binary mask, as DTC's ``compute_sdf`` (the method's code).

For a mask with foreground and background (unit voxel spacing, scipy's exact EDT)::

    posdis = distance_transform_edt(mask)     # inside: distance to the nearest background voxel
    negdis = distance_transform_edt(~mask)    # outside: distance to the nearest foreground voxel
    sdf = (negdis - min(negdis)) / (max(negdis) - min(negdis))
        - (posdis - min(posdis)) / (max(posdis) - min(posdis))
    sdf[inner boundary] = 0

so values are negative inside, positive outside, 0 on the inner boundary, and lie in [-1, 1]. The inner
boundary is skimage's ``find_boundaries(mask, mode='inner')`` (connectivity 1, background 0), written
here without skimage: a foreground voxel with at least one background face neighbour inside the array
(skimage's grey dilation/erosion use mode 'reflect', so the array edge never makes a boundary).

Degenerate cases (DTC has none of these guards):

- no foreground: all zeros (as DTC);
- a normalised term whose distance map is constant (max == min) is 0 instead of 0/0;
- all foreground: there is no background to measure the inside distance from (scipy's EDT then
  measures to a virtual voxel outside the array, and DTC's result is all NaN), so that term is 0 too
  and the map is all zeros, like the empty mask.

The computation is in float64 like DTC's and the result is cast to float32.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["inner_boundary", "signed_distance_batch", "signed_distance_map"]


def _as_binary(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """Validate a {0, 1} (or boolean) array and return it as bool."""
    m = np.asarray(mask)
    if m.dtype == bool:
        return m
    if m.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a boolean or numeric array, got dtype {m.dtype}")
    if not np.all((m == 0) | (m == 1)):
        raise ValueError(f"{name} must be binary (values 0 and 1 only)")
    return m.astype(bool)


def inner_boundary(mask: np.ndarray) -> np.ndarray:
    """skimage ``find_boundaries(mask, connectivity=1, mode='inner')`` for a binary mask.

    A foreground voxel is on the boundary when one of its 2*ndim face neighbours inside the array is
    background; neighbours outside the array do not count (skimage's morphology reflects at the edge).
    """
    pos = _as_binary(mask)
    if pos.ndim == 0:
        raise ValueError("mask must have at least one dimension")
    touches_background = np.zeros_like(pos)
    for axis in range(pos.ndim):
        head = [slice(None)] * pos.ndim
        tail = [slice(None)] * pos.ndim
        head[axis], tail[axis] = slice(None, -1), slice(1, None)
        touches_background[tuple(head)] |= ~pos[tuple(tail)]  # neighbour i+1 is background
        touches_background[tuple(tail)] |= ~pos[tuple(head)]  # neighbour i-1 is background
    return pos & touches_background


def _normalised(dist: np.ndarray) -> np.ndarray:
    """(d - min) / (max - min), or zeros when the map is constant."""
    lo, hi = dist.min(), dist.max()
    if hi == lo:
        return np.zeros_like(dist)
    return (dist - lo) / (hi - lo)


def signed_distance_map(mask: np.ndarray) -> np.ndarray:
    """Normalised signed distance map of one binary mask (any ndim >= 1), float32, same shape.

    Negative inside, positive outside, 0 on the inner boundary, in [-1, 1]; all zeros when the mask is
    empty or all foreground (see the module docstring).
    """
    pos = _as_binary(mask)
    if pos.ndim == 0:
        raise ValueError("mask must have at least one dimension")
    if not pos.any() or pos.all():
        return np.zeros(pos.shape, dtype=np.float32)
    neg = ~pos
    posdis = ndi.distance_transform_edt(pos)
    negdis = ndi.distance_transform_edt(neg)
    sdf = _normalised(negdis) - _normalised(posdis)
    sdf[inner_boundary(pos)] = 0
    return sdf.astype(np.float32)


def signed_distance_batch(masks: np.ndarray) -> np.ndarray:
    """``signed_distance_map`` of each mask of a batch ``[B, X, Y, Z]`` (any ``[B, *spatial]``), float32."""
    m = np.asarray(masks)
    if m.ndim < 2:
        raise ValueError(f"masks must be [B, *spatial] with at least one spatial axis, got shape {m.shape}")
    out = np.empty(m.shape, dtype=np.float32)
    for b in range(m.shape[0]):
        out[b] = signed_distance_map(m[b])
    return out
