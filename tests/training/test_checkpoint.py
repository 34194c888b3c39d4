"""training/checkpoint.py: a pickle-free round trip of weights, momentum buffers and RNG state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtml_deploy.config import NetConfig
from dtml_deploy.errors import DtmlError
from dtml_deploy.nets.dual import DualTaskNet
from dtml_training.checkpoint import load_checkpoint, save_checkpoint


def _trained_step(seed: int) -> tuple[DualTaskNet, dict[str, torch.optim.Optimizer]]:
    torch.manual_seed(seed)
    net = DualTaskNet(NetConfig(n_filters=4)).train()
    opts = {"seg": torch.optim.SGD(net.seg.parameters(), lr=0.1, momentum=0.9),
            "dis": torch.optim.SGD(net.dis.parameters(), lr=0.1, momentum=0.9)}
    out = net(torch.randn(2, 1, 32, 32, 16))
    sum(o.float().mean() for o in (out if isinstance(out, tuple) else out.values())).backward()
    for o in opts.values():
        o.step()
    return net, opts


def test_round_trip_restores_weights_buffers_momentum_and_rng(tmp_path: Path) -> None:
    net, opts = _trained_step(0)
    torch.manual_seed(42)
    save_checkpoint(tmp_path / "ck", net, opts, 7, {"config": {"lr": 0.1}})
    after_save = torch.rand(3)  # what the RNG gives right after the checkpoint

    other, other_opts = _trained_step(1)  # different weights and momentum
    meta = load_checkpoint(tmp_path / "ck", other, other_opts)
    assert meta == {"iteration": 7, "config": {"lr": 0.1}}
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k  # BatchNorm running statistics included
    for name in opts:
        pa = [opts[name].state[p]["momentum_buffer"] for g in opts[name].param_groups for p in g["params"]]
        pb = [other_opts[name].state[p]["momentum_buffer"] for g in other_opts[name].param_groups
              for p in g["params"]]
        assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert torch.equal(torch.rand(3), after_save)
    assert not list((tmp_path / "ck").glob("*.pkl")) and not list((tmp_path / "ck").glob("*.pt"))


def test_a_missing_checkpoint_is_a_toolkit_error(tmp_path: Path) -> None:
    net, opts = _trained_step(0)
    with pytest.raises(DtmlError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path / "nothing", net, opts)


def test_saving_replaces_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    net, opts = _trained_step(0)
    save_checkpoint(tmp_path / "ck", net, opts, 1, {"config": {"lr": 0.1}})
    save_checkpoint(tmp_path / "ck", net, opts, 2, {"config": {"lr": 0.1}, "note": "second"})
    meta = load_checkpoint(tmp_path / "ck", *_trained_step(3))
    assert meta == {"iteration": 2, "config": {"lr": 0.1}, "note": "second"}
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["state.json", "state.safetensors"]
