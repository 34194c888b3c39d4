"""Inference-time graph simplification: fold BatchNorm into the preceding convolution."""

from __future__ import annotations

import copy

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
