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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dtml_deploy.backends.base import resolve_device
from dtml_deploy.backends.host_memory import keep_freed_host_memory
from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import DtmlError
from dtml_deploy.io.datasets import Split
from dtml_deploy.nets.dual import DualTaskNet, sdm_to_mask
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import RunPaths, TrainConfig
from training.data.cache import VolumeCache, fingerprint, load_training_volumes
from training.data.dataset import Batch, PatchDataset, collate
from training.data.sampler import TwoStreamSampler
from training.distributed import DistInfo, init_distributed, shutdown_distributed
from training.logs import TrainLogger
from training.losses import consistency_loss, dis_loss, seg_loss
from training.validate import validate


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
    """The summed DTML loss for one batch; returns the total and its parts (tensors)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def __call__(self, logits: torch.Tensor | None, sdm: torch.Tensor | None, batch: Batch,
                 iteration: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        cfg, n_l = self.cfg, batch.label.shape[0]
        label = batch.label.float()
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=label.device)
        if logits is not None:
            parts["seg"] = seg_loss(logits[:n_l], label)
            total = total + parts["seg"]
        if sdm is not None:
            parts["dis"] = dis_loss(sdm[:n_l], label, cfg.k, cfg.supervision, batch.sdm)
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


class Trainer:
    """Runs one configured training to a bundle; resumable and interruptible."""

    def __init__(self, cfg: TrainConfig, split: Split, out: Path, resume: bool = False,
                 show_progress: bool = True, stop_at: int | None = None, log_flush_every: int = 25) -> None:
        self.cfg = cfg
        self.split = split
        self.paths = RunPaths(Path(out))
        self.resume = resume
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

    def _run(self, device: torch.device, dist_info: DistInfo) -> TrainResult:
        cfg, paths = self.cfg, self.paths
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
        if cfg.deterministic and device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

        # Fail on an impossible batch composition before spending time on loading.
        TwoStreamSampler.check(len(self.split.labeled), len(self.split.unlabeled), cfg.labeled_bs, cfg.unlabeled_bs)
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
        channels_last = cfg.channels_last  # also on CPU: oneDNN conv3d backward is ~10x faster in NDHWC
        if channels_last:
            pair = pair.to(memory_format=torch.channels_last_3d)
        optimizers = {}
        for name, sub, on in (("seg", net.seg, cfg.train_seg), ("dis", net.dis, cfg.train_dis)):
            if on:
                optimizers[name] = torch.optim.SGD(sub.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                                   weight_decay=cfg.weight_decay)
        start = 0
        if self.resume:
            meta = load_checkpoint(paths.checkpoint, pair, optimizers)
            saved = TrainConfig.from_dict(meta["config"])
            if saved != TrainConfig.from_dict({**cfg.to_dict(), "iterations": saved.iterations}):
                raise DtmlError(f"{paths.checkpoint}: the checkpoint was made with a different configuration "
                                "(only --iterations may change on resume)")
            if meta.get("data_fingerprint") != data_fp:
                raise DtmlError(f"{paths.checkpoint}: the training data changed since the checkpoint")
            start = int(meta["iteration"])
        elif dist_info.is_main and paths.log.exists():
            paths.log.unlink()
        model: nn.Module = pair
        if dist_info.world_size > 1:
            model = nn.parallel.DistributedDataParallel(
                pair, device_ids=[device.index] if device.type == "cuda" else None)

        amp_dtype = _amp_dtype(cfg, device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        objective = Objective(cfg)
        with_sdm = "dis" in cfg.supervision and cfg.train_dis
        sampler = TwoStreamSampler(len(self.split.labeled), len(self.split.unlabeled), cfg.labeled_bs,
                                   cfg.unlabeled_bs, cfg.seed, start, cfg.iterations, dist_info.rank)
        workers = _auto_workers(cfg, device)
        loader = DataLoader(PatchDataset(cache, cfg.patch, with_sdm), batch_sampler=sampler,
                            num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                            prefetch_factor=4 if workers else None, persistent_workers=False,
                            # its own generator: creating the iterator must not draw from the global RNG that
                            # dropout uses, or a resumed run would see different dropout masks
                            generator=torch.Generator().manual_seed(cfg.seed))
        paths.out.mkdir(parents=True, exist_ok=True)
        logger = TrainLogger(paths.log if dist_info.is_main else None, start, cfg.iterations,
                             self.show_progress and dist_info.is_main, self.log_flush_every)
        is_main_thread = threading.current_thread() is threading.main_thread()
        old_handlers = {}
        if is_main_thread:
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)

        def checkpoint(iteration: int) -> None:
            if dist_info.is_main:
                save_checkpoint(paths.checkpoint, pair, optimizers, iteration,
                                {"config": cfg.to_dict(), "data_fingerprint": data_fp})

        it = start
        val_rows: list[dict[str, Any]] = []
        t_train = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        try:
            for batch in loader:
                lr = cfg.lr * cfg.lr_gamma ** (it // cfg.lr_step)
                for opt in optimizers.values():
                    for g in opt.param_groups:
                        g["lr"] = lr
                batch = Batch(batch.image.to(device, non_blocking=True),
                              batch.label.to(device, non_blocking=True),
                              None if batch.sdm is None else batch.sdm.to(device, non_blocking=True))
                image = batch.image.contiguous(memory_format=torch.channels_last_3d) if channels_last else batch.image
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    logits, sdm = model(image)
                total, parts, weight = objective(logits, sdm, batch, it)
                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                for opt in optimizers.values():
                    scaler.step(opt)
                scaler.update()
                logger.log(it, parts, {"lambda": weight, "lr": lr})
                it += 1
                if cfg.checkpoint_every and it % cfg.checkpoint_every == 0 and it < cfg.iterations:
                    checkpoint(it)
                if cfg.val_cases and dist_info.is_main and (it % cfg.val_every == 0 or it == cfg.iterations):
                    row = {"event": "validation", "iteration": it,
                           **validate(net, model_cfg, self.split.validation, device)}
                    val_rows.append(row)
                    logger.event(row)
                    model.train()
                if self._stop_signal is not None or (self.stop_at is not None and it >= self.stop_at):
                    break
        finally:
            logger.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        train_s = time.perf_counter() - t_train
        interrupted = it < cfg.iterations
        checkpoint(it)
        summary = {
            "iterations": it, "start_iteration": start, "wall_seconds": round(train_s, 2),
            "it_per_s": round((it - start) / max(train_s, 1e-9), 3), "data_load_seconds": round(load_s, 2),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "world_size": dist_info.world_size, "torch": torch.__version__,
            "peak_memory_gb": _peak_memory_gb(device),
            "final": logger.last, "validation": val_rows[-1] if val_rows else None,
            "n_labeled": len(self.split.labeled), "n_unlabeled": len(self.split.unlabeled),
        }
        if interrupted:
            return TrainResult(None, it, True, summary)
        bundle_path = None
        if dist_info.is_main:
            trained = [n for n, on in (("seg", cfg.train_seg), ("dis", cfg.train_dis)) if on]
            bundle = Bundle.from_net(net, model_cfg, recipe=cfg.to_dict(), data_fingerprint=data_fp,
                                     training={**summary, "trained": trained,
                                               "labeled_ids": [c.case_id for c in self.split.labeled]})
            bundle_path = bundle.save(paths.bundle)
        return TrainResult(bundle_path, it, False, summary)
