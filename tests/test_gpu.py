"""CUDA paths: the engine and training on a GPU against fp32 CPU references. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtml_deploy.backends.base import BackendOptions, create_backend
from dtml_deploy.engine.grid import GridSpec
from dtml_deploy.engine.sliding import EngineConfig, SlidingWindowEngine
from tests.conftest import make_bundle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PATCH = (48, 48, 32)
OUTS = ("p_seg", "p_dis", "sdm")


def _run(bundle, vol, device, precision="fp32", batch=4, **engine_kw):
    backend = create_backend("torch", bundle, BackendOptions(device=device, precision=precision, batch=batch,
                                                             cuda_graphs=engine_kw.pop("graphs", False)), OUTS)
    cfg = EngineConfig(grid=GridSpec(overlap=0.5), blend="gaussian", head="mean", keep_prob=True, keep_sdm=True,
                       **engine_kw)
    return SlidingWindowEngine(backend, PATCH, cfg).run(vol)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(7)
    return make_bundle(n_filters=8, patch=PATCH, k=50.0), rng.standard_normal((100, 90, 40)).astype(np.float32)


def test_cuda_fp32_matches_cpu(case):
    bundle, vol = case
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare true fp32 arithmetic
    try:
        gpu = _run(bundle, vol, "cuda")
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    cpu = _run(bundle, vol, "cpu")
    assert np.abs(gpu.prob - cpu.prob).max() < 1e-4
    assert np.abs(gpu.sdm - cpu.sdm).max() < 1e-4


@pytest.mark.parametrize("precision,tol", [("fp16", 2e-2), ("bf16", 6e-2)])
def test_reduced_precision_close_to_fp32(case, precision, tol):
    bundle, vol = case
    ref = _run(bundle, vol, "cpu")
    low = _run(bundle, vol, "cuda", precision=precision)
    assert np.isfinite(low.prob).all() and np.isfinite(low.sdm).all()
    # mean |error| of probabilities; the bound is the precision's rounding carried through ~20 layers
    assert np.abs(low.prob - ref.prob).mean() < tol / 10 and np.abs(low.prob - ref.prob).max() < tol * 10


def test_cuda_graphs_equal_eager(case):
    bundle, vol = case
    eager = _run(bundle, vol, "cuda", precision="fp16", batch=3)
    graphs = _run(bundle, vol, "cuda", precision="fp16", batch=3, graphs=True)
    assert np.array_equal(eager.mask, graphs.mask)
    assert np.abs(eager.prob - graphs.prob).max() < 1e-6


def test_slabs_on_gpu_equal_full(case):
    bundle, vol = case
    full = _run(bundle, vol, "cuda", precision="fp16")
    slabs = _run(bundle, vol, "cuda", precision="fp16", max_accumulator_bytes=3 * 90 * 40 * 4 * 50)
    assert slabs.n_slabs > 1 and full.n_slabs == 1
    assert np.abs(full.prob - slabs.prob).max() < 1e-6


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_steps_on_gpu(sample_root, tmp_path, amp):
    from dtml_deploy.bundle import Bundle
    from dtml_deploy.io.datasets import make_split, open_source
    from dtml_training.recipes import recipe
    from dtml_training.trainer import Trainer

    cfg = recipe("dtml", labeled=1, labeled_bs=1, iterations=4, n_filters=4, patch=(32, 32, 32), amp=amp,
                 workers=2, checkpoint_every=0, device="cuda")
    result = Trainer(cfg, make_split(open_source(sample_root), 1, None), tmp_path / amp, show_progress=False).run()
    assert result.summary["amp"] == {"bf16": "bfloat16", "fp16": "float16"}[amp]
    assert np.isfinite(result.summary["final"]["loss"])
    Bundle.load(result.bundle)


def test_cuda_backend_keeps_a_deterministic_process_deterministic(case, monkeypatch):
    """Training with --deterministic validates through the backend; cuDNN autotuning must stay off."""
    bundle, _ = case
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    create_backend("torch", bundle, BackendOptions(device="cuda", batch=1, cuda_graphs=False), ("p_seg",))
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    create_backend("torch", bundle, BackendOptions(device="cuda", batch=1, cuda_graphs=False), ("p_seg",))
    assert torch.backends.cudnn.benchmark is True


def test_segment_defaults_on_cuda_are_the_measured_fastest(case):
    """fp16, batch 8, CUDA graphs and cuDNN conv+ReLU (benchmarks/results/segment_speed_h200.json)."""
    from dtml_deploy.predictor import Predictor

    bundle, _ = case
    seg = Predictor.load(bundle, device="cuda").segmenter
    opts = seg.backend.options
    assert (opts.precision, opts.batch, opts.cuda_graphs, opts.cudnn_fusion) == ("fp16", 8, True, True)
