"""Random bundles for tests and benchmarks (moved out of the package: production code never builds one)."""

from __future__ import annotations

import numpy as np
import torch

from dtml_deploy.bundle import Bundle
from dtml_deploy.config import ModelConfig, NetConfig
from dtml_deploy.nets.dual import DualTaskNet


def randomise_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """Random BatchNorm running statistics and affine parameters (from torch's global RNG), so that
    folding changes the weights and a folded graph that dropped a statistic would show."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net


def random_bundle(n_filters: int = 4, patch_size: tuple[int, int, int] = (32, 32, 32), *, seed: int = 0,
                  k: float = 1500.0, centre_heads: bool = True, centre_on: np.ndarray | None = None) -> Bundle:
    """A bundle with random weights for tests, benchmarks and dry runs of the export (the project's one
    random-bundle builder).

    BatchNorm statistics are randomised (`randomise_batchnorm`). With `centre_heads` each head's bias is
    shifted by the median of its output on `centre_on` (a real patch, so that masks and agreement checks
    can fail) or, without one, on a random patch: roughly half the voxels then fall on each side of 0.5,
    where an untrained V-Net would otherwise give an all-0 or all-1 mask.
    """
    torch.manual_seed(seed)
    model = ModelConfig(net=NetConfig(n_filters=n_filters), patch_size=tuple(patch_size), k=k)  # type: ignore[arg-type]
    net = randomise_batchnorm(DualTaskNet(model.net, k=k)).eval()
    if centre_heads:
        if centre_on is not None:
            x = torch.from_numpy(np.ascontiguousarray(centre_on, dtype=np.float32))[None, None]
        else:
            x = torch.randn(1, 1, *patch_size, generator=torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            for head in (net.seg, net.dis):
                head.out_conv.bias -= head(x).median()
    return Bundle.from_net(net, model)
