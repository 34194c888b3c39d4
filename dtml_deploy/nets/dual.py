"""The dual-task pair: M_s (segmentation logits) and M_d (tanh signed distance map)."""

from __future__ import annotations

import torch
from torch import nn

from dtml_deploy.config import NetConfig
from dtml_deploy.nets.vnet import VNet


def sdm_to_mask(sdm: torch.Tensor, k: float) -> torch.Tensor:
    """Smooth inverse of the SDM transform: sigmoid(-k * sdm), always computed and returned in fp32.

    Upcasting first keeps -k*sdm finite for any k up to 1e4 in fp16/bf16 inputs (fp16 overflows at
    65504) and avoids bf16's 8-bit mantissa flattening the transition band; sigmoid saturates to 0/1
    without producing inf or NaN.
    """
    return torch.sigmoid(sdm.float() * (-float(k)))


class DualTaskNet(nn.Module):
    """Two separate V-Nets trained on the same target through two tasks (no shared weights).

    `forward` returns `(seg_logits, sdm)` in fp32: the segmentation head's logits and
    `tanh` of the regression head, both upcast before the non-linearity so reduced-precision
    autocast never evaluates tanh/sigmoid in fp16.
    """

    def __init__(self, cfg: NetConfig | None = None, k: float = 1500.0) -> None:
        super().__init__()
        self.seg = VNet(cfg)
        self.dis = VNet(cfg)
        self.k = float(k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.seg(x).float()
        sdm = torch.tanh(self.dis(x).float())
        return logits, sdm
