"""DTML's losses and schedules against hand-computed values and the released code's gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dtml_training.losses import ConsistencyConfig, consistency_loss, dice_loss, dis_loss, seg_loss


def test_dice_loss_by_hand():
    p = torch.tensor([0.5, 1.0, 0.0, 0.25])
    g = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # inter = 0.5 + 1 = 1.5; sum p^2 = 0.25 + 1 + 0.0625 = 1.3125; sum g^2 = 2
    expected = 1 - (2 * 1.5 + 1e-5) / (1.3125 + 2 + 1e-5)
    assert dice_loss(p, g).item() == pytest.approx(expected, rel=1e-6)
    assert dice_loss(g, g).item() == pytest.approx(0.0, abs=1e-6)


def test_seg_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    g = torch.tensor([[1.0, 1.0, 0.0]])
    p = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))]
    bce = -(math.log(p[0]) + math.log(p[1]) + math.log(1 - p[2])) / 3
    dice = 1 - (2 * (p[0] + p[1]) + 1e-5) / (sum(x * x for x in p) + 2 + 1e-5)
    assert seg_loss(logits, g).item() == pytest.approx(0.5 * (bce + dice), rel=1e-6)


def test_dis_loss_variants():
    sdm = torch.tensor([-0.5, -0.001, 0.001, 0.5])
    label = torch.tensor([1.0, 1.0, 0.0, 0.0])
    gt = torch.tensor([-1.0, 0.0, 0.0, 1.0])
    k = 1500.0
    p = torch.sigmoid(-k * sdm.double())
    mask = 1 - (2 * (p * label.double()).sum() + 1e-5) / ((p * p).sum() + 2 + 1e-5)
    mse = ((sdm - gt) ** 2).mean()
    assert dis_loss(sdm, label, k, "mask").item() == pytest.approx(mask.item(), rel=1e-6)
    assert dis_loss(sdm, label, k, "dis", gt).item() == pytest.approx(mse.item(), rel=1e-6)
    assert dis_loss(sdm, label, k, "dis+mask", gt).item() == pytest.approx(mask.item() + mse.item(), rel=1e-6)
    with pytest.raises(ValueError, match="ground-truth SDM"):
        dis_loss(sdm, label, k, "dis")


def test_consistency_is_a_plain_mean_square():
    a, b = torch.tensor([0.2, 0.9, 0.0]), torch.tensor([0.1, 0.4, 1.0])
    assert consistency_loss(a, b).item() == pytest.approx((0.01 + 0.25 + 1.0) / 3, rel=1e-6)


def test_rampup_code_and_paper():
    code, paper = ConsistencyConfig("code"), ConsistencyConfig("paper")
    assert code.ramp(0, 6000) == pytest.approx(math.exp(-5))
    assert code.ramp(149, 6000) == pytest.approx(math.exp(-5))  # changes every 150 iterations
    assert code.ramp(150, 6000) == pytest.approx(math.exp(-5 * (1 - 1 / 40) ** 2))
    assert code.ramp(6000, 6000) == pytest.approx(1.0) and code.ramp(5999, 6000) < 1.0
    assert code.weight(6000, 6000) == pytest.approx(2.0)  # two backward calls in the released code
    assert paper.ramp(3000, 6000) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert paper.weight(6000, 6000) == pytest.approx(0.1)
    assert ConsistencyConfig("paper", lambda_max=0.3).weight(6000, 6000) == pytest.approx(0.3)


def test_single_backward_equals_the_released_codes_two_backward_calls():
    """The code: loss_s = L_seg + l*L_con and loss_d = L_mask + l*L_con, both backpropagated into both
    networks before either optimiser steps. One backward of L_seg + L_mask + 2*l*L_con gives the same."""
    torch.manual_seed(0)
    ws, wd = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    x, g = torch.randn(4, 8), (torch.rand(4) > 0.5).float()
    lam, k = 0.37, 1500.0

    def parts():
        logits, sdm = x @ ws, torch.tanh(x @ wd)
        bce = F.binary_cross_entropy_with_logits(logits[:2], g[:2])
        l_seg = 0.5 * (bce + dice_loss(torch.sigmoid(logits[:2]), g[:2]))
        l_mask = dice_loss(torch.sigmoid(-k * sdm[:2]), g[:2])
        l_con = consistency_loss(torch.sigmoid(logits), torch.sigmoid(-k * sdm))
        return l_seg, l_mask, l_con

    l_seg, l_mask, l_con = parts()
    (l_seg + lam * l_con).backward(retain_graph=True)
    (l_mask + lam * l_con).backward()
    code_grads = ws.grad.clone(), wd.grad.clone()
    ws.grad = wd.grad = None
    l_seg, l_mask, l_con = parts()
    (l_seg + l_mask + ConsistencyConfig("code", lambda_max=lam, rampup_length=0).weight(0, 1) * l_con).backward()
    assert torch.allclose(ws.grad, code_grads[0], atol=1e-7)
    assert torch.allclose(wd.grad, code_grads[1], atol=1e-7)


def _batch_and_maps(seed: int = 0, n_l: int = 2, n_u: int = 2):
    from dtml_training.data.dataset import Batch

    g = torch.Generator().manual_seed(seed)
    shape = (6, 6, 4)
    label = (torch.rand(n_l, 1, *shape, generator=g) > 0.6).to(torch.uint8)
    sdm_gt = torch.rand(n_l, 1, *shape, generator=g) * 2 - 1
    batch = Batch(torch.randn(n_l + n_u, 1, *shape, generator=g), label, sdm_gt)
    logits = torch.randn(n_l + n_u, 1, *shape, generator=g) * 3
    sdm = torch.tanh(torch.randn(n_l + n_u, 1, *shape, generator=g) * 0.01)  # near 0: sigmoid(-k sdm) varies
    return batch, logits, sdm


@pytest.mark.parametrize("supervision", ["mask", "dis", "dis+mask"])
def test_objective_uses_labeled_half_for_supervision_and_all_for_consistency(supervision):
    """The trainer's objective: L_seg and L_dis read only the labeled (first) samples and their labels,
    L_con reads every sample, and the total is L_seg + L_dis + w(t) L_con with the recipe's ramp-up."""
    from dtml_training.recipes import recipe
    from dtml_training.trainer import Objective

    cfg = recipe("dtml", supervision=supervision, iterations=6000)
    objective = Objective(cfg)
    batch, logits, sdm = _batch_and_maps()
    n_l = batch.label.shape[0]
    total, parts, w = objective(logits, sdm, batch, iteration=3000)

    label = batch.label.float()
    assert torch.allclose(parts["seg"], seg_loss(logits[:n_l], label))
    assert torch.allclose(parts["dis"], dis_loss(sdm[:n_l], label, cfg.k, supervision, batch.sdm))
    p_dis = torch.sigmoid(-cfg.k * sdm)
    assert torch.allclose(parts["con"], ((torch.sigmoid(logits) - p_dis) ** 2).mean())  # all four samples
    assert w == pytest.approx(cfg.consistency_cfg.weight(3000, 6000)) and w > 0
    assert torch.allclose(total, parts["seg"] + parts["dis"] + w * parts["con"])
    assert objective(logits, sdm, batch, iteration=0)[2] < w  # ramped up

    # unlabeled samples reach only the consistency term
    logits2, sdm2 = logits.clone(), sdm.clone()
    logits2[n_l:] += 1.0
    sdm2[n_l:] *= 0.5
    _, parts2, _ = objective(logits2, sdm2, batch, iteration=3000)
    assert torch.equal(parts2["seg"], parts["seg"]) and torch.equal(parts2["dis"], parts["dis"])
    assert not torch.allclose(parts2["con"], parts["con"])
    # the ground-truth SDM is what the distance loss regresses, when it is supervised by distances
    batch.sdm.mul_(0.5)
    _, parts3, _ = objective(logits, sdm, batch, iteration=3000)
    assert torch.equal(parts3["dis"], parts["dis"]) == (supervision == "mask")
