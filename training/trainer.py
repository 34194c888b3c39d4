"""The DTML training loop, composed from a data stream, an objective, optimisers and a logger.

One iteration: a batch of `labeled_bs` labeled + `unlabeled_bs` unlabeled patches goes through both
networks; the summed objective L_seg + L_dis + w(t) * L_con is backpropagated once (for the code
schedule w(t) = 2 lambda(t): exactly the gradients of the released code's two backward calls), and
each network's own SGD optimiser steps. CUDA runs under autocast (bf16 by default) with
channels_last_3d; the CPU runs fp32, with freed host memory kept for reuse. The same code serves both.
"""

from __future__ import annotations

import os
import platform
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dtml_deploy.backends.base import resolve_device
from dtml_deploy.backends.host_memory import keep_freed_host_memory
from dtml_deploy.bundle import Bundle
from dtml_deploy.config import ModelConfig
from dtml_deploy.errors import DtmlError
from dtml_deploy.io.datasets import Split
from dtml_deploy.nets.dual import DualTaskNet, sdm_to_mask
from dtml_deploy.ranks import Ranks
from dtml_training.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from dtml_training.config import RunPaths, TrainConfig
from dtml_training.data.cache import VolumeCache, fingerprint, load_training_volumes
from dtml_training.data.dataset import Batch, PatchDataset, collate
from dtml_training.data.sampler import TwoStreamSampler, check_batch_composition
from dtml_training.distributed import init_distributed, rank_sum_fn, shutdown_distributed, use_global_batch_layers
from dtml_training.divergence import TrainingDiverged, nonfinite_tensors, on_any_rank
from dtml_training.logs import TrainLogger
from dtml_training.losses import RankSum, consistency_loss, dis_loss, seg_loss
from dtml_training.run_folder import check_run_folder, clear_run, resume_start
from dtml_training.validate import validate


class TrainingPair(nn.Module):
    """What the optimiser (and DDP) sees: runs only the networks being trained."""

    def __init__(self, net: DualTaskNet, train_seg: bool, train_dis: bool) -> None:
        super().__init__()
        self.net = net
        self.train_seg, self.train_dis = train_seg, train_dis

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        logits = self.net.seg(x).float() if self.train_seg else None
        sdm = torch.tanh(self.net.dis(x).float()) if self.train_dis else None
        return logits, sdm


class Objective:
    """The summed DTML loss for one batch; returns the total and its parts (tensors).

    With `rank_sum` (a distributed run) the Dice terms pool their statistics over all ranks, so the
    objective, and after DDP's gradient averaging its gradient, is the one-process objective of the
    global batch; the returned parts are then this rank's (its BCE/MSE/consistency on its slice)."""

    def __init__(self, cfg: TrainConfig, rank_sum: RankSum = None) -> None:
        self.cfg = cfg
        self.rank_sum = rank_sum

    def __call__(self, logits: torch.Tensor | None, sdm: torch.Tensor | None, batch: Batch,
                 iteration: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        cfg, n_l = self.cfg, batch.label.shape[0]
        label = batch.label.float()
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=label.device)
        if logits is not None:
            parts["seg"] = seg_loss(logits[:n_l], label, self.rank_sum)
            total = total + parts["seg"]
        if sdm is not None:
            parts["dis"] = dis_loss(sdm[:n_l], label, cfg.k, cfg.supervision, batch.sdm, self.rank_sum)
            total = total + parts["dis"]
        weight = 0.0
        if cfg.consistency and logits is not None and sdm is not None:
            parts["con"] = consistency_loss(torch.sigmoid(logits), sdm_to_mask(sdm, cfg.k))
            weight = cfg.consistency_cfg.weight(iteration, cfg.iterations)
            total = total + weight * parts["con"]
        parts["total"] = total
        return total, parts, weight


