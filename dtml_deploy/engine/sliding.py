"""The fused sliding-window engine.

One pass over the windows: each batch runs both networks once (p_seg, p_dis = sigmoid(-k sdm) and
sdm come out of the same forward), is weighted and added into fp32 accumulators that live on the
compute device. Blending weights are separable (constant or Gaussian per axis on a Cartesian grid of
windows), so their sum is an outer product of three vectors and never needs an accumulator of its
own. A single final pass per slab divides by the weights, combines the heads, thresholds, and
measures the two heads' agreement; only the results travel to the host.

When the accumulators would not fit on the device, windows are processed in slabs along the first
axis with a rolling accumulator: finished voxels leave for the host, the overlap carries over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from dtml_deploy.backends.base import Backend
from dtml_deploy.engine.blending import Blend, weight_sums, window_weight
from dtml_deploy.engine.grid import GridSpec, check_stride, pad_volume, window_starts
from dtml_deploy.errors import OutOfMemory

Head = Literal["seg", "sdm", "mean"]
HEADS: tuple[str, ...] = ("seg", "sdm", "mean")
# Mirror TTA variants, as flipped spatial axes of a window: the training augmentation flipped axis 0 or 1
# after a rot90 in the x-y plane, so every combination of x and y flips is a pose the networks saw.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (0,), (1,), (0, 1))


@dataclass(frozen=True)
class EngineConfig:
    """How windows are laid out, stitched and turned into a mask."""

    grid: GridSpec = field(default_factory=GridSpec)
    blend: Blend = "gaussian"
    # seg: p_seg (the paper's); sdm: p_dis; mean: (p_seg + p_dis) / 2, the most accurate measured on the
    # 64 unlabeled LA cases (benchmarks/results/qc_calibration_cpu.json), hence the default.
    head: Head = "mean"
    threshold: float = 0.5
    qc: bool = True  # run both heads to report their agreement (and allow an uncertainty map)
    keep_prob: bool = False
    keep_sdm: bool = False
    keep_uncertainty: bool = False
    keep_heads: bool = False  # hand p_seg and p_dis to the host (the QC score reads them)
    tta: bool = False  # mirror test-time augmentation over x, y and both (training flipped axis 0 or 1)
    max_accumulator_bytes: int | None = None  # None: as much as the device has free

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")

    @property
    def channels(self) -> tuple[str, ...]:
        """Per-window maps the backend must produce and the engine must accumulate."""
        need = {"seg": {"p_seg"}, "sdm": {"p_dis"}, "mean": {"p_seg", "p_dis"}}[self.head]
        if self.qc or self.keep_uncertainty or self.keep_heads:
            need |= {"p_seg", "p_dis"}
        if self.keep_sdm:
            need.add("sdm")
        return tuple(c for c in ("p_seg", "p_dis", "sdm") if c in need)


@dataclass
class StitchResult:
    """Host-side outputs on the (unpadded) input grid."""

    mask: np.ndarray  # uint8, head probability > threshold (before any connected-component step)
    prob: np.ndarray | None = None
    sdm: np.ndarray | None = None
    uncertainty: np.ndarray | None = None  # |p_seg - p_dis|
    p_seg: np.ndarray | None = None  # with keep_heads
    p_dis: np.ndarray | None = None
    tta_spread: np.ndarray | None = None  # with tta: per-voxel std of the head's probability over the flips
    agreement: float | None = None  # Dice between (p_seg > t) and (p_dis > t); 1.0 if both empty
    n_windows: int = 0
    n_forwards: int = 0  # windows through the networks (n_windows x flips with tta)
    n_batches: int = 0
    n_slabs: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def _flip(t: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Mirror the last three (spatial) dims of `t` listed in `axes`; a flip is its own inverse."""
    return torch.flip(t, [a - 3 for a in axes]) if axes else t


