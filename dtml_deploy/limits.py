"""Bounds on the work one case may ask for, checked before anything large is allocated.

A header with a 50 mm voxel size, `--overlap 0.999` or `--stride 1 1 1` turn an ordinary scan into
billions of voxels or millions of windows; these checks refuse such a case with the estimate in the
message instead of letting it allocate hundreds of GB or run for days.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from dtml_deploy.errors import InputError

# Measured seconds per window of the shipped model's size (n_filters 16, patch 112x112x80, fp32 on the
# 2-core development CPU; fp16 with CUDA graphs on one H200): the README's speed tables.
_REF_WINDOW_VOXELS = 112 * 112 * 80
_REF_FILTERS = 16
_REF_SECONDS = {"cpu": 0.8, "cuda": 0.002}


@dataclass(frozen=True)
class WorkLimits:
    """What one case may cost. Each field has a CLI override only where a user may need more."""

    max_voxels: int = 2_000_000_000  # voxels of a volume as read or as resampled for the model
    max_windows: int = 4096  # sliding windows per case (the paper's stride on a 640x640x88 LA scan: 2883)
    # Host bytes per voxel of the engine's grid: input, padded copy, mask and slack for resampling; each
    # accumulated or kept map adds 4 more (see `case_bytes`).
    bytes_per_voxel: int = 16
    # Peak activation bytes per window voxel and first-stage filter in an fp32 forward (about 0.6 GB per
    # 112x112x80 window at 16 filters, from the page faults measured on the CPU backend).
    activation_bytes: int = 40

    def __post_init__(self) -> None:
        for name in ("max_voxels", "max_windows", "bytes_per_voxel", "activation_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def available_memory() -> int | None:
    """Bytes of host memory the kernel says are available (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def check_voxels(shape: Sequence[int], limits: WorkLimits, name: str, what: str = "volume") -> None:
    """Refuse a volume of more than `limits.max_voxels` voxels."""
    n = math.prod(int(s) for s in shape)
    if n > limits.max_voxels:
        raise InputError(f"{name}: the {what} would be {_shape(shape)} = {n:,} voxels, over the limit of "
                         f"{limits.max_voxels:,}; check the file's voxel size (or pass --spacing)")


def case_bytes(shape: Sequence[int], maps: int, limits: WorkLimits) -> int:
    """Host bytes a case needs on the engine's grid of `shape`, with `maps` float32 maps accumulated or kept."""
    return math.prod(int(s) for s in shape) * (limits.bytes_per_voxel + 4 * maps)


def check_memory(need: int, name: str, what: str, hint: str, available: int | None = None) -> None:
    """Refuse work whose estimate `need` exceeds the memory available now."""
    have = available_memory() if available is None else available
    if have is not None and need > have:
        raise InputError(f"{name}: {what} needs about {_gb(need)} of memory, {_gb(have)} is available; {hint}")


def seconds_per_window(device_type: str, patch: Sequence[int], n_filters: int) -> float:
    """A rough time per window, scaled from the measured reference by the forward's FLOPs."""
    scale = math.prod(patch) / _REF_WINDOW_VOXELS * (n_filters / _REF_FILTERS) ** 2
    return _REF_SECONDS.get(device_type, _REF_SECONDS["cpu"]) * scale


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:,.0f} days"


def check_windows(n: int, shape: Sequence[int], limits: WorkLimits, name: str, per_window_s: float,
                  device_type: str) -> None:
    """Refuse more than `limits.max_windows` windows, saying how long they would take."""
    if n > limits.max_windows:
        raise InputError(
            f"{name}: the window grid gives {n:,} windows on the {_shape(shape)} volume, over the limit of "
            f"{limits.max_windows:,} (about {_duration(n * per_window_s)} on the {device_type} at "
            f"~{per_window_s:.2g} s per window); lower --overlap or raise --stride, or pass --max-windows {n} "
            f"to run it anyway")
