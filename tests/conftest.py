"""Shared fixtures: the shipped real-data sample, the full LA2018 set when present, tiny bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dtml_deploy.bundle import Bundle
from dtml_deploy.config import ModelConfig, NetConfig
from dtml_deploy.io.datasets import find_la2018
from dtml_deploy.nets.dual import DualTaskNet

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data" / "la_sample"  # 3 real LA cases, cropped to 80x72x56, shipped in git


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The small real sample the project ships (always present)."""
    return SAMPLE


@pytest.fixture(scope="session")
def la2018() -> Path:
    """The full LA2018 training set; tests that need it skip when it is absent."""
    root = find_la2018()
    if root is None:
        pytest.skip("LA2018 not found: set DTML_DATA or place it at ../shared/data/LA2018")
    return root


def make_bundle(n_filters: int = 4, patch: tuple[int, int, int] = (32, 32, 32), k: float = 1500.0,
                seed: int = 0, centre_on: np.ndarray | None = None) -> Bundle:
    """A random-weight bundle with non-trivial BatchNorm statistics (so folding is exercised)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(net=NetConfig(n_filters=n_filters), patch_size=patch, k=k)
    net = DualTaskNet(cfg.net, k=cfg.k)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    if centre_on is not None:
        # Shift each head so that half of `centre_on`'s voxels fall on each side of 0.5: an untrained
        # V-Net otherwise calls nearly everything foreground, and mask checks would pass on anything.
        x = torch.from_numpy(np.ascontiguousarray(centre_on, dtype=np.float32))[None, None]
        with torch.no_grad():
            for head in (net.seg, net.dis):
                head.out_conv.bias -= head(x).median()
    return Bundle.from_net(net, cfg)


@pytest.fixture
def tiny_bundle() -> Bundle:
    return make_bundle()


@pytest.fixture
def tiny_bundle_dir(tmp_path: Path, tiny_bundle: Bundle) -> Path:
    return tiny_bundle.save(tmp_path / "bundle")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
