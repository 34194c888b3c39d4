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
from dtml_deploy.engine.grid import GridSpec, pad_volume, window_starts
from dtml_deploy.errors import OutOfMemory

Head = Literal["seg", "sdm", "mean"]
HEADS: tuple[str, ...] = ("seg", "sdm", "mean")


@dataclass(frozen=True)
class EngineConfig:
    """How windows are laid out, stitched and turned into a mask."""

    grid: GridSpec = field(default_factory=GridSpec)
    blend: Blend = "gaussian"
    head: Head = "seg"  # seg: p_seg (the paper's); sdm: p_dis; mean: (p_seg + p_dis) / 2
    threshold: float = 0.5
    qc: bool = True  # run both heads to report their agreement (and allow an uncertainty map)
    keep_prob: bool = False
    keep_sdm: bool = False
    keep_uncertainty: bool = False
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
        if self.qc or self.keep_uncertainty:
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
    agreement: float | None = None  # Dice between (p_seg > t) and (p_dis > t); 1.0 if both empty
    n_windows: int = 0
    n_batches: int = 0
    n_slabs: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


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
        self.backend = backend
        self.patch = tuple(int(p) for p in patch)
        self.config = config
        self._index = {c: backend.outputs.index(c) for c in config.channels}
        # accumulator channel i holds config.channels[i]; pick them out of the backend's output order
        order = [backend.outputs.index(c) for c in config.channels]
        self._select = None if order == list(range(len(backend.outputs))) else order

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
        cfg, patch, dev = self.config, self.patch, self.backend.device
        t0 = time.perf_counter()
        orig_shape = volume.shape
        padded, pads = pad_volume(np.asarray(volume, dtype=np.float32), patch)
        shape = padded.shape
        starts = window_starts(shape, patch, cfg.grid)
        per_axis = [sorted({s[a] for s in starts}) for a in range(3)]
        factors = weight_sums(shape, patch, per_axis, cfg.blend)
        weight = window_weight(patch, cfg.blend, dev)
        vol_t = torch.from_numpy(padded).to(dev, self.backend.input_dtype)
        n_acc = len(self._index)
        groups = _slab_groups(per_axis[0], patch[0], self._max_slab_width(shape, n_acc))

        out = _HostOutputs(shape, cfg, pads, orig_shape)
        batch = min(self.backend.options.batch, len(starts))  # never pad a short volume up to --batch
        n_batches = 0
        done = 0
        t_final = 0.0
        carry: torch.Tensor | None = None
        for gi, group in enumerate(groups):
            lo, hi = group[0], group[-1] + patch[0]
            acc = torch.zeros((n_acc, hi - lo, shape[1], shape[2]), dtype=torch.float32, device=dev)
            if carry is not None:
                acc[:, :carry.shape[1]] = carry
            members = set(group)
            slab_windows = [s for s in starts if s[0] in members]
            for b0 in range(0, len(slab_windows), batch):
                chunk = slab_windows[b0:b0 + batch]
                views = [vol_t[x:x + patch[0], y:y + patch[1], z:z + patch[2]] for x, y, z in chunk]
                views += [views[-1]] * (batch - len(views))  # fixed batch shape for compiled backends
                pred = self.backend.predict(torch.stack(views)[:, None])
                for j, (x, y, z) in enumerate(chunk):
                    region = acc[:, x - lo:x - lo + patch[0], y:y + patch[1], z:z + patch[2]]
                    maps = pred[j] if self._select is None else pred[j, self._select]
                    if weight is None:
                        region.add_(maps)
                    else:
                        region.addcmul_(maps, weight)
                n_batches += 1
                done += len(chunk)
                if progress is not None:
                    progress(done, len(starts))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            tf = time.perf_counter()
            nxt = groups[gi + 1][0] if gi + 1 < len(groups) else hi
            self._finalise(acc[:, :nxt - lo], lo, factors, out)
            carry = acc[:, nxt - lo:].clone() if gi + 1 < len(groups) else None
            t_final += time.perf_counter() - tf
        res = out.result(pads, orig_shape)
        res.n_windows, res.n_batches, res.n_slabs = len(starts), n_batches, len(groups)
        # Stages that do not nest, so a report can sum them; set-up (padding, upload) counts as windows.
        res.seconds = {"windows": time.perf_counter() - t0 - t_final, "finalise": t_final}
        return res

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


class _HostOutputs:
    def __init__(self, shape: tuple[int, ...], cfg: EngineConfig, pads: list[tuple[int, int]],
                 orig_shape: tuple[int, ...]) -> None:
        (px, _), (py, _), (pz, _) = pads
        self.valid = ((px, px + orig_shape[0]), slice(py, py + orig_shape[1]), slice(pz, pz + orig_shape[2]))
        self.mask = np.zeros(shape, dtype=np.uint8)
        self.prob = np.zeros(shape, dtype=np.float32) if cfg.keep_prob else None
        self.sdm = np.zeros(shape, dtype=np.float32) if cfg.keep_sdm else None
        self.uncertainty = np.zeros(shape, dtype=np.float32) if cfg.keep_uncertainty else None
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
                            uncertainty=c(self.uncertainty), agreement=agreement)
