"""OpenVINO IR export, the openvino backend and the int8 check, on a tiny bundle centred on a real crop."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dtml_deploy.artifacts import ONNX_OUTPUTS
from dtml_deploy.backends.base import BackendOptions, create_backend
from dtml_deploy.backends.openvino_backend import OpenVinoBackend, load_ir
from dtml_deploy.bundle import Bundle
from dtml_deploy.engine.grid import GridSpec, pad_volume, window_starts
from dtml_deploy.errors import BackendUnavailable, BundleError
from dtml_deploy.intensity import prepare
from dtml_deploy.io.volume import read_volume
from dtml_export.verify import tolerance
from tests.conftest import SAMPLE, centred_bundle_dir, crop_real_case, make_bundle, sample_ids

pytest.importorskip("openvino", reason="the openvino extra is not installed")
pytest.importorskip("onnx", reason="the onnx extra is not installed")

from dtml_export.onnx_export import export_onnx
from dtml_export.openvino_export import (
    Int8Disagrees,
    check_int8,
    convert_onnx,
    quantize_int8,
    save_ir,
    scan_windows,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Bundle, Path, Path]:
    """(bundle, its folder, its fp32 IR); heads centred on a real crop, so masks are partly foreground."""
    folder = tmp_path_factory.mktemp("ov")
    bundle_dir = centred_bundle_dir(SAMPLE, folder)
    bundle = Bundle.load(bundle_dir)
    onnx_path = export_onnx(bundle, folder / "model-fp32.onnx")
    xml = save_ir(convert_onnx(onnx_path), bundle, folder / "model-fp32.xml", "fp32", 17)
    return bundle, bundle_dir, xml


def _crops(n: int, size: int = 32) -> torch.Tensor:
    """Real z-scored LA sub-volumes (one per sample case, repeated), [n, 1, size^3]."""
    ids = sample_ids(SAMPLE)
    arrays = [crop_real_case(SAMPLE, ids[i % len(ids)], (size,) * 3).get_fdata(dtype=np.float32) for i in range(n)]
    return torch.from_numpy(np.stack(arrays))[:, None]


def _backend(bundle: Bundle, xml: Path, outputs=("p_seg", "p_dis", "sdm"), batch: int = 2) -> OpenVinoBackend:
    return OpenVinoBackend(bundle, BackendOptions(device="cpu", batch=batch, artifact=xml), outputs)


def test_ir_carries_dtml_metadata_and_leaves_no_temporaries(tiny):
    bundle, _, xml = tiny
    _, info = load_ir(xml)
    assert info.bundle_hash == bundle.content_hash and info.precision == "fp32"
    assert info.outputs == ONNX_OUTPUTS and info.k == bundle.model.k and info.patch_size == bundle.model.patch_size
    assert sorted(p.name for p in xml.parent.glob("model-*")) == ["model-fp32.bin", "model-fp32.onnx",
                                                                 "model-fp32.xml"]


def test_backend_matches_torch_within_the_fp32_tolerances(tiny):
    bundle, _, xml = tiny
    x = _crops(2)
    torch_out = create_backend("torch", bundle, BackendOptions(device="cpu", batch=2), ("p_seg", "p_dis", "sdm"))
    ref = torch_out.predict(x)
    tol = tolerance("fp32", bundle.model.k)
    for batch in (2, 1):  # the engine's batch, and a short last one (compiled for its own size)
        got = _backend(bundle, xml).predict(x[:batch])
        assert got.shape == (batch, 3, 32, 32, 32)
        for c, name in enumerate(("p_seg", "p_dis", "sdm")):
            assert (got[:, c] - ref[:batch, c]).abs().max().item() <= tol.max_abs[name], name
    assert 0.05 < (ref[:, 0] > 0.5).float().mean().item() < 0.95  # the check is not on a constant mask


def test_backend_returns_only_the_requested_channels(tiny):
    bundle, _, xml = tiny
    x = _crops(2)
    full = _backend(bundle, xml).predict(x)
    sdm_only = _backend(bundle, xml, outputs=("sdm",)).predict(x)
    assert sdm_only.shape[1] == 1 and torch.allclose(sdm_only[:, 0], full[:, 2], atol=1e-6)


def test_ir_from_other_weights_is_refused(tiny):
    _, _, xml = tiny
    other = make_bundle(patch=(32, 32, 32), seed=1)
    with pytest.raises(BundleError, match="exported from bundle"):
        _backend(other, xml)


def test_ir_without_dtml_metadata_is_refused(tiny, tmp_path):
    import openvino as ov

    bundle, _, xml = tiny
    foreign = tmp_path / "model-fp32.xml"
    ov.save_model(convert_onnx(xml.with_suffix(".onnx")), str(foreign), compress_to_fp16=False)
    with pytest.raises(BundleError, match="not exported by dtml"):
        _backend(bundle, foreign)


def test_missing_extra_is_one_line_naming_it(tiny, monkeypatch):
    bundle, _, xml = tiny
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else
                        real_find_spec(name, *a))
    with pytest.raises(BackendUnavailable, match=r"pip install 'dtml\[openvino\]'"):
        _backend(bundle, xml)
    from dtml_export.pipeline import ExportRequest

    with pytest.raises(BackendUnavailable, match=r"openvino; pip install 'dtml\[openvino\]'"):
        ExportRequest(bundle=Path("b"), out_dir=Path("o"), openvino=True)


def test_calibration_windows_span_the_scan_and_are_prepared_as_inference_does(tiny):
    bundle, _, _ = tiny
    scan = SAMPLE / "images" / f"{sample_ids(SAMPLE)[0]}.nii.gz"
    windows = scan_windows(scan, bundle, 4)
    vol = read_volume(scan)
    x, _ = prepare(vol.array, bundle.model.intensity, "auto", str(scan))
    x, _ = pad_volume(x, bundle.model.patch_size)
    starts = window_starts(x.shape, bundle.model.patch_size, GridSpec())
    assert len(starts) > 4 and len(windows) == 4
    expected = [starts[0], starts[-1]]  # the first and last windows of the grid, not only the centre
    for s in expected:
        crop = x[s[0]:s[0] + 32, s[1]:s[1] + 32, s[2]:s[2] + 32]
        assert any(np.array_equal(w[0, 0], crop) for w in windows)
    assert len({w.tobytes() for w in windows}) == 4


def _crop_scans(folder: Path) -> list[Path]:
    """The sample cases cropped to 40^3 around the atrium (8 windows of 32^3 each), as NIfTI files."""
    import nibabel as nib

    out = []
    for cid in sample_ids(SAMPLE):
        nib.save(crop_real_case(SAMPLE, cid, (40, 40, 40)), str(folder / f"{cid}.nii.gz"))
        out.append(folder / f"{cid}.nii.gz")
    return out


def _fake_quantized(op) -> bool:
    """An operation whose data input or weights pass through a FakeQuantize (NNCF's int8 marker)."""
    def through(node, depth: int = 3) -> bool:
        if node.get_type_name() == "FakeQuantize":
            return True
        return depth > 0 and node.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape") and any(
            through(node.input_value(i).get_node(), depth - 1) for i in range(node.get_input_size()))
    return any(through(op.input_value(i).get_node()) for i in range(op.get_input_size()))


