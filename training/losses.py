"""DTML's losses (the paper's equations, in the released code's form where they differ), all reduced in fp32.

- `seg_loss`: 0.5 * (BCE-with-logits + Dice) for M_s on the labeled half;
- `dis_loss`: M_d's supervision: `mask` (Dice of sigmoid(-k d) vs the label), `dis` (L2 of d to the
  ground-truth SDM, as the paper states), or `dis+mask` (their sum);
- `consistency_loss`: mean over every voxel of every patch of (p_seg - p_dis)^2, no detach;
- `consistency_weight`: the Gaussian ramp-up, in the released code's form or the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from dtml_deploy.checks import finite_in, int_at_least
from dtml_deploy.nets.dual import sdm_to_mask

Supervision = Literal["mask", "dis", "dis+mask"]
SUPERVISIONS: tuple[str, ...] = ("mask", "dis", "dis+mask")
Schedule = Literal["code", "paper"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
# Sums a tensor over the ranks of a distributed run, differentiably (training/distributed.py: rank_sum);
# None: one process. Only the batch-pooled Dice needs it: every other term is a mean over equally many
# voxels per rank, which DDP's gradient averaging already makes the global mean.
RankSum = Callable[[torch.Tensor], torch.Tensor] | None


def dice_loss(p: torch.Tensor, g: torch.Tensor, eps: float = 1e-5, rank_sum: RankSum = None) -> torch.Tensor:
    """1 - (2 sum(p g) + eps) / (sum(p^2) + sum(g^2) + eps), summed over the whole batch (with
    `rank_sum`: over the global batch of all ranks)."""
    p, g = p.float(), g.float()
    inter, pp, gg = (p * g).sum(), (p * p).sum(), (g * g).sum()
    if rank_sum is not None:
        inter, pp, gg = rank_sum(torch.stack([inter, pp, gg])).unbind()
    return 1.0 - (2.0 * inter + eps) / (pp + gg + eps)


def seg_loss(logits: torch.Tensor, label: torch.Tensor, rank_sum: RankSum = None) -> torch.Tensor:
    """L_seg = 0.5 * (BCE-with-logits + Dice(sigmoid(logits)))."""
    logits, g = logits.float(), label.float()
    return 0.5 * (F.binary_cross_entropy_with_logits(logits, g)
                  + dice_loss(torch.sigmoid(logits), g, rank_sum=rank_sum))


def dis_loss(sdm: torch.Tensor, label: torch.Tensor, k: float, supervision: Supervision,
             gt_sdm: torch.Tensor | None = None, rank_sum: RankSum = None) -> torch.Tensor:
    """Supervision of M_d's tanh output `sdm` on labeled patches."""
    if supervision not in SUPERVISIONS:
        raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {supervision!r}")
    total = sdm.new_zeros((), dtype=torch.float32)
    if "mask" in supervision:
        total = total + dice_loss(sdm_to_mask(sdm, k), label, rank_sum=rank_sum)
    if "dis" in supervision:
        if gt_sdm is None:
            raise ValueError("dis supervision needs the ground-truth SDM")
        total = total + F.mse_loss(sdm.float(), gt_sdm.float())
    return total


def consistency_loss(p_seg: torch.Tensor, p_dis: torch.Tensor) -> torch.Tensor:
    """L_con = mean((p_seg - p_dis)^2) over all voxels; gradients reach both networks."""
    return torch.mean((p_seg.float() - p_dis.float()) ** 2)


@dataclass(frozen=True)
class ConsistencyConfig:
    """The weight lambda(t) = lambda_max * exp(-5 (1 - t)^2) and its effective multiplier.

    code  (default): lambda_max 1.0, t = min(1, (iteration // 150) / 40), multiplier 2 (the released
                     code backpropagates two losses that both hold L_con into both networks);
    paper:           lambda_max 0.1, t = iteration / max_iterations, multiplier 1.
    """

    schedule: Schedule = "code"
    lambda_max: float | None = None  # None: the schedule's own
    rampup_period: int = 150  # code: iterations per ramp-up "epoch"
    rampup_length: float = 40.0  # code: ramp-up length in those epochs

    def __post_init__(self) -> None:
        if self.schedule not in ("code", "paper"):
            raise ValueError(f"consistency schedule must be 'code' or 'paper', got {self.schedule!r}")
        if self.lambda_max is not None:
            finite_in("lambda_max", self.lambda_max, 0.0)
        int_at_least("rampup_period", self.rampup_period, 1)
        finite_in("rampup_length", self.rampup_length, 0.0)

    @property
    def max_weight(self) -> float:
        if self.lambda_max is not None:
            return self.lambda_max
        return 1.0 if self.schedule == "code" else 0.1

    @property
    def multiplier(self) -> float:
        return 2.0 if self.schedule == "code" else 1.0

    def ramp(self, iteration: int, max_iterations: int) -> float:
        """lambda(t) at a 0-based iteration (without the multiplier)."""
        if self.schedule == "code":
            t = min(1.0, (iteration // self.rampup_period) / self.rampup_length) if self.rampup_length else 1.0
        else:
            t = min(1.0, iteration / max(1, max_iterations))
        return self.max_weight * math.exp(-5.0 * (1.0 - t) ** 2)

    def weight(self, iteration: int, max_iterations: int) -> float:
        """The factor applied to L_con in the single summed loss."""
        return self.multiplier * self.ramp(iteration, max_iterations)
