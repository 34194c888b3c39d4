"""Timing one row of `dtml benchmark`: whole passes over the cases at each batch size, and memory."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from dtml_deploy.segment import Segmenter
from dtml_export.bench_report import OUTLIER_FACTOR, BenchmarkRow


@dataclass
class Case:
    name: str
    image: np.ndarray
    spacing: tuple[float, float, float] | None


@dataclass
class Timing:
    """One batch size of one row."""

    ms_per_window: float
    seconds_per_case: list[float]
    windows: int
    mask: np.ndarray


def default_batches(cuda: bool) -> tuple[int, ...]:
    return (1, 8, 16) if cuda else (1, 2, 4)


def batch_values(requested: tuple[int, ...], cuda: bool) -> tuple[int, ...]:
    """Sorted distinct batch sizes, batch 1 always among them."""
    return tuple(sorted({1, *(requested or default_batches(cuda))}))


def maxrss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def one_pass(segmenter: Segmenter, cases: list[Case]) -> tuple[float, float, int, np.ndarray]:
    """Wall seconds, engine seconds, windows, and the first case's final mask of one pass."""
    wall = engine = 0.0
    windows = 0
    first: np.ndarray | None = None
    for case in cases:
        t = time.perf_counter()
        seg = segmenter.segment_array(case.image, case.spacing, case.name)
        wall += time.perf_counter() - t
        engine += seg.seconds.get("windows", 0.0) + seg.seconds.get("finalise", 0.0)
        windows += seg.windows
        if first is None:
            first = seg.mask
    assert first is not None
    return wall, engine, windows, first


def time_batch(segmenter: Segmenter, cases: list[Case], warmup: int, repeats: int) -> Timing:
    mask = None
    for _ in range(warmup):
        _, _, _, m = one_pass(segmenter, cases)
        mask = m if mask is None else mask
    walls, per_window = [], []
    windows = 0
    for _ in range(repeats):
        wall, engine, windows, m = one_pass(segmenter, cases)
        mask = m if mask is None else mask
        walls.append(wall / len(cases))
        per_window.append(1000.0 * engine / max(windows, 1))
    assert mask is not None
    return Timing(statistics.median(per_window), walls, windows, mask)


def reset_memory(device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return None
    return maxrss_mb()


def record_memory(row: BenchmarkRow, device: torch.device, before: float | None) -> None:
    if device.type == "cuda":
        row.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        return
    after = maxrss_mb()
    row.peak_memory_mb = after
    row.memory_growth_mb = None if after is None or before is None else after - before


def fill_timing(row: BenchmarkRow, timings: dict[int, Timing], voxels_per_case: float) -> None:
    row.ms_per_window = {str(b): t.ms_per_window for b, t in timings.items()}
    row.ms_per_window_b1 = timings[1].ms_per_window if 1 in timings else None
    best = min(timings, key=lambda b: timings[b].ms_per_window)
    runs = timings[best].seconds_per_case
    median = statistics.median(runs)
    row.best_batch, row.ms_per_window_best = best, timings[best].ms_per_window
    row.windows = timings[best].windows
    row.seconds_per_case, row.seconds_min, row.seconds_max = median, min(runs), max(runs)
    row.outliers = sum(r > OUTLIER_FACTOR * median for r in runs)
    row.runs = runs
    row.mvox_per_s = voxels_per_case / median / 1e6 if median > 0 else None