def test_int8_keeps_the_image_and_output_convolutions_in_fp32(tiny, tmp_path):
    bundle, _, xml = tiny
    from dtml_export.openvino_export import edge_convolutions

    fp32 = convert_onnx(xml.with_suffix(".onnx"))
    edges = edge_convolutions(fp32)
    convs = {op.get_friendly_name(): op for op in fp32.get_ordered_ops() if op.get_type_name() == "Convolution"}
    # Each network's first convolution (reads the image) and its 1-channel output convolution.
    assert len(edges) == 4 and all(name in convs for name in edges)
    weights = [convs[n].get_input_shape(1) for n in edges]  # [out, in, k, k, k]
    assert sorted(w[1] for w in weights)[:2] == [1, 1]  # the image has one channel
    assert sorted(w[0] for w in weights)[:2] == [1, 1]  # each network's output has one
    real = [w for s in _crop_scans(tmp_path) for w in scan_windows(s, bundle, 2)]
    q = quantize_int8(fp32, real)
    ops = {op.get_friendly_name(): op for op in q.get_ordered_ops() if op.get_type_name() == "Convolution"}
    assert not any(_fake_quantized(ops[n]) for n in edges)
    inner = [n for n in ops if n not in edges]
    assert inner and all(_fake_quantized(ops[n]) for n in inner)


