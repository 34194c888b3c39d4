"""The V-Net of UA-MT/DTC/DTML, module for module.

Module names match the released code (`block_one.conv.0.weight`, ...), so its checkpoints load with
`VNet.load_state_dict` after dropping nothing but the head if its class count differs.
Encoder stages have 1/2/3/3/3 convolutions, decoder stages 3/3/2/1; skips are added; every 3x3x3
convolution is followed by a normalisation and ReLU; Dropout3d(p) acts on the bottleneck and on the
last decoder features in training mode only.
"""

from __future__ import annotations

import torch
from torch import nn

from dtml_deploy.config import NetConfig


def _norm(kind: str, channels: int) -> list[nn.Module]:
    if kind == "batch":
        return [nn.BatchNorm3d(channels)]
    if kind == "instance":
        return [nn.InstanceNorm3d(channels)]
    if kind == "group":
        # DTC uses 16 groups; fall back to channels // 4 for narrow test networks.
        return [nn.GroupNorm(num_groups=min(16, channels // 4) or 1, num_channels=channels)]
    return []


class ConvBlock(nn.Module):
    """`stages` x (Conv3d 3x3x3 pad 1 -> norm -> ReLU)."""

    def __init__(self, stages: int, c_in: int, c_out: int, norm: str) -> None:
        super().__init__()
        ops: list[nn.Module] = []
        for i in range(stages):
            ops.append(nn.Conv3d(c_in if i == 0 else c_out, c_out, 3, padding=1))
            ops.extend(_norm(norm, c_out))
            ops.append(nn.ReLU(inplace=True))
        self.conv = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Resample(nn.Module):
    """Stride-2 Conv3d (down) or ConvTranspose3d (up), kernel 2, then norm and ReLU."""

    def __init__(self, c_in: int, c_out: int, norm: str, up: bool) -> None:
        super().__init__()
        conv = nn.ConvTranspose3d if up else nn.Conv3d
        self.conv = nn.Sequential(conv(c_in, c_out, 2, stride=2), *_norm(norm, c_out), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class VNet(nn.Module):
    """V-Net with a 1x1x1 head of `out_channels` raw outputs (logits or pre-tanh SDM)."""

    def __init__(self, cfg: NetConfig | None = None, out_channels: int = 1) -> None:
        super().__init__()
        cfg = cfg or NetConfig()
        self.cfg = cfg
        f, n = cfg.n_filters, cfg.norm
        self.block_one = ConvBlock(1, cfg.in_channels, f, n)
        self.block_one_dw = Resample(f, 2 * f, n, up=False)
        self.block_two = ConvBlock(2, 2 * f, 2 * f, n)
        self.block_two_dw = Resample(2 * f, 4 * f, n, up=False)
        self.block_three = ConvBlock(3, 4 * f, 4 * f, n)
        self.block_three_dw = Resample(4 * f, 8 * f, n, up=False)
        self.block_four = ConvBlock(3, 8 * f, 8 * f, n)
        self.block_four_dw = Resample(8 * f, 16 * f, n, up=False)
        self.block_five = ConvBlock(3, 16 * f, 16 * f, n)
        self.block_five_up = Resample(16 * f, 8 * f, n, up=True)
        self.block_six = ConvBlock(3, 8 * f, 8 * f, n)
        self.block_six_up = Resample(8 * f, 4 * f, n, up=True)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f, n)
        self.block_seven_up = Resample(4 * f, 2 * f, n, up=True)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f, n)
        self.block_eight_up = Resample(2 * f, f, n, up=True)
        self.block_nine = ConvBlock(1, f, f, n)
        self.out_conv = nn.Conv3d(f, out_channels, 1)
        self.dropout = nn.Dropout3d(p=cfg.dropout)
        self.use_dropout: bool = cfg.dropout > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        if self.use_dropout:
            x5 = self.dropout(x5)  # identity in eval mode
        x = self.block_six(self.block_five_up(x5) + x4)
        x = self.block_seven(self.block_six_up(x) + x3)
        x = self.block_eight(self.block_seven_up(x) + x2)
        x = self.block_nine(self.block_eight_up(x) + x1)
        if self.use_dropout:
            x = self.dropout(x)
        return self.out_conv(x)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
