"""TensorRT: engine build and backend where TensorRT and CUDA exist; everywhere, the parts that do not
need them (availability, the one-line refusal, the sidecar schema and its compatibility check)."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from dtml_deploy.artifacts import TrtProfile, TrtSidecar, check_trt_sidecar, read_sidecar, sidecar_path
from dtml_deploy.backends import BackendOptions, create_backend
from dtml_deploy.backends.trt_backend import TrtBackend
from dtml_deploy.errors import BackendUnavailable, BundleError, DtmlError
from dtml_export import trt_build
from dtml_export.verify import reference_outputs
from tests.bundles import random_bundle

PATCH = (32, 32, 32)


def _sidecar(**over) -> dict:
    d = TrtSidecar(tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0),
                   bundle_hash="0123456789abcdef", precision="fp16", typing="weak", profile=TrtProfile(1, 2, 4),
                   patch_size=(112, 112, 80), outputs=("p_seg", "p_dis", "sdm", "prob"),
                   engine_sha256="00" * 32).to_dict()
    d.update(over)
    return json.loads(json.dumps(d))  # as read back from disk (tuples become lists)


RUNTIME = {"bundle_hash": "0123456789abcdef", "tensorrt_version": "10.13.0.35",
           "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0)}


# ------------------------------------------------------------------------------ runs on every machine


def test_sidecar_matching_everything_passes():
    check_trt_sidecar(_sidecar(), **RUNTIME)


@pytest.mark.parametrize(("change", "error", "words"), [
    ({"bundle_hash": "ffffffffffffffff"}, BundleError, "bundle"),
    ({"tensorrt_version": "10.9.0.34"}, BackendUnavailable, "TensorRT 10.9.0.34"),
    ({"gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": [8, 0]}, BackendUnavailable, "sm_80"),
    ({"gpu_name": "NVIDIA H200"}, BackendUnavailable, "NVIDIA H200"),
    ({"compute_capability": [8, 9]}, BackendUnavailable, "sm_89"),
])
def test_sidecar_mismatch_says_how_to_rebuild(change, error, words):
    with pytest.raises(error, match="dtml export --model BUNDLE --trt") as err:
        check_trt_sidecar(_sidecar(**change), **RUNTIME)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_sidecar_round_trip_and_damage(tmp_path):
    engine = tmp_path / "model-fp16.engine"
    assert sidecar_path(engine).name == "model-fp16.engine.json"
    with pytest.raises(BundleError, match=r"sidecar is missing.*dtml export"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps(_sidecar()))
    sc = read_sidecar(engine)
    assert sc.compute_capability == (9, 0) and sc.profile == TrtProfile(1, 2, 4) and sc.patch_size == (112, 112, 80)
    assert TrtSidecar.from_dict(sc.to_dict()) == sc
    broken = _sidecar()
    del broken["gpu_name"]
    with pytest.raises(BundleError, match=r"damaged.*dtml export"):
        check_trt_sidecar(broken, **RUNTIME)
    with pytest.raises(ValueError, match="min_batch"):
        TrtProfile(4, 2, 8)
    unchecked = _sidecar()
    del unchecked["engine_sha256"]  # an engine that cannot be checked is not run
    with pytest.raises(BundleError, match=r"damaged.*engine_sha256.*dtml export"):
        TrtSidecar.from_dict(unchecked)
    with pytest.raises(BundleError, match=r"format 2 is newer than this dtml understands \(1\); upgrade dtml"):
        TrtSidecar.from_dict(_sidecar(format_version=2))


def test_unavailable_backend_refuses_in_one_line():
    if TrtBackend.is_available():
        pytest.skip("TensorRT and CUDA are present here; the refusal path is not reachable")
    bundle = random_bundle(4, PATCH, centre_heads=False)
    for make in (lambda: TrtBackend(bundle, BackendOptions(), ("p_seg",)),
                 lambda: create_backend("trt", bundle, BackendOptions(), ("p_seg", "p_dis"))):
        with pytest.raises(BackendUnavailable) as err:
            make()
        msg = str(err.value)
        assert "\n" not in msg and ("TensorRT" in msg) and ("--backend torch or onnx" in msg)
        assert err.value.__cause__ is None and err.value.__context__ is None  # no ImportError trace


def test_trt_modules_import_and_choose_typing_without_tensorrt(tmp_path):
    assert trt_build.onnx_precision_for(False) == "fp32"
    trt10 = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(FP16=1), __version__="10.13.0")
    trt11 = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(), __version__="11.4.0")
    fp32 = types.SimpleNamespace(precision="fp32")
    fp16 = types.SimpleNamespace(precision="fp16")
    onnx_path = Path("model.onnx")
    assert trt_build._choose_typing(trt10, fp32, True, onnx_path) is False  # BuilderFlag.FP16, weak
    assert trt_build._choose_typing(trt10, fp32, False, onnx_path) is False
    assert trt_build._choose_typing(trt10, fp16, True, onnx_path) is True
    assert trt_build._choose_typing(trt11, fp16, True, onnx_path) is True
    assert trt_build._choose_typing(trt11, fp32, False, onnx_path) is True
    with pytest.raises(DtmlError, match="dtml export --model BUNDLE --precision fp16"):
        trt_build._choose_typing(trt11, fp32, True, onnx_path)
    with pytest.raises(ValueError, match="fp16 graph"):
        trt_build._choose_typing(trt10, fp16, False, onnx_path)


def test_build_without_tensorrt_is_a_clear_error(tmp_path):
    pytest.importorskip("onnx", reason="needs onnx to export the graph to build from")
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    from dtml_export.onnx_export import export_onnx

    onnx_path = export_onnx(random_bundle(4, PATCH, centre_heads=False), tmp_path / "m.onnx")
    with pytest.raises(BackendUnavailable, match=r"pip install 'dtml\[trt\]'"):
        trt_build.build_engine(onnx_path, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


# ------------------------------------------------------------------------ needs TensorRT and CUDA


@pytest.fixture(scope="module")
def trt():
    mod = pytest.importorskip("tensorrt", reason="TensorRT is not installed (the 'trt' extra)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT tests need a CUDA device")
    return mod


@pytest.fixture(scope="module")
def built(trt, tmp_path_factory):
    pytest.importorskip("onnx")
    from dtml_export.onnx_export import export_onnx

    bundle = random_bundle(4, PATCH, seed=0)
    out = tmp_path_factory.mktemp("trt")
    engines = {}
    cache = out / "timing.cache"
    for precision in ("fp32", "fp16"):
        fp16 = precision == "fp16"
        onnx_path = export_onnx(bundle, out / f"model-{trt_build.onnx_precision_for(fp16)}.onnx",
                                trt_build.onnx_precision_for(fp16))
        options = trt_build.TrtBuildOptions(TrtProfile(1, 2, 4), fp16=fp16, workspace_gb=1, timing_cache=cache,
                                            tf32=False)
        engines[precision] = trt_build.build_engine(onnx_path, out / f"model-{precision}.engine", options)
    return bundle, engines, cache


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize(("precision", "atol", "min_agree"), [("fp32", 1e-4, 0.999), ("fp16", 2e-2, 0.98)])
def test_engine_matches_torch(built, precision, atol, min_agree):
    bundle, engines, cache = built
    build = engines[precision]
    assert cache.is_file() and cache.stat().st_size > 0
    sc = read_sidecar(build.engine_path)
    assert sc.bundle_hash == bundle.content_hash and sc.precision == precision
    assert sc.gpu_name == torch.cuda.get_device_name() and sc.profile == TrtProfile(1, 2, 4)
    outputs = ("p_seg", "sdm", "p_dis")
    backend = TrtBackend(bundle, BackendOptions(device="cuda", precision=precision, batch=3,
                                                artifact=build.engine_path), outputs)
    x = torch.randn(3, 1, *PATCH, generator=torch.Generator().manual_seed(4))
    y = backend.predict(x.cuda())
    assert y.shape == (3, 3, *PATCH) and y.dtype == torch.float32 and y.is_cuda
    ref = reference_outputs(bundle.build(), x, bundle.model.k)
    got = y.cpu().numpy()
    np.testing.assert_allclose(got[:, 0:1], ref["p_seg"], atol=atol, rtol=0)
    np.testing.assert_allclose(got[:, 1:2], ref["sdm"], atol=atol, rtol=0)
    agree = np.mean((got[:, 2:3] > 0.5) == (ref["p_dis"] > 0.5))
    assert agree >= min_agree
    y1 = backend.predict(x[:1].cuda())  # another batch size inside the profile rebinds
    np.testing.assert_allclose(y1.cpu().numpy(), got[:1], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.trt
def test_engine_of_another_bundle_is_refused(built):
    _, engines, _ = built
    other = random_bundle(4, PATCH, seed=1)
    with pytest.raises(BundleError, match="dtml export --model BUNDLE --trt"):
        TrtBackend(other, BackendOptions(device="cuda", artifact=engines["fp32"].engine_path), ("p_seg",))


class _FakeTrt:
    """Records what build_engine asks of TensorRT 10 (weak typing): flags, workspace, profile, cache."""

    __version__ = "10.13.0"

    def __init__(self) -> None:
        self.calls: dict[str, object] = {}
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", TF32="TF32", OBEY_PRECISION_CONSTRAINTS="OBEY")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
        self.LayerType = types.SimpleNamespace(CONVOLUTION="conv", DECONVOLUTION="deconv", CONSTANT="const",
                                               SHUFFLE="shuffle")
        self.float32 = "float32"
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=2: None})
        fake = self

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls["workspace"] = (pool, size)

            def set_flag(self, flag):
                fake.calls.setdefault("flags", []).append(flag)

            def clear_flag(self, flag):
                fake.calls.setdefault("cleared", []).append(flag)

            def add_optimization_profile(self, profile):
                fake.calls["profile"] = profile.shapes

            def create_timing_cache(self, blob):
                return types.SimpleNamespace(serialize=lambda: b"cache")

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return types.SimpleNamespace(serialize=lambda: b"cache")

        class Profile:
            def set_shape(self, name, *shapes):
                self.shapes = (name, *shapes)

        network = types.SimpleNamespace(num_layers=0, num_outputs=0)
        self.Builder = lambda logger: types.SimpleNamespace(
            create_network=lambda flags: fake.calls.__setitem__("network_flags", flags) or network,
            create_builder_config=Config, create_optimization_profile=Profile,
            build_serialized_network=lambda net, cfg: b"engine-bytes")
        self.OnnxParser = lambda net, logger: types.SimpleNamespace(parse_from_file=lambda path: True)


def test_build_engine_steps_with_a_recording_tensorrt(tmp_path, monkeypatch):
    """Without a GPU: the options reach TensorRT (workspace, FP16 flag, batch profile, TF32 off, timing
    cache) and the engine, sidecar and cache are written."""
    fake = _FakeTrt()
    info = types.SimpleNamespace(precision="fp32", patch_size=(32, 32, 16), bundle_hash="0123456789abcdef",
                                 outputs=("p_seg", "p_dis"))
    monkeypatch.setattr(trt_build, "_trt", lambda: fake)
    monkeypatch.setattr(trt_build, "read_onnx_metadata", lambda path: {})
    monkeypatch.setattr(trt_build, "parse_onnx_metadata", lambda meta, where: info)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="Fake GPU", major=9, minor=0))
    options = trt_build.TrtBuildOptions(TrtProfile(1, 2, 4), fp16=True, workspace_gb=0.5,
                                        timing_cache=tmp_path / "t.cache", tf32=False)
    build = trt_build.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", options)
    assert fake.calls["workspace"] == ("WORKSPACE", 1 << 29)
    assert fake.calls["flags"] == ["FP16", "OBEY"] and fake.calls["cleared"] == ["TF32"]
    assert fake.calls["profile"] == ("image", (1, 1, 32, 32, 16), (2, 1, 32, 32, 16), (4, 1, 32, 32, 16))
    assert fake.calls["network_flags"] == 0  # weak typing on TensorRT 10 from the fp32 graph
    assert (tmp_path / "m.engine").read_bytes() == b"engine-bytes" and (tmp_path / "t.cache").read_bytes() == b"cache"
    sc = read_sidecar(tmp_path / "m.engine")
    assert sc == build.sidecar and sc.profile == TrtProfile(1, 2, 4) and sc.precision == "fp16"
    assert sc.typing == "weak" and sc.extra["workspace_gb"] == 0.5 and sc.extra["tf32"] is False
