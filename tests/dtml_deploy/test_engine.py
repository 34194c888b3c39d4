"""The fused sliding-window engine: grid maths, stitching against known answers and the paper's loop."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dtml_deploy.backends.base import Backend, BackendOptions, create_backend
from dtml_deploy.engine.blending import weight_sums, window_weight
from dtml_deploy.engine.grid import GridSpec, pad_volume, tile_starts_overlap, tile_starts_stride, window_starts
from dtml_deploy.engine.postprocess import largest_component
from dtml_deploy.engine.sliding import EngineConfig, SlidingWindowEngine
from tests.conftest import make_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from reference import reference_sliding_window


@pytest.mark.parametrize("length,patch,overlap", [(200, 112, 0.5), (112, 112, 0.5), (88, 80, 0.5), (577, 112, 0.25),
                                                  (113, 112, 0.0), (1000, 16, 0.9)])
def test_overlap_starts_are_even_and_flush(length, patch, overlap):
    s = tile_starts_overlap(length, patch, overlap)
    assert s[0] == 0 and s[-1] == max(length - patch, 0)
    steps = np.diff(s)
    assert (steps <= patch * (1 - overlap) + 1).all() and (steps >= 1).all()
    assert steps.max() - steps.min() <= 1 if len(steps) else True
    covered = np.zeros(max(length, patch), bool)
    for a in s:
        covered[a:a + patch] = True
    assert covered.all()


def test_paper_stride_matches_the_papers_formula():
    for length in (88, 137, 160, 244, 576):
        for patch, stride in ((112, 18), (80, 4)):
            n = math.ceil((length - patch) / stride) + 1 if length > patch else 1
            expected = [min(stride * i, length - patch) for i in range(n)] if length > patch else [0]
            assert tile_starts_stride(length, patch, stride) == expected
    # by hand: the last window sits flush with the end, earlier ones on the stride
    assert tile_starts_stride(137, 112, 18) == [0, 18, 25]
    assert tile_starts_stride(88, 80, 4) == [0, 4, 8]
    assert tile_starts_stride(112, 112, 18) == [0] and tile_starts_stride(100, 112, 18) == [0]
    # 45-84 windows per LA case, as the method file says
    assert len(window_starts((183, 140, 88), (112, 112, 80), GridSpec(stride=(18, 18, 4)))) == 45


def test_padding_is_symmetric_as_the_paper():
    vol = np.ones((20, 40, 10), np.float32)
    padded, pads = pad_volume(vol, (32, 32, 16))
    assert padded.shape == (32, 40, 16) and pads == [(6, 6), (0, 0), (3, 3)]


def test_weight_sums_equal_accumulated_weights():
    shape, patch = (70, 50, 30), (32, 32, 16)
    starts = window_starts(shape, patch, GridSpec(overlap=0.5))
    per_axis = [sorted({s[a] for s in starts}) for a in range(3)]
    w = window_weight(patch, "gaussian").numpy().astype(np.float64)
    acc = np.zeros(shape)
    for x, y, z in starts:
        acc[x:x + 32, y:y + 32, z:z + 16] += w
    f = weight_sums(shape, patch, per_axis, "gaussian")
    assert np.allclose(np.einsum("i,j,k->ijk", *f), acc, rtol=1e-6)


class ShiftPredictor(Backend):
    """Known-answer backend: p_seg = sigmoid(x + 1), p_dis = sigmoid(-x), sdm = tanh(x) per voxel.

    Voxel-wise maps make stitching exact: every window sees the same value at a voxel, so the stitched
    map must equal the map of the whole volume regardless of grid, blending or slabs.
    """

    name = "shift"

    def __init__(self, outputs, batch=3):
        self.outputs = tuple(outputs)
        self.options = BackendOptions(device="cpu", batch=batch)
        self.device = torch.device("cpu")
        self.calls = []

    def predict(self, windows):
        self.calls.append(tuple(windows.shape))
        x = windows.float()
        maps = {"p_seg": torch.sigmoid(x + 1), "p_dis": torch.sigmoid(-x), "sdm": torch.tanh(x)}
        return torch.cat([maps[o] for o in self.outputs], 1)


def test_stitched_maps_stay_in_range(rng):
    """Saturated heads (p = 1, sdm = -1 everywhere): the blended maps are weighted means of in-range
    values, and rounding must not push them out of it (it did by 2e-7 before clamping)."""
    vol = 50.0 + rng.random((61, 40, 30)).astype(np.float32)  # sigmoid(x + 1) = tanh(x) = 1 in fp32
    be = ShiftPredictor(("p_seg", "p_dis", "sdm"))
    cfg = EngineConfig(grid=GridSpec(overlap=0.5), blend="gaussian", head="seg", keep_prob=True, keep_sdm=True)
    res = SlidingWindowEngine(be, (16, 24, 12), cfg).run(vol)
    assert res.prob.max() <= 1.0 and res.sdm.max() <= 1.0
    np.testing.assert_allclose(res.prob, 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.sdm, 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("grid", [GridSpec(overlap=0.5), GridSpec(overlap=0.0), GridSpec(stride=(7, 9, 5))])
@pytest.mark.parametrize("slab_bytes", [None, 3 * 40 * 30 * 4 * 20])
def test_known_answer_stitching(rng, blend, grid, slab_bytes):
    vol = rng.standard_normal((61, 40, 30)).astype(np.float32)
    be = ShiftPredictor(("p_seg", "p_dis", "sdm"))
    cfg = EngineConfig(grid=grid, blend=blend, head="mean", keep_prob=True, keep_sdm=True, keep_uncertainty=True,
                       max_accumulator_bytes=slab_bytes)
    res = SlidingWindowEngine(be, (16, 16, 16), cfg).run(vol)
    x = torch.from_numpy(vol).double()
    p_seg, p_dis = torch.sigmoid(x + 1).numpy(), torch.sigmoid(-x).numpy()
    tol = 2e-6  # fp32 accumulation of identical values, relative to values <= 1
    assert np.abs(res.prob - (p_seg + p_dis) / 2).max() < tol
    assert np.abs(res.sdm - np.tanh(vol.astype(np.float64))).max() < tol
    assert np.abs(res.uncertainty - np.abs(p_seg - p_dis)).max() < tol
    a, b = p_seg > 0.5, p_dis > 0.5
    assert res.agreement == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), abs=1e-9)
    assert all(c[0] == 3 for c in be.calls)  # every forward sees the fixed batch size
    if slab_bytes is not None and grid.stride is None:
        assert res.n_slabs > 1


def test_small_volume_is_padded_and_cropped_back(rng):
    vol = rng.standard_normal((10, 20, 7)).astype(np.float32)
    res = SlidingWindowEngine(ShiftPredictor(("p_seg",)), (16, 16, 16),
                              EngineConfig(head="seg", qc=False, keep_prob=True)).run(vol)
    assert res.prob.shape == vol.shape and res.n_windows == 2
    assert np.abs(res.prob - 1 / (1 + np.exp(-(vol.astype(np.float64) + 1)))).max() < 2e-6


@pytest.mark.parametrize("batch", [1, 4])
def test_engine_matches_the_papers_loop(rng, batch):
    bundle = make_bundle(n_filters=4, patch=(32, 32, 32), k=20.0)
    net = bundle.build()
    vol = rng.standard_normal((50, 45, 40)).astype(np.float32)
    ref = reference_sliding_window(net, vol, (32, 32, 32), (9, 9, 4), heads=("p_seg", "p_dis", "sdm"))
    backend = create_backend("torch", bundle, BackendOptions(device="cpu", batch=batch),
                             ("p_seg", "p_dis", "sdm"))
    cfg = EngineConfig(grid=GridSpec(stride=(9, 9, 4)), blend="constant", head="seg", keep_prob=True, keep_sdm=True)
    res = SlidingWindowEngine(backend, (32, 32, 32), cfg).run(vol)
    # fp32 with BN folded and channels_last vs the plain fp32 loop: rounding differences only.
    assert np.abs(res.prob - ref["p_seg"]).max() < 1e-4
    assert np.abs(res.sdm - ref["sdm"]).max() < 1e-4
    assert (res.mask == (ref["p_seg"] > 0.5)).mean() > 0.9999


def test_gaussian_blending_matches_a_brute_force_weighted_average(rng):
    """The default blending on a real (tiny) pair with an anisotropic patch, against a float64 loop that
    weights every window's output by its own 3D Gaussian (sigma = patch/8 per axis, centred, normalised
    to 1, floored at 1e-3 per axis as nnU-Net) and divides by the summed weights. An axis mix-up in the
    separable weights or their sums would show here (an isotropic patch would hide it)."""
    patch = (48, 32, 16)
    bundle = make_bundle(n_filters=2, patch=patch, k=20.0)
    net = bundle.build().eval()
    vol = rng.standard_normal((70, 45, 30)).astype(np.float32)
    grid = GridSpec(overlap=0.5)

    def g(n: int) -> np.ndarray:
        x = np.arange(n) - (n - 1) / 2
        w = np.exp(-0.5 * (x / (n / 8)) ** 2)
        return np.maximum(w / w.max(), 1e-3)

    w3 = g(patch[0])[:, None, None] * g(patch[1])[None, :, None] * g(patch[2])[None, None, :]
    num, den = np.zeros(vol.shape), np.zeros(vol.shape)
    for x, y, z in window_starts(vol.shape, patch, grid):
        sl = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
        with torch.no_grad():
            logits, _ = net(torch.from_numpy(np.ascontiguousarray(vol[sl]))[None, None])
        num[sl] += w3 * torch.sigmoid(logits)[0, 0].double().numpy()
        den[sl] += w3
    expected = num / den
    backend = create_backend("torch", bundle, BackendOptions(device="cpu", batch=3), ("p_seg", "p_dis"))
    res = SlidingWindowEngine(backend, patch, EngineConfig(grid=grid, blend="gaussian", head="seg",
                                                                    keep_prob=True)).run(vol)
    assert np.abs(res.prob - expected).max() < 1e-5  # fp32 accumulation and folded BN vs float64


@pytest.mark.slow
def test_engine_matches_the_papers_loop_on_a_real_case(la2018):
    import nibabel as nib

    from dtml_deploy.config import IntensityConfig
    from dtml_deploy.intensity import normalise

    img = nib.load(str(sorted((la2018 / "images").glob("*.nii.gz"))[0])).get_fdata(dtype=np.float32)
    img = normalise(img[:130, :120], IntensityConfig())  # keep the real intensities, trim the size
    bundle = make_bundle(n_filters=2, patch=(112, 112, 80), k=1500.0)
    ref = reference_sliding_window(bundle.build(), img, (112, 112, 80), (18, 18, 4), heads=("p_seg", "p_dis"))
    backend = create_backend("torch", bundle, BackendOptions(device="cpu", batch=2), ("p_seg", "p_dis"))
    cfg = EngineConfig(grid=GridSpec(stride=(18, 18, 4)), blend="constant", head="seg", keep_prob=True)
    res = SlidingWindowEngine(backend, (112, 112, 80), cfg).run(img)
    assert res.n_windows == 2 * 2 * 3
    assert np.abs(res.prob - ref["p_seg"]).max() < 1e-4


def test_largest_component_uses_full_connectivity():
    m = np.zeros((10, 10, 10), np.uint8)
    m[1:4, 1:4, 1:4] = 1  # 27 voxels
    m[4, 4, 4] = 1  # touches the cube only at a corner: same component with 26-connectivity
    m[7:9, 7:9, 7:9] = 1  # 8 voxels, separate
    out = largest_component(m)
    assert out.sum() == 28 and out[4, 4, 4] == 1 and out[7, 7, 7] == 0
    assert largest_component(np.zeros((4, 4, 4), np.uint8)).sum() == 0


def test_engine_config_channels():
    assert EngineConfig(head="seg", qc=False).channels == ("p_seg",)
    assert EngineConfig(head="sdm", qc=False).channels == ("p_dis",)
    assert EngineConfig(head="seg", qc=True, keep_sdm=True).channels == ("p_seg", "p_dis", "sdm")
    with pytest.raises(ValueError, match="head"):
        EngineConfig(head="max")  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_640x640x256_volume_fits_a_24_gb_machine():
    """A 640x640x256 volume (the largest the toolkit promises to fit in 24 GB), through the whole engine
    with a cheap known-answer backend: peak resident memory stays far below 24 GB (accumulators are
    2 x 420 MB in fp32)."""
    import resource

    vol = np.zeros((640, 640, 256), np.float32)
    vol[100:300, 200:400, 50:200] = 2.0
    be = ShiftPredictor(("p_seg", "p_dis"), batch=8)
    res = SlidingWindowEngine(be, (112, 112, 80), EngineConfig(head="mean")).run(vol)
    assert res.n_windows == 11 * 11 * 6 and res.mask.shape == vol.shape
    expected = (1 / (1 + np.exp(-(vol + 1))) + 1 / (1 + np.exp(vol))) / 2 > 0.5
    assert np.array_equal(res.mask.astype(bool), expected)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 < 8.0  # GB (ru_maxrss is KiB on Linux)


def test_out_of_memory_is_a_clear_error(rng):
    from dtml_deploy.errors import OutOfMemory

    class Exhausted(ShiftPredictor):
        def predict(self, windows):
            raise MemoryError

    vol = rng.standard_normal((40, 40, 40)).astype(np.float32)
    with pytest.raises(OutOfMemory, match=r"host ran out of memory on a 40x40x40 volume \(batch 3\); lower --batch"):
        SlidingWindowEngine(Exhausted(("p_seg",)), (16, 16, 16), EngineConfig(head="seg", qc=False)).run(vol)


def test_backend_output_order_does_not_matter(rng):
    """The engine maps channels by name, whatever order the backend produces them in."""
    vol = rng.standard_normal((30, 30, 30)).astype(np.float32)
    cfg = EngineConfig(head="seg", keep_prob=True, keep_uncertainty=True)  # seg: not symmetric in the heads
    a = SlidingWindowEngine(ShiftPredictor(("p_seg", "p_dis")), (16, 16, 16), cfg).run(vol)
    b = SlidingWindowEngine(ShiftPredictor(("p_dis", "p_seg")), (16, 16, 16), cfg).run(vol)
    c = SlidingWindowEngine(ShiftPredictor(("sdm", "p_dis", "p_seg")), (16, 16, 16), cfg).run(vol)
    assert np.abs(a.prob - 1 / (1 + np.exp(-(vol.astype(np.float64) + 1)))).max() < 2e-6
    for other in (b, c):
        assert np.array_equal(a.prob, other.prob) and np.array_equal(a.uncertainty, other.uncertainty)
        assert a.agreement == other.agreement