@dataclass
class _Plan:
    """What one run needs, worked out once per volume."""

    volume: torch.Tensor  # padded, on the device
    pads: list[tuple[int, int]]
    shape: tuple[int, ...]
    starts: list[tuple[int, int, int]]
    factors: list[np.ndarray]  # per-axis weight sums
    weight: torch.Tensor | None  # per-window weight (None: constant)
    n_acc: int  # accumulator channels
    groups: list[list[int]]  # x starts of each slab


@dataclass
class _Counts:
    windows: int = 0
    batches: int = 0
    t_final: float = 0.0


def _slab_groups(xs: list[int], px: int, max_width: int) -> list[list[int]]:
    groups: list[list[int]] = [[xs[0]]]
    for s in xs[1:]:
        if s + px - groups[-1][0] <= max_width:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


class SlidingWindowEngine:
    """Stitches a backend's per-window maps over a whole volume."""

    def __init__(self, backend: Backend, patch: tuple[int, int, int], config: EngineConfig) -> None:
        missing = [c for c in config.channels if c not in backend.outputs]
        if missing:
            raise ValueError(f"backend does not produce {missing}; create it with outputs={config.channels}")
        check_stride(config.grid, patch)  # a usage error up front, not one per case
        self.backend = backend
        self.patch = tuple(int(p) for p in patch)
        self.config = config
        self._index = {c: backend.outputs.index(c) for c in config.channels}
        # accumulator channel i holds config.channels[i]; pick them out of the backend's output order
        order = [backend.outputs.index(c) for c in config.channels]
        self._select = None if order == list(range(len(backend.outputs))) else order
        self._flips = TTA_FLIPS if config.tta else ((),)

    def run(self, volume: np.ndarray, progress: Callable[[int, int], None] | None = None) -> StitchResult:
        """Segment a normalised float32 volume (X, Y, Z)."""
        try:
            return self._run(volume, progress)
        except torch.cuda.OutOfMemoryError:
            raise OutOfMemory(
                f"the GPU ran out of memory (batch {self.backend.options.batch}); "
                "lower --batch, or run with --device cpu") from None
        except MemoryError:
            raise OutOfMemory(f"the host ran out of memory on a {'x'.join(map(str, volume.shape))} volume "
                              f"(batch {self.backend.options.batch}); lower --batch or free memory") from None

    def _run(self, volume: np.ndarray, progress: Callable[[int, int], None] | None) -> StitchResult:
        t0 = time.perf_counter()
        plan = self._plan(volume)
        out = _HostOutputs(plan.shape, self.config, plan.pads, volume.shape)
        counts = _Counts()
        carry: torch.Tensor | None = None
        for gi, group in enumerate(plan.groups):
            lo, hi = group[0], group[-1] + self.patch[0]
            acc = torch.zeros((plan.n_acc, hi - lo, plan.shape[1], plan.shape[2]), dtype=torch.float32,
                              device=self.backend.device)
            if carry is not None:
                acc[:, :carry.shape[1]] = carry
            members = set(group)
            self._run_windows(plan, [s for s in plan.starts if s[0] in members], acc, lo, counts, progress)
            if self.backend.device.type == "cuda":
                torch.cuda.synchronize(self.backend.device)
            tf = time.perf_counter()
            last = gi + 1 == len(plan.groups)
            nxt = hi if last else plan.groups[gi + 1][0]
            self._finalise(acc[:, :nxt - lo], lo, plan.factors, out)
            carry = None if last else acc[:, nxt - lo:].clone()
            counts.t_final += time.perf_counter() - tf
        res = out.result(plan.pads, volume.shape)
        res.n_windows, res.n_batches, res.n_slabs = len(plan.starts), counts.batches, len(plan.groups)
        res.n_forwards = len(plan.starts) * len(self._flips)
        # Stages that do not nest, so a report can sum them; set-up (padding, upload) counts as windows.
        res.seconds = {"windows": time.perf_counter() - t0 - counts.t_final, "finalise": counts.t_final}
        return res

    def _plan(self, volume: np.ndarray) -> _Plan:
        """Pad, lay out the windows, precompute the separable weights and the slabs; upload the volume."""
        cfg, patch, dev = self.config, self.patch, self.backend.device
        padded, pads = pad_volume(np.asarray(volume, dtype=np.float32), patch)
        shape = padded.shape
        starts = window_starts(shape, patch, cfg.grid)
        per_axis = [sorted({s[a] for s in starts}) for a in range(3)]
        n_acc = len(self._index) + (1 if cfg.tta else 0)  # with tta, one more channel: the flips' variance
        return _Plan(
            volume=torch.from_numpy(padded).to(dev, self.backend.input_dtype), pads=pads, shape=shape,
            starts=starts, factors=weight_sums(shape, patch, per_axis, cfg.blend),
            weight=window_weight(patch, cfg.blend, dev), n_acc=n_acc,
            groups=_slab_groups(per_axis[0], patch[0], self._max_slab_width(shape, n_acc)))

    def _run_windows(self, plan: _Plan, windows: list[tuple[int, int, int]], acc: torch.Tensor, lo: int,
                     counts: _Counts, progress: Callable[[int, int], None] | None) -> None:
        """Run every (window, flip) pair of a slab in fixed-size batches; a window is blended into `acc`
        once all its flips are back (they are consecutive, so at most a batch's worth waits)."""
        patch, flips = self.patch, self._flips
        jobs = [(w, f) for w in windows for f in flips]
        batch = min(self.backend.options.batch, len(jobs))  # never pad a short volume up to --batch
        pending: list[torch.Tensor] = []
        for b0 in range(0, len(jobs), batch):
            chunk = jobs[b0:b0 + batch]
            views = [_flip(plan.volume[x:x + patch[0], y:y + patch[1], z:z + patch[2]], f) for (x, y, z), f in chunk]
            views += [views[-1]] * (batch - len(views))  # fixed batch shape for compiled backends
            pred = self.backend.predict(torch.stack(views)[:, None])
            counts.batches += 1
            for j, ((x, y, z), f) in enumerate(chunk):
                maps = pred[j] if self._select is None else pred[j, self._select]
                pending.append(_flip(maps, f))  # back to the window's own orientation
                if len(pending) < len(flips):
                    continue
                region = acc[:, x - lo:x - lo + patch[0], y:y + patch[1], z:z + patch[2]]
                self._blend_into(region, pending, plan.weight)
                pending = []
                counts.windows += 1
                if progress is not None:
                    progress(counts.windows, len(plan.starts))

    def _blend_into(self, region: torch.Tensor, outs: list[torch.Tensor], weight: torch.Tensor | None) -> None:
        """Add one window's maps (the mean over its flips, plus their variance with tta) into `region`."""
        if len(outs) == 1:
            maps = outs[0]
        else:
            stack = torch.stack(outs)
            heads = [i for i, c in enumerate(self.config.channels) if c in ("p_seg", "p_dis")]
            # Spread of the probability the QC reads: the mean of both heads when both run.
            var = stack[:, heads].mean(dim=1).var(dim=0, unbiased=False)
            maps = torch.cat([stack.mean(dim=0), var[None]])
        if weight is None:
            region.add_(maps)
        else:
            region.addcmul_(maps, weight)

    def _max_slab_width(self, shape: tuple[int, ...], n_acc: int) -> int:
        bytes_per_x = n_acc * shape[1] * shape[2] * 4
        budget = self.config.max_accumulator_bytes
        if budget is None and self.backend.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.backend.device)
            budget = int(free * 0.5)
        if budget is None:
            return shape[0]
        return max(self.patch[0], min(shape[0], budget // max(bytes_per_x, 1)))

    def _finalise(self, acc: torch.Tensor, lo: int, factors: list[np.ndarray], out: _HostOutputs) -> None:
        """Divide by the weight sum, combine heads, threshold; move results of x in [lo, lo+len) to host."""
        cfg, dev = self.config, acc.device
        n = acc.shape[1]
        wx = torch.from_numpy(factors[0][lo:lo + n]).to(dev, torch.float32)
        wyz = torch.from_numpy(np.outer(factors[1], factors[2])).to(dev, torch.float32)
        inv = 1.0 / (wx[:, None, None] * wyz[None])
        maps = {c: acc[i] * inv for c, i in zip(self._index, range(len(self._index)))}
        for c, m in maps.items():  # a weighted mean of values in range, but rounding can step 2e-7 out of it
            m.clamp_(-1.0 if c == "sdm" else 0.0, 1.0)
        if cfg.head == "seg":
            prob = maps["p_seg"]
        elif cfg.head == "sdm":
            prob = maps["p_dis"]
        else:
            prob = 0.5 * (maps["p_seg"] + maps["p_dis"])
        t = cfg.threshold
        sl = slice(lo, lo + n)
        out.mask[sl] = (prob > t).to(torch.uint8).cpu().numpy()
        if cfg.keep_prob:
            out.prob[sl] = prob.cpu().numpy()
        if cfg.keep_sdm:
            out.sdm[sl] = maps["sdm"].cpu().numpy()
        if "p_seg" in maps and "p_dis" in maps:
            (x0, x1), ys, zs = out.valid
            xa, xb = max(x0 - lo, 0), min(x1 - lo, n)
            a = maps["p_seg"][xa:xb, ys, zs] > t
            b = maps["p_dis"][xa:xb, ys, zs] > t
            out.agree_sums += torch.stack([(a & b).sum(), a.sum(), b.sum()]).double().cpu().numpy()
            if cfg.keep_uncertainty:
                out.uncertainty[sl] = (maps["p_seg"] - maps["p_dis"]).abs().cpu().numpy()
            if cfg.keep_heads:
                out.p_seg[sl] = maps["p_seg"].cpu().numpy()
                out.p_dis[sl] = maps["p_dis"].cpu().numpy()
        if cfg.tta:
            out.tta_spread[sl] = (acc[-1] * inv).clamp_(min=0.0).sqrt_().cpu().numpy()


class _HostOutputs:
    def __init__(self, shape: tuple[int, ...], cfg: EngineConfig, pads: list[tuple[int, int]],
                 orig_shape: tuple[int, ...]) -> None:
        (px, _), (py, _), (pz, _) = pads
        self.valid = ((px, px + orig_shape[0]), slice(py, py + orig_shape[1]), slice(pz, pz + orig_shape[2]))
        self.mask = np.zeros(shape, dtype=np.uint8)
        self.prob = np.zeros(shape, dtype=np.float32) if cfg.keep_prob else None
        self.sdm = np.zeros(shape, dtype=np.float32) if cfg.keep_sdm else None
        self.uncertainty = np.zeros(shape, dtype=np.float32) if cfg.keep_uncertainty else None
        self.p_seg = np.zeros(shape, dtype=np.float32) if cfg.keep_heads else None
        self.p_dis = np.zeros(shape, dtype=np.float32) if cfg.keep_heads else None
        self.tta_spread = np.zeros(shape, dtype=np.float32) if cfg.tta else None
        self.agree_sums = np.zeros(3, dtype=np.float64)
        self.qc = cfg.qc or cfg.keep_uncertainty or cfg.head == "mean"

    def result(self, pads: list[tuple[int, int]], orig_shape: tuple[int, ...]) -> StitchResult:
        crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, orig_shape))

        def c(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.ascontiguousarray(a[crop])

        agreement = None
        if self.qc:
            inter, sa, sb = self.agree_sums
            agreement = 1.0 if sa + sb == 0 else float(2 * inter / (sa + sb))
        return StitchResult(mask=c(self.mask), prob=c(self.prob), sdm=c(self.sdm),  # type: ignore[arg-type]
                            uncertainty=c(self.uncertainty), agreement=agreement,
                            p_seg=c(self.p_seg), p_dis=c(self.p_dis), tta_spread=c(self.tta_spread))
