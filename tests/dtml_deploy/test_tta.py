"""Mirror test-time augmentation inside the fused engine, against known answers and a float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtml_deploy.backends.base import Backend, BackendOptions
from dtml_deploy.engine.blending import window_weight
from dtml_deploy.engine.grid import GridSpec, window_starts
from dtml_deploy.engine.sliding import TTA_FLIPS, EngineConfig, SlidingWindowEngine
from tests.dtml_deploy.test_engine import ShiftPredictor

PATCH = (16, 12, 8)


def _ramps(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Position-in-window ramps along x and y: a predictor that uses them is not flip-equivariant."""
    rx = np.linspace(-1.0, 1.0, shape[0])[:, None, None]
    ry = np.linspace(-0.5, 1.5, shape[1])[None, :, None]
    return rx, ry


def _heads(x: np.ndarray) -> dict[str, np.ndarray]:
    """The non-equivariant maps of one window (float64), written once for the backend and the brute force."""
    rx, ry = _ramps(x.shape)
    sdm = np.tanh(0.5 * x + 0.7 * rx - 0.4 * ry)
    return {"p_seg": 1 / (1 + np.exp(-(x + 2.0 * rx + ry))), "p_dis": 1 / (1 + np.exp(3.0 * sdm)), "sdm": sdm}


class RampPredictor(Backend):
    name = "ramp"

    def __init__(self, outputs: tuple[str, ...], batch: int = 3) -> None:
        self.outputs = tuple(outputs)
        self.options = BackendOptions(device="cpu", batch=batch)
        self.device = torch.device("cpu")
        self.calls: list[tuple[int, ...]] = []

    def predict(self, windows: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(windows.shape))
        out = []
        for w in windows[:, 0].double().numpy():
            maps = _heads(w)
            out.append(np.stack([maps[o] for o in self.outputs]))
        return torch.from_numpy(np.stack(out)).float()


def _brute_force(vol: np.ndarray, grid: GridSpec, blend: str) -> dict[str, np.ndarray]:
    """Per window and flip: flip the window, predict, flip back; average the 4 flips, and blend the windows
    with the engine's per-window weight, all in float64. Also the flips' variance of (p_seg + p_dis) / 2."""
    w = window_weight(PATCH, blend)  # type: ignore[arg-type]
    w = np.ones(PATCH) if w is None else w.numpy().astype(np.float64)
    acc = {k: np.zeros(vol.shape) for k in ("p_seg", "p_dis", "sdm", "var")}
    wsum = np.zeros(vol.shape)
    for x, y, z in window_starts(vol.shape, PATCH, grid):
        sl = (slice(x, x + PATCH[0]), slice(y, y + PATCH[1]), slice(z, z + PATCH[2]))
        win = vol[sl].astype(np.float64)
        flips = [{k: np.flip(v, f) for k, v in _heads(np.flip(win, f)).items()} for f in TTA_FLIPS]
        for k in ("p_seg", "p_dis", "sdm"):
            acc[k][sl] += w * np.mean([m[k] for m in flips], axis=0)
        acc["var"][sl] += w * np.var([(m["p_seg"] + m["p_dis"]) / 2 for m in flips], axis=0)
        wsum[sl] += w
    return {k: v / wsum for k, v in acc.items()}


def test_flip_equivariant_predictor_gives_the_same_output_with_and_without_tta(rng):
    """A voxel-wise predictor commutes with every flip, so TTA must change nothing (float32 rounding of the
    mean of four equal values aside) and measure no spread between the flips."""
    vol = rng.standard_normal((45, 30, 20)).astype(np.float32)
    cfg = EngineConfig(grid=GridSpec(overlap=0.5), head="mean", keep_prob=True, keep_sdm=True, keep_heads=True)
    plain = SlidingWindowEngine(ShiftPredictor(("p_seg", "p_dis", "sdm")), PATCH, cfg).run(vol)
    be = ShiftPredictor(("p_seg", "p_dis", "sdm"))
    tta = SlidingWindowEngine(be, PATCH, EngineConfig(**{**cfg.__dict__, "tta": True})).run(vol)
    assert np.array_equal(plain.mask, tta.mask) and plain.agreement == tta.agreement
    for a, b in ((plain.prob, tta.prob), (plain.sdm, tta.sdm), (plain.p_seg, tta.p_seg)):
        assert np.abs(a - b).max() <= 1e-6
    assert plain.tta_spread is None and tta.tta_spread.max() <= 1e-3  # sqrt of a variance of ~1e-14 roundings
    assert tta.n_windows == plain.n_windows and tta.n_forwards == 4 * plain.n_forwards
    assert len(be.calls) == -(-4 * plain.n_windows // 3)  # flips share batches: ceil(4 windows / batch 3)


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("batch,slab_bytes", [(3, None), (4, None), (5, 4 * 30 * 20 * 4 * 24)])
def test_tta_equals_the_average_over_the_four_flips_by_brute_force(rng, blend, batch, slab_bytes):
    """A predictor that depends on the position inside the window (so each flip gives another answer):
    the engine's TTA maps equal the float64 brute force to 2e-6 (fp32 accumulation of values <= 1); the
    spread to 1e-3 (a square root amplifies the rounding of small variances). Batches of 3 and 5 split a
    window's flips across forwards; a small accumulator budget forces slabs."""
    vol = rng.standard_normal((45, 30, 20)).astype(np.float32)
    grid = GridSpec(overlap=0.5)
    cfg = EngineConfig(grid=grid, blend=blend, head="mean", keep_sdm=True, keep_heads=True, tta=True,  # type: ignore[arg-type]
                       max_accumulator_bytes=slab_bytes)
    res = SlidingWindowEngine(RampPredictor(("p_seg", "p_dis", "sdm"), batch), PATCH, cfg).run(vol)
    ref = _brute_force(vol, grid, blend)
    assert np.abs(res.p_seg - ref["p_seg"]).max() < 2e-6
    assert np.abs(res.p_dis - ref["p_dis"]).max() < 2e-6
    assert np.abs(res.sdm - ref["sdm"]).max() < 2e-6
    assert np.abs(res.tta_spread - np.sqrt(ref["var"])).max() < 1e-3
    assert ref["var"].max() > 1e-3  # the flips do disagree, so the test can tell TTA from no TTA
    no_tta = SlidingWindowEngine(RampPredictor(("p_seg", "p_dis", "sdm"), batch), PATCH,
                                 EngineConfig(**{**cfg.__dict__, "tta": False})).run(vol)
    assert np.abs(no_tta.p_seg - ref["p_seg"]).max() > 1e-2
    if slab_bytes is not None:
        assert res.n_slabs > 1
