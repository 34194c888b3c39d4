"""Window grids: where windows start along each axis, and padding for volumes smaller than a patch."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The paper's test loop (UA-MT/DTC/DTML test_util.py): stride 18 in x/y and 4 in z.
PAPER_STRIDE = (18, 18, 4)


@dataclass(frozen=True)
class GridSpec:
    """Either an `overlap` fraction in [0, 1) or a fixed `stride` per axis (the paper's mode)."""

    overlap: float = 0.5
    stride: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.stride is None and not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.stride is not None and (len(self.stride) != 3 or min(self.stride) < 1):
            raise ValueError(f"stride must be 3 positive integers, got {self.stride}")


def check_stride(spec: GridSpec, patch: Sequence[int]) -> None:
    """Refuse a fixed stride longer than the patch on any axis (once per run, before any case is read): the
    voxels between two windows would never be predicted, whatever the volume."""
    if spec.stride is not None and any(s > p for s, p in zip(spec.stride, patch)):
        raise ValueError(f"--stride {' '.join(map(str, spec.stride))} is longer than the model's patch "
                         f"{' '.join(map(str, patch))} on some axis: voxels between windows would never be "
                         f"predicted; use at most the patch (paper: {' '.join(map(str, PAPER_STRIDE))})")


def tile_starts_overlap(length: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced starts, first at 0 and last flush with the end, step <= patch * (1 - overlap)."""
    if length <= patch:
        return [0]
    step = max(1.0, patch * (1.0 - overlap))
    n = math.ceil((length - patch) / step) + 1
    return [round(i * (length - patch) / (n - 1)) for i in range(n)]


def tile_starts_stride(length: int, patch: int, stride: int) -> list[int]:
    """The paper's fixed-stride starts: stride * i, the last clamped to length - patch."""
    if length <= patch:
        return [0]
    n = math.ceil((length - patch) / stride) + 1
    return [min(stride * i, length - patch) for i in range(n)]


def axis_starts(shape: Sequence[int], patch: Sequence[int], spec: GridSpec) -> list[list[int]]:
    """Window starts along each axis of a (padded) volume of `shape`."""
    check_stride(spec, patch)
    per_axis = []
    for a in range(3):
        if spec.stride is not None:
            per_axis.append(tile_starts_stride(shape[a], patch[a], spec.stride[a]))
        else:
            per_axis.append(tile_starts_overlap(shape[a], patch[a], spec.overlap))
    return per_axis


def window_count(shape: Sequence[int], patch: Sequence[int], spec: GridSpec) -> int:
    """How many windows `window_starts` gives for an unpadded volume of `shape`, without listing them."""
    padded = [max(int(s), int(p)) for s, p in zip(shape, patch)]
    return math.prod(len(a) for a in axis_starts(padded, patch, spec))


def window_starts(shape: Sequence[int], patch: Sequence[int], spec: GridSpec) -> list[tuple[int, int, int]]:
    """All window corners for a (padded) volume of `shape`, in x-major order."""
    return [tuple(c) for c in itertools.product(*axis_starts(shape, patch, spec))]  # type: ignore[misc]


def pad_amounts(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """Symmetric padding (as the paper's code: left = pad // 2) that lifts each axis to the patch."""
    pads = []
    for s, p in zip(shape, patch):
        total = max(p - s, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def pad_volume(volume: np.ndarray, patch: Sequence[int]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Zero-pad a volume smaller than the patch; returns the padded array and the pads used."""
    pads = pad_amounts(volume.shape, patch)
    if any(lo or hi for lo, hi in pads):
        volume = np.pad(volume, pads, mode="constant", constant_values=0)
    return volume, pads
