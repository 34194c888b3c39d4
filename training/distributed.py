"""torchrun support: one process per GPU (or CPU process on gloo), DistributedDataParallel.

W ranks with per-rank batch B train the model that one process trains with batch W * B (README,
training): the sampler hands each rank its slice of the global batch (data/sampler.py), DDP
averages the gradients (equal to the global mean of every per-voxel mean loss), the batch-pooled Dice
sums its statistics over the ranks (`rank_sum`), dropout draws the global batch's masks on every rank
and keeps its slice (`GlobalBatchDropout3d`), and BatchNorm is SyncBatchNorm on CUDA. Not on the CPU:
torch's SyncBatchNorm refuses CPU tensors, so there each rank normalises with its own batch statistics
(DDP copies rank 0's running statistics to the others) and the weights drift from the one-process run
(README: the measured drift); group and instance norm are per sample and so exact up to fp32 rounding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from dtml_deploy.ranks import Ranks
from dtml_training.data.sampler import rank_rows


def init_distributed(device_type: str) -> Ranks:
    """Join the process group when launched by torchrun (WORLD_SIZE set); else a single process. The
    launch variables are read as segment and evaluate read them (dtml_deploy/ranks.py)."""
    ranks = Ranks.from_env()
    if "WORLD_SIZE" not in os.environ:
        return ranks
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if device_type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    return ranks


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_sum_fn() -> Callable[[torch.Tensor], torch.Tensor]:
    """(group, sum) for the Dice statistics: `sum(t)` all-reduces `t` over the ranks, differentiably.

    Its backward all-reduces the incoming gradients, so each rank's gradient is W times its share; DDP's
    averaging over the W ranks then leaves exactly the gradient of the global Dice. A group of its own,
    so these reductions never interleave with DDP's gradient buckets on the default group."""
    group = dist.new_group()

    def rank_sum(t: torch.Tensor) -> torch.Tensor:
        return dist_fn.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

    return rank_sum


class GlobalBatchDropout3d(nn.Module):
    """Dropout3d whose masks are those one process would draw for the global batch: every rank draws the
    masks of all samples of the global batch (the same random numbers as F.dropout3d on it, so every rank's
    generator stays in step with the others and with a one-process run) and keeps the rows of its own
    samples, `rows` (their positions in the global batch, data/sampler.py: rank_rows)."""

    def __init__(self, p: float, rows: Sequence[int], global_size: int) -> None:
        super().__init__()
        # a plain list, not a buffer: DDP would overwrite every rank's buffers with rank 0's
        self.p, self.global_size, self.rows = p, global_size, list(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.shape[0] != len(self.rows):
            raise ValueError(f"GlobalBatchDropout3d expects batches of {len(self.rows)}, got {x.shape[0]}")
        # ATen's feature dropout: noise [N, C, 1, 1, 1], bernoulli_(1 - p), div_(1 - p), then x * noise
        noise = x.new_empty((self.global_size, x.shape[1]) + (1,) * (x.dim() - 2))
        noise.bernoulli_(1.0 - self.p).div_(1.0 - self.p)
        return x * noise[self.rows]


def use_global_batch_layers(module: nn.Module, info: Ranks, device: torch.device, labeled_bs: int,
                            unlabeled_bs: int) -> nn.Module:
    """Make `module`'s batch-dependent layers act on the global batch of a W-rank run (in place where the
    layers are children; returns the module): Dropout3d -> GlobalBatchDropout3d, and on CUDA BatchNorm ->
    SyncBatchNorm (same parameters and buffers, so the optimisers and checkpoints are unaffected)."""
    if info.world_size == 1:
        return module
    rows = rank_rows(info.rank, info.world_size, labeled_bs, unlabeled_bs)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout3d):
                setattr(parent, name, GlobalBatchDropout3d(child.p, rows, (labeled_bs + unlabeled_bs)
                                                           * info.world_size))
    if device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module