def _auto_workers(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.workers >= 0:
        return cfg.workers
    return min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise DtmlError("--amp fp16 needs a CUDA device")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _peak_memory_gb(device: torch.device) -> float:
    """Peak device memory (CUDA) or peak resident set size of this process (CPU), in GB."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)  # KiB on Linux


@dataclass
class TrainResult:
    bundle: Path | None
    iterations: int
    interrupted: bool
    summary: dict[str, Any]


@dataclass
class _State:
    """What the setup step builds and the later steps share."""

    device: torch.device
    dist: Ranks
    cache: VolumeCache
    data_fp: str
    load_s: float
    model_cfg: ModelConfig
    net: DualTaskNet
    pair: TrainingPair
    optimizers: dict[str, torch.optim.Optimizer]
    amp_dtype: torch.dtype | None
    model: nn.Module | None = None  # `pair`, wrapped in DDP when distributed
    start: int = 0
    last_checkpoint: int | None = None  # iteration of the checkpoint now on disk
    it: int = 0
    train_s: float = 0.0
    final: dict[str, Any] = field(default_factory=dict)
    val_rows: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Runs one configured training to a bundle; resumable and interruptible.

    Steps: setup (data, networks, optimisers), resume (or start fresh), the loop, the summary and
    the bundle. A non-finite loss or weight stops the run with `TrainingDiverged` before anything
    non-finite is written."""

    def __init__(self, cfg: TrainConfig, split: Split, out: Path, resume: bool = False,
                 show_progress: bool = True, stop_at: int | None = None, log_flush_every: int = 25,
                 overwrite: bool = False) -> None:
        self.cfg = cfg
        self.split = split
        self.paths = RunPaths(Path(out))
        self.resume = resume
        self.overwrite = overwrite  # replace a previous run in `out` (else refused)
        self.show_progress = show_progress
        self.stop_at = stop_at  # stop (with a checkpoint) after this many iterations; for tests
        self.log_flush_every = log_flush_every
        self._stop_signal: int | None = None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def run(self) -> TrainResult:
        cfg = self.cfg
        device = resolve_device(cfg.device)  # a bad or absent device is one line naming the valid choices
        if device.type == "cpu":
            # Same page-fault cost as CPU inference (dtml_deploy/backends/host_memory.py): one CPU training
            # step of an n_filters=8 V-Net on 2x96x96x64 took 0.83 s with glibc's defaults, 0.58 s kept.
            keep_freed_host_memory()
        dist_info = init_distributed(device.type)
        if dist_info.world_size > 1 and device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
        try:
            return self._run(device, dist_info)
        finally:
            shutdown_distributed()

    def _run(self, device: torch.device, dist_info: Ranks) -> TrainResult:
        check_run_folder(self.paths, self.resume, self.overwrite)
        # Resume checks that need no data come first: a wrong flag costs no loading time.
        meta = read_checkpoint_meta(self.paths.checkpoint) if self.resume else None
        if meta is not None:
            resume_start(meta, self.cfg, self.paths.checkpoint)
        st = self._setup(device, dist_info)
        if meta is not None:
            self._resume(st)
        elif dist_info.is_main:
            clear_run(self.paths)  # only reached with an empty folder or --overwrite
        self._loop(st)
        summary = self._summary(st)
        if st.it < self.cfg.iterations:
            return TrainResult(None, st.it, True, summary)
        return TrainResult(self._bundle(st, summary), st.it, False, summary)

    def _setup(self, device: torch.device, dist_info: Ranks) -> _State:
        """Seeds, the data in memory, both networks and their optimisers."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
        if cfg.deterministic and device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Fail on an impossible batch composition (of all ranks) before spending time on loading.
        check_batch_composition(self.split, cfg, dist_info.world_size)
        t_load = time.perf_counter()
        cache: VolumeCache = load_training_volumes(self.split, intensity=cfg.intensity)  # type: ignore[arg-type]
        data_fp = fingerprint(self.split)
        load_s = time.perf_counter() - t_load

        model_cfg = cfg.model_config()
        net = DualTaskNet(model_cfg.net, k=cfg.k)
        for p in net.seg.parameters():
            p.requires_grad_(cfg.train_seg)
        for p in net.dis.parameters():
            p.requires_grad_(cfg.train_dis)
        pair = TrainingPair(net, cfg.train_seg, cfg.train_dis).to(device)
        if cfg.channels_last:  # also on CPU: oneDNN conv3d backward is ~10x faster in NDHWC
            pair = pair.to(memory_format=torch.channels_last_3d)
        optimizers = {}
        for name, sub, on in (("seg", net.seg, cfg.train_seg), ("dis", net.dis, cfg.train_dis)):
            if on:
                optimizers[name] = torch.optim.SGD(sub.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                                   weight_decay=cfg.weight_decay)
        return _State(device, dist_info, cache, data_fp, load_s, model_cfg, net, pair, optimizers,
                      _amp_dtype(cfg, device))

    def _resume(self, st: _State) -> None:
        """Restore weights, optimiser and RNG states from the checkpoint (the configuration was checked)."""
        meta = load_checkpoint(self.paths.checkpoint, st.pair, st.optimizers)
        if meta.get("data_fingerprint") != st.data_fp:
            raise DtmlError(f"{self.paths.checkpoint}: the training data changed since the checkpoint")
        st.start = st.last_checkpoint = int(meta["iteration"])

    def _loader(self, st: _State) -> DataLoader:
        cfg = self.cfg
        with_sdm = "dis" in cfg.supervision and cfg.train_dis
        sampler = TwoStreamSampler(len(self.split.labeled), len(self.split.unlabeled), cfg.labeled_bs,
                                   cfg.unlabeled_bs, cfg.seed, st.start, cfg.iterations, st.dist.rank,
                                   st.dist.world_size)
        workers = _auto_workers(cfg, st.device)
        return DataLoader(PatchDataset(st.cache, cfg.patch, with_sdm), batch_sampler=sampler,
                          num_workers=workers, collate_fn=collate, pin_memory=st.device.type == "cuda",
                          prefetch_factor=4 if workers else None, persistent_workers=False,
                          # its own generator: creating the iterator must not draw from the global RNG that
                          # dropout uses, or a resumed run would see different dropout masks
                          generator=torch.Generator().manual_seed(cfg.seed))

    def _step(self, st: _State, batch: Batch, it: int, objective: Objective,
              scaler: torch.amp.GradScaler) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One optimisation step; returns the loss terms (on the device) and the logged scalars."""
        cfg, device = self.cfg, st.device
        lr = cfg.lr * cfg.lr_gamma ** (it // cfg.lr_step)
        for opt in st.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = lr
        batch = Batch(batch.image.to(device, non_blocking=True), batch.label.to(device, non_blocking=True),
                      None if batch.sdm is None else batch.sdm.to(device, non_blocking=True))
        image = batch.image.contiguous(memory_format=torch.channels_last_3d) if cfg.channels_last else batch.image
        with torch.autocast(device.type, dtype=st.amp_dtype or torch.float32, enabled=st.amp_dtype is not None):
            logits, sdm = st.model(image)  # type: ignore[misc]
        total, parts, weight = objective(logits, sdm, batch, it)
        for opt in st.optimizers.values():
            opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        for opt in st.optimizers.values():
            scaler.step(opt)
        scaler.update()
        return parts, {"lambda": weight, "lr": lr}

    def _loop(self, st: _State) -> None:
        """Iterate from `st.start`, checkpointing, validating and stopping on a signal or divergence."""
        cfg, paths = self.cfg, self.paths
        if st.dist.is_main:  # the other ranks write nothing
            try:
                paths.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DtmlError(f"{paths.out}: cannot create the run folder ({e.strerror})") from None
        rank_sum = None
        if st.dist.world_size > 1:  # W ranks train the one-process model of the global batch (distributed.py)
            st.pair = use_global_batch_layers(st.pair, st.dist, st.device, cfg.labeled_bs,  # type: ignore[assignment]
                                              cfg.unlabeled_bs)
            rank_sum = rank_sum_fn()
        st.model = st.pair if st.dist.world_size == 1 else nn.parallel.DistributedDataParallel(
            st.pair, device_ids=[st.device.index] if st.device.type == "cuda" else None)
        scaler = torch.amp.GradScaler("cuda", enabled=st.amp_dtype == torch.float16)
        objective, loader = Objective(cfg, rank_sum), self._loader(st)
        # On the CPU fetching a loss costs no device sync, so every iteration is checked: a diverged run stops
        # at once instead of running up to 24 more iterations of seconds each before the next flush.
        flush_every = self.log_flush_every if st.device.type == "cuda" else 1
        logger = TrainLogger(paths.log if st.dist.is_main else None, st.start, cfg.iterations,
                             self.show_progress and st.dist.is_main, flush_every)
        old_handlers = self._catch_signals()
        it = st.start
        t_train = time.perf_counter()
        if st.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(st.device)
        st.model.train()
        try:
            for batch in loader:
                if logger.log(it, *self._step(st, batch, it, objective, scaler)):
                    self._stop_if_diverged(st, logger)
                it += 1
                if cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < cfg.iterations:
                    logger.flush()  # losses up to here are checked before the checkpoint replaces the last one
                    self._stop_if_diverged(st, logger)
                    self._checkpoint(st, it)
                if cfg.val_cases and st.dist.is_main and (it % cfg.val_every == 0 or it == cfg.iterations):
                    row = {"event": "validation", "iteration": it,
                           **validate(st.net, st.model_cfg, self.split.validation, st.device)}
                    st.val_rows.append(row)
                    logger.event(row)
                    st.model.train()
                if self._stop_signal is not None or (self.stop_at is not None and it >= self.stop_at):
                    break
        finally:
            logger.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        self._stop_if_diverged(st, logger)
        st.it, st.train_s, st.final = it, time.perf_counter() - t_train, logger.last
        self._checkpoint(st, it)

    def _catch_signals(self) -> dict[int, Any]:
        """SIGINT/SIGTERM finish the iteration and checkpoint; returns the handlers to restore."""
        old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self._on_signal)
        return old

    def _kept(self, st: _State) -> str:
        if st.last_checkpoint is None:
            return "no checkpoint was written"
        return f"the last good checkpoint ({self.paths.checkpoint}, iteration {st.last_checkpoint}) is kept"

    def _stop_if_diverged(self, st: _State, logger: TrainLogger) -> None:
        """Raise when a fetched loss of any rank is non-finite (every rank calls this at the same points)."""
        if not on_any_rank(logger.diverged is not None, st.device):
            return
        what = "a non-finite loss on another rank"
        if logger.diverged is not None:
            it, terms = logger.diverged
            what = f"non-finite loss at iteration {it} ({', '.join(terms)})"
        raise TrainingDiverged(f"training diverged: {what}; {self._kept(st)}; no bundle was written "
                               "(try a lower --lr)")

    def _require_finite_weights(self, st: _State, it: int) -> None:
        bad = nonfinite_tensors(st.pair)
        if bad:
            raise TrainingDiverged(f"training diverged: non-finite weights at iteration {it} ({bad[0]}"
                                   f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); {self._kept(st)}; "
                                   "no bundle was written (try a lower --lr)")

    def _checkpoint(self, st: _State, iteration: int) -> None:
        self._require_finite_weights(st, iteration)  # on every rank: the weights are the same on all
        if not st.dist.is_main:
            return
        try:
            save_checkpoint(self.paths.checkpoint, st.pair, st.optimizers, iteration,
                            {"config": self.cfg.to_dict(), "data_fingerprint": st.data_fp})
        except OSError as e:
            raise DtmlError(f"{self.paths.checkpoint}: cannot write the checkpoint ({e.strerror or e})") from None
        st.last_checkpoint = iteration

    def _summary(self, st: _State) -> dict[str, Any]:
        device = st.device
        return {
            "iterations": st.it, "start_iteration": st.start, "wall_seconds": round(st.train_s, 2),
            "it_per_s": round((st.it - st.start) / max(st.train_s, 1e-9), 3),
            "data_load_seconds": round(st.load_s, 2),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "amp": str(st.amp_dtype).replace("torch.", "") if st.amp_dtype else "fp32",
            "world_size": st.dist.world_size, "torch": torch.__version__,
            "peak_memory_gb": _peak_memory_gb(device),
            "final": st.final, "validation": st.val_rows[-1] if st.val_rows else None,
            "n_labeled": len(self.split.labeled), "n_unlabeled": len(self.split.unlabeled),
        }

    def _bundle(self, st: _State, summary: dict[str, Any]) -> Path | None:
        """Write the bundle (main rank) from weights checked to be finite."""
        if not st.dist.is_main:
            return None
        self._require_finite_weights(st, st.it)
        cfg = self.cfg
        trained = [n for n, on in (("seg", cfg.train_seg), ("dis", cfg.train_dis)) if on]
        bundle = Bundle.from_net(st.net, st.model_cfg, recipe=cfg.to_dict(), data_fingerprint=st.data_fp,
                                 training={**summary, "trained": trained,
                                           "labeled_ids": [c.case_id for c in self.split.labeled]})
        return bundle.save(self.paths.bundle)
