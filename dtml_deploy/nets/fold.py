"""Inference-time graph simplification: fold BatchNorm into the preceding convolution."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Return an eval-mode copy where every Conv3d/ConvTranspose3d + BatchNorm3d pair is one conv.

    Works on any `nn.Sequential` that lists a convolution directly before its BatchNorm (the V-Net's
    layout); the BatchNorm becomes `nn.Identity`. Exact up to fp32 rounding.
    """
    module = copy.deepcopy(module).eval()
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)) and isinstance(bn, nn.BatchNorm3d):
                seq[i] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.ConvTranspose3d))
                seq[i + 1] = nn.Identity()
    return module


class CudnnConvReLU(nn.Module):
    """Conv3d + ReLU in one cuDNN call (`torch.cudnn_convolution_relu`); CUDA only, inference only.

    Saves one read and one write of every full-size activation per layer. Whether cuDNN's fused
    kernels beat the separate ones depends on the GPU and shapes: benchmarks/segment_speed.py measures.
    """

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cudnn_convolution_relu(x, self.weight, self.bias, self.stride, self.padding,
                                            self.dilation, self.groups)


def fuse_conv_relu(module: nn.Module) -> nn.Module:
    """Replace Conv3d (+ Identity left by folding) + ReLU in every Sequential with `CudnnConvReLU`."""
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        items = list(seq)
        for i, conv in enumerate(items):
            if not isinstance(conv, nn.Conv3d):
                continue
            j = i + 1
            while j < len(items) and isinstance(items[j], nn.Identity):
                j += 1
            if j < len(items) and isinstance(items[j], nn.ReLU):
                seq[i] = CudnnConvReLU(conv)
                seq[j] = nn.Identity()
    return module
