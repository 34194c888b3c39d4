"""The V-Net, the dual-task pair, sdm_to_mask and BatchNorm folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtml_deploy.config import ModelConfig, NetConfig
from dtml_deploy.nets import DualTaskNet, VNet, sdm_to_mask
from dtml_deploy.nets.fold import fold_batchnorm
from dtml_deploy.nets.vnet import count_parameters
from tests.bundles import randomise_batchnorm


def test_parameter_count_matches_the_paper():
    # UA-MT/DTC V-Net with one output channel: 9,448,849 parameters (the method file: about 9.45 M).
    assert count_parameters(VNet(NetConfig(n_filters=16))) == 9_448_849


def test_stage_depths_and_widths():
    net = VNet(NetConfig(n_filters=16))
    convs = {name: sum(isinstance(m, nn.Conv3d) for m in getattr(net, name).conv)
             for name in ("block_one", "block_two", "block_three", "block_four", "block_five",
                          "block_six", "block_seven", "block_eight", "block_nine")}
    assert convs == {"block_one": 1, "block_two": 2, "block_three": 3, "block_four": 3, "block_five": 3,
                     "block_six": 3, "block_seven": 3, "block_eight": 2, "block_nine": 1}
    assert net.block_five.conv[0].out_channels == 256
    assert isinstance(net.block_five_up.conv[0], nn.ConvTranspose3d)


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_norms_and_shapes(norm):
    net = VNet(NetConfig(n_filters=8, norm=norm)).eval()
    out = net(torch.randn(1, 1, 32, 32, 16))
    assert out.shape == (1, 1, 32, 32, 16)
    kinds = {type(m).__name__ for m in net.modules()}
    expected = {"batch": "BatchNorm3d", "instance": "InstanceNorm3d", "group": "GroupNorm"}.get(norm)
    if expected:
        assert expected in kinds
    else:
        assert not kinds & {"BatchNorm3d", "InstanceNorm3d", "GroupNorm"}


def test_dropout_only_in_training():
    torch.manual_seed(0)
    net = VNet(NetConfig(n_filters=4))
    x = torch.randn(2, 1, 32, 32, 16)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    torch.manual_seed(1)
    a = net(x)
    torch.manual_seed(2)
    b = net(x)
    assert not torch.allclose(a, b)


def test_dual_task_outputs():
    pair = DualTaskNet(NetConfig(n_filters=4), k=1500).eval()
    x = torch.randn(2, 1, 32, 32, 16)
    logits, sdm = pair(x)
    assert logits.shape == sdm.shape == (2, 1, 32, 32, 16)
    assert logits.dtype == torch.float32 and sdm.dtype == torch.float32
    with torch.no_grad():  # M_s gives raw logits, M_d the tanh of its raw output: nothing else in between
        assert torch.equal(logits, pair.seg(x)) and torch.equal(sdm, torch.tanh(pair.dis(x)))
    assert sdm.abs().max() <= 1.0
    assert not any(a is b for a, b in zip(pair.seg.parameters(), pair.dis.parameters()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1.0, 1500.0, 1e4])
def test_sdm_to_mask_is_finite_in_low_precision(dtype, k):
    d = torch.cat([torch.linspace(-1, 1, 2001), torch.tensor([0.0, -1e-4, 1e-4, 1.0, -1.0])]).to(dtype)
    p = sdm_to_mask(d, k)
    assert torch.isfinite(p).all()
    ref = torch.sigmoid(-k * d.double())
    assert (p.double() - ref).abs().max() < 1e-6  # fp32 evaluation of the (exactly representable) input
    assert p.dtype == torch.float32


def test_sdm_to_mask_sign_convention():
    p = sdm_to_mask(torch.tensor([-0.1, 0.0, 0.1]), 1500)
    assert p[0] > 0.999 and p[1] == 0.5 and p[2] < 0.001  # negative inside -> foreground


def test_fold_batchnorm_matches_float64_reference():
    torch.manual_seed(0)
    net = randomise_batchnorm(DualTaskNet(NetConfig(n_filters=4))).eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    x = torch.randn(2, 1, 32, 32, 16)
    ref_l, ref_s = net.double()(x.double())
    logits, s = folded(x)
    # fp32 folded vs fp64 unfolded: rounding only, relative to the logits' scale.
    assert (logits.double() - ref_l).abs().max() / ref_l.abs().max() < 1e-5
    assert (s.double() - ref_s).abs().max() < 1e-5


def test_model_config_validation():
    with pytest.raises(ValueError, match="multiples of 16"):
        ModelConfig(patch_size=(100, 112, 80))
    with pytest.raises(ValueError, match="norm"):
        NetConfig(norm="layer")  # type: ignore[arg-type]
    cfg = ModelConfig(net=NetConfig(n_filters=8, norm="instance"), patch_size=(64, 64, 48), k=100.0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
