"""ONNX export: graph, metadata, agreement with PyTorch, dynamic axes, the onnx backend.

Tiny random pairs (n_filters=4, patch 32^3, BatchNorm statistics randomised so folding matters,
heads centred so masks are about half full). Tolerances against the torch fp32 pair are those of
`export.verify.tolerance`: fp32 1e-4 abs on p_seg and sdm, k/4 x 1e-5 (3.75e-3) on p_dis (the
sigmoid(-k*sdm) slope amplifies sdm's rounding), Dice >= 0.999; fp16 2e-2 abs on p_seg and sdm,
p_dis and prob checked by Dice >= 0.98 only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx (the 'onnx' extra) is needed to export")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime (the 'onnx' extra) is needed to run exports")

from dtml_deploy.artifacts import (  # noqa: E402
    FORMATS,
    ONNX_OUTPUTS,
    PROB_COMBINATION,
    format_for_path,
    parse_onnx_metadata,
    read_onnx_metadata,
)
from dtml_deploy.backends import BackendOptions, create_backend  # noqa: E402
from dtml_deploy.backends.onnx_backend import OnnxBackend  # noqa: E402
from dtml_deploy.errors import BackendUnavailable, BundleError  # noqa: E402
from dtml_export.formats import artifact_path  # noqa: E402
from dtml_export.onnx_export import export_onnx, export_onnx_info  # noqa: E402
from dtml_export.verify import reference_outputs, render_report, tolerance, verify_onnx  # noqa: E402
from tests.bundles import random_bundle  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PATCH = (32, 32, 32)


@pytest.fixture(scope="module")
def bundle():
    return random_bundle(4, PATCH, seed=0)


@pytest.fixture(scope="module")
def exports(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return {p: export_onnx_info(bundle, artifact_path(out, "onnx", p), p) for p in ("fp32", "fp16")}


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _elem_types(model) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_writes_a_checked_folded_graph(exports, bundle, precision):
    info = exports[precision]
    assert info.path.name == f"model-{precision}.onnx" and info.size_bytes == info.path.stat().st_size
    assert info.seconds > 0 and info.bundle_hash == bundle.content_hash
    assert [p.name for p in info.path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files
    model = onnx.load(str(info.path))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"BatchNormalization", "Dropout", "Identity"}
    assert [i.name for i in model.graph.input] == ["image"]
    assert tuple(o.name for o in model.graph.output) == ONNX_OUTPUTS
    FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    for v in (*model.graph.input, *model.graph.output):
        dims = v.type.tensor_type.shape.dim
        assert v.type.tensor_type.elem_type == FLOAT
        assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, *PATCH]
    weights = {init.data_type for init in model.graph.initializer if len(init.dims) == 5}
    assert weights == ({HALF} if precision == "fp16" else {FLOAT})
    types = _elem_types(model)
    for node in model.graph.node:  # the non-linearities and -k*sdm always see fp32
        if node.op_type in ("Tanh", "Sigmoid", "Mul"):
            assert all(types[i] == FLOAT for i in node.input if i in types), node.name


def test_metadata_round_trip(exports, bundle):
    for precision, info in exports.items():
        meta = read_onnx_metadata(info.path)
        art = parse_onnx_metadata(meta, str(info.path))
        assert art.bundle_hash == bundle.content_hash
        assert art.model == bundle.model
        assert art.patch_size == PATCH and art.k == 1500.0
        assert art.precision == precision and art.outputs == ONNX_OUTPUTS
        assert art.opset == 17 and art.dynamic_spatial is False and art.prob == PROB_COMBINATION
        assert meta["dtml.intensity"] == '{"mode": "zscore"}'
        assert meta["dtml.spacing"] == "[0.625, 0.625, 0.625]"
        assert art.dtml_version


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnxruntime_matches_torch_within_stated_tolerances(exports, bundle, precision):
    report = verify_onnx(bundle, exports[precision].path, n_random=2, seed=1)
    table = render_report(report)
    assert report.passed, table
    tol = tolerance(precision, bundle.model.k)
    for check in report.checks:
        assert check.max_abs_err <= tol.max_abs[check.output], table
        assert check.dice >= tol.min_dice, table
    assert ("PASSED" in table) and ("p_dis" in table)
    if precision == "fp32":  # the stated fp32 budget: 1e-4 on the probabilities a mask is cut from
        assert max(c.max_abs_err for c in report.checks if c.output in ("p_seg", "sdm")) <= 1e-4


def test_graph_check_catches_a_head_computed_in_fp16(exports, bundle):
    """onnxruntime's CPU provider runs fp16 convolutions in fp32, so the numeric check alone cannot see
    an fp16 tanh; the graph check must. Removing the Cast before Tanh must be reported and fail."""
    import onnx

    from dtml_export.verify import OutputCheck, VerifyReport, heads_below_fp32

    report = verify_onnx(bundle, exports["fp16"].path, n_random=1)
    assert report.low_precision_heads == [] and "all fp32" in render_report(report)
    model = onnx.load(str(exports["fp16"].path))
    tanh = next(n for n in model.graph.node if n.op_type == "Tanh")
    cast = next(n for n in model.graph.node if n.output[0] == tanh.input[0])
    assert cast.op_type == "Cast"
    tanh.input[0] = cast.input[0]  # tanh now reads the fp16 conv output
    bad = heads_below_fp32(model)
    assert len(bad) == 1 and bad[0].startswith("Tanh") and "(float16)" in bad[0]
    perfect = OutputCheck("p_seg", "random", 0.0, 0.0, 1.0, 1e-4, 0.999)
    tampered = VerifyReport(onnx_path=Path("x.onnx"), precision="fp16", checks=[perfect], low_precision_heads=bad)
    assert not tampered.passed and "Tanh" in render_report(tampered)


@pytest.mark.parametrize("norm", ["instance", "group", "none"])
def test_other_normalisations_export_and_verify(norm, tmp_path):
    """InstanceNorm refuses the 1-voxel bottleneck of a 16^3 trace; such bundles trace at 32^3."""
    from dtml_deploy.bundle import Bundle
    from dtml_deploy.config import ModelConfig, NetConfig
    from dtml_deploy.nets.dual import DualTaskNet

    torch.manual_seed(0)
    cfg = ModelConfig(net=NetConfig(n_filters=4, norm=norm), patch_size=(32, 32, 32), k=50.0)
    b = Bundle.from_net(DualTaskNet(cfg.net, k=cfg.k).eval(), cfg)
    path = export_onnx(b, tmp_path / "m.onnx", precision="fp32")
    report = verify_onnx(b, path, n_random=1)
    assert report.passed, render_report(report)


def test_dynamic_batch_runs_batches_of_one_and_three(exports, bundle):
    session = _session(exports["fp32"].path)
    net = bundle.build()
    x = torch.randn(3, 1, *PATCH, generator=torch.Generator().manual_seed(5))
    ref = reference_outputs(net, x, bundle.model.k)
    for batch in (1, 3):
        out = session.run(["p_seg", "sdm"], {"image": x[:batch].numpy()})
        assert out[0].shape == (batch, 1, *PATCH) and out[0].dtype == np.float32
        np.testing.assert_allclose(out[0], ref["p_seg"][:batch], atol=1e-4, rtol=0)
        np.testing.assert_allclose(out[1], ref["sdm"][:batch], atol=1e-4, rtol=0)


def test_dynamic_spatial_option(bundle, tmp_path):
    path = export_onnx(bundle, tmp_path / "dyn.onnx", dynamic_spatial=True)
    model = onnx.load(str(path))
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[2:]] == ["depth", "height",
                                                                                          "width"]
    assert parse_onnx_metadata(read_onnx_metadata(path)).dynamic_spatial is True
    x = torch.randn(1, 1, 48, 32, 16, generator=torch.Generator().manual_seed(2))
    (sdm,) = _session(path).run(["sdm"], {"image": x.numpy()})
    np.testing.assert_allclose(sdm, reference_outputs(bundle.build(), x, bundle.model.k)["sdm"], atol=1e-4)


@pytest.mark.parametrize("outputs", [("p_seg", "p_dis"), ("sdm", "p_seg"), ("p_dis",), ("p_seg",),
                                     ("p_seg", "p_dis", "sdm")])
def test_backend_returns_the_requested_channels_in_order(exports, bundle, outputs):
    backend = create_backend("onnx", bundle, BackendOptions(device="cpu", batch=2,
                                                            artifact=exports["fp32"].path), outputs)
    assert isinstance(backend, OnnxBackend) and "onnx on cpu" in backend.describe()
    x = torch.randn(2, 1, *PATCH, generator=torch.Generator().manual_seed(3))
    y = backend.predict(x)
    assert y.shape == (2, len(outputs), *PATCH) and y.dtype == torch.float32 and y.device.type == "cpu"
    ref = reference_outputs(bundle.build(), x, bundle.model.k)
    tol = tolerance("fp32", bundle.model.k).max_abs
    for i, name in enumerate(outputs):
        np.testing.assert_allclose(y[:, i : i + 1].numpy(), ref[name], atol=tol[name], rtol=0)


def test_backend_runs_the_fp16_graph_when_asked_for_fp16(exports, bundle):
    backend = OnnxBackend(bundle, BackendOptions(device="cpu", precision="fp16", artifact=exports["fp16"].path),
                          ("p_seg",))
    y = backend.predict(torch.zeros(1, 1, *PATCH))
    assert y.shape == (1, 1, *PATCH) and y.dtype == torch.float32
    with pytest.raises(BackendUnavailable, match="--precision fp16"):
        OnnxBackend(bundle, BackendOptions(device="cpu", artifact=exports["fp16"].path), ("p_seg",))


def test_backend_rejects_wrong_window_shapes(exports, bundle):
    backend = OnnxBackend(bundle, BackendOptions(device="cpu", artifact=exports["fp32"].path), ("p_seg",))
    with pytest.raises(ValueError, match="graph takes"):
        backend.predict(torch.zeros(1, 1, 32, 32, 16))
    with pytest.raises(ValueError, match=r"\[B, 1, D, H, W\]"):
        backend.predict(torch.zeros(1, 32, 32, 32))


def test_artifact_of_another_bundle_is_refused(exports):
    other = random_bundle(4, PATCH, seed=1)
    with pytest.raises(BundleError, match=r"re-export it with `dtml export --model BUNDLE`") as err:
        OnnxBackend(other, BackendOptions(device="cpu", artifact=exports["fp32"].path), ("p_seg",))
    assert other.content_hash in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BundleError, match="dtml export"):
        verify_onnx(other, exports["fp32"].path)


def test_missing_artifact_says_how_to_make_one(bundle, tmp_path):
    with pytest.raises(BackendUnavailable, match=r"run `dtml export --model BUNDLE` first or pass --artifact"):
        OnnxBackend(bundle, BackendOptions(device="cpu"), ("p_seg",))
    with pytest.raises(BackendUnavailable, match="no such ONNX file"):
        OnnxBackend(bundle, BackendOptions(device="cpu", artifact=tmp_path / "nope.onnx"), ("p_seg",))


def test_foreign_or_damaged_onnx_is_refused(exports, bundle, tmp_path):
    model = onnx.load(str(exports["fp32"].path))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(BundleError, match="not exported by dtml"):
        OnnxBackend(bundle, BackendOptions(device="cpu", artifact=foreign), ("p_seg",))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf at all")
    with pytest.raises(BundleError, match="dtml export"):
        OnnxBackend(bundle, BackendOptions(device="cpu", artifact=broken), ("p_seg",))


def test_export_rejects_bad_arguments_and_replaces_atomically(exports, bundle, tmp_path):
    with pytest.raises(ValueError, match="precision"):
        export_onnx(bundle, tmp_path / "m.onnx", precision="bf16")
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_onnx(bundle, tmp_path / "m.bin")
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    export_onnx(bundle, target)
    assert onnx.load(str(target)).graph.input[0].name == "image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_formats_table():
    assert FORMATS["onnx"].filename("fp16") == "model-fp16.onnx"
    assert FORMATS["trt"].filename("fp32") == "model-fp32.engine"
    assert format_for_path(Path("x/model-fp32.engine")).backend == "trt"
    with pytest.raises(ValueError):
        FORMATS["onnx"].filename("int8")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_la_patch_agrees(exports, bundle, precision, la2018):
    path = sorted((la2018 / "images").glob("*.nii.gz"))[0]
    nib = pytest.importorskip("nibabel")
    image = nib.load(str(path)).get_fdata(dtype=np.float32)  # already z-scored upstream
    start = [(s - p) // 2 for s, p in zip(image.shape, PATCH, strict=True)]
    patch = image[tuple(slice(a, a + p) for a, p in zip(start, PATCH, strict=True))]
    report = verify_onnx(bundle, exports[precision].path, real_patch=patch, n_random=0)
    assert {c.source for c in report.checks} == {"real"}
    assert report.passed, render_report(report)