@pytest.mark.slow
def test_int8_check_refuses_a_model_whose_masks_disagree_and_names_the_case(tiny, tmp_path):
    bundle, _, xml = tiny
    scans = _crop_scans(tmp_path)
    real = [w for s in scans for w in scan_windows(s, bundle, 2)]
    good = save_ir(quantize_int8(convert_onnx(xml.with_suffix(".onnx")), real), bundle,
                   tmp_path / "model-int8.xml", "int8", 17)
    results = check_int8(bundle, xml, good, scans, 0.9, echo=lambda _: None)
    assert [r.case for r in results] == sample_ids(SAMPLE) and min(r.dice for r in results) >= 0.9
    _, info = load_ir(good)
    assert info.precision == "int8" and info.bundle_hash == bundle.content_hash
    # Calibrated on windows 1000x brighter than any scan: the quantisation steps swallow the real signal.
    bad = save_ir(quantize_int8(convert_onnx(xml.with_suffix(".onnx")), [w * 1000 for w in real]), bundle,
                  tmp_path / "bad-int8.xml", "int8", 17)
    lines: list[str] = []
    with pytest.raises(Int8Disagrees) as refused:
        check_int8(bundle, xml, bad, scans, 0.9, echo=lines.append)
    per_case = {ln.split(" on ")[1].split(":")[0]: float(ln.split("mask Dice ")[1].split()[0]) for ln in lines}
    worst = min(per_case, key=per_case.__getitem__)
    assert len(per_case) == 3 and per_case[worst] < 0.9
    assert f"on {worst}: Dice {per_case[worst]:.4f} < 0.9" in str(refused.value)


def test_export_request_refuses_int8_without_calibration_and_calibration_without_int8():
    from dtml_export.pipeline import ExportRequest

    with pytest.raises(ValueError, match="--int8 needs real scans"):
        ExportRequest(bundle=Path("b"), out_dir=Path("o"), int8=True)
    with pytest.raises(ValueError, match="--calibration is used by --int8 only"):
        ExportRequest(bundle=Path("b"), out_dir=Path("o"), calibration=(Path("x.nii.gz"),))


@pytest.mark.slow
def test_shipped_model_int8_agrees_with_fp32_on_the_real_sample(tmp_path):
    """The shipped pair quantised on the 3 real sample cases (one window each) and checked on them."""
    from dtml_export.pipeline import ExportRequest, run_export

    lines: list[str] = []
    model = Path(__file__).resolve().parents[2] / "dtml_deploy" / "default_model"
    scans = tuple(SAMPLE / "images" / f"{c}.nii.gz" for c in sample_ids(SAMPLE))
    run_export(ExportRequest(bundle=model, out_dir=tmp_path, int8=True, calibration=scans, verify=False,
                             measure=False), lines.append)  # timing is tested on a tiny bundle (tests/cli)
    dice = [float(ln.split("mask Dice ")[1].split()[0]) for ln in lines if "int8 vs fp32 on" in ln]
    # Full bias correction with fp32 edge convolutions (quantize_int8) keeps these at >= 0.998; NNCF's defaults
    # gave 0.990-0.998 on the 16 labeled scans, which the stated 0.98 gate would not have caught.
    assert len(dice) == 3 and min(dice) >= 0.995, lines
    assert not (tmp_path / "speed.json").exists()
    assert (tmp_path / "model-int8.xml").is_file() and (tmp_path / "model-int8.bin").stat().st_size > 0
    _, info = load_ir(tmp_path / "model-int8.xml")
    assert info.precision == "int8" and json.dumps(list(info.outputs))
