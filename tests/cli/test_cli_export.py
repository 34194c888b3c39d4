"""`dtml export` end to end, and `dtml segment --backend onnx` against the torch backend on a real case."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.bundle import Bundle
from dtml_deploy.cli import app
from dtml_deploy.metrics import dice
from tests.conftest import make_bundle

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def bundle_dir(tmp_path, sample_root):
    """Heads centred on a real patch, so masks are partly foreground and their agreement means something."""
    img = nib.load(str(_case(sample_root)[0])).get_fdata(dtype=np.float32)
    lo = [(n - 32) // 2 for n in img.shape]
    centre = img[lo[0]:lo[0] + 32, lo[1]:lo[1] + 32, lo[2]:lo[2] + 32]
    return make_bundle(n_filters=4, patch=(32, 32, 32), k=50.0, centre_on=centre).save(tmp_path / "bundle")


def _case(sample_root):
    cid = json.loads((sample_root / "splits.json").read_text())["train"][0]
    return sample_root / "images" / f"{cid}.nii.gz", cid


def test_export_writes_verified_fp32_and_fp16(bundle_dir, sample_root, tmp_path):
    scan, _ = _case(sample_root)
    out = tmp_path / "exp"
    r = _run("export", "--model", bundle_dir, "-o", out, "--precision", "fp32", "--precision", "fp16",
             "--real-case", scan)
    assert r.exit_code == 0, r.output
    assert (out / "model-fp32.onnx").stat().st_size > 0 and (out / "model-fp16.onnx").stat().st_size > 0
    assert "real" in r.output and "p_dis" in r.output  # the verification table, per source and output
    assert sorted(p.name for p in out.iterdir()) == ["model-fp16.onnx", "model-fp32.onnx"]  # no temp files


def test_failed_verification_fails_and_leaves_nothing(bundle_dir, tmp_path, monkeypatch):
    import dtml_export.verify as verify

    strict = verify.Tolerance(max_abs={k: 0.0 for k in ("p_seg", "sdm", "p_dis", "prob")}, min_dice=1.01)
    monkeypatch.setattr(verify, "tolerance", lambda precision, k: strict)
    out = tmp_path / "exp"
    r = _run("export", "--model", bundle_dir, "-o", out)
    assert r.exit_code == 2
    assert "failed verification" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() or list(out.iterdir()) == []


def test_trt_export_without_tensorrt_is_a_clear_error(bundle_dir, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    r = _run("export", "--model", bundle_dir, "-o", tmp_path / "e", "--trt")
    assert r.exit_code == 2 and "tensorrt" in r.stderr.lower() and "Traceback" not in r.output


def test_a_bad_trt_profile_fails_before_any_export(bundle_dir, tmp_path):
    r = _run("export", "--model", bundle_dir, "-o", tmp_path / "e", "--trt", "--min-batch", "4", "--max-batch", "2")
    assert r.exit_code == 2 and "min_batch <= opt_batch <= max_batch" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "e").exists()


def test_segment_with_onnx_matches_torch_on_a_real_case(bundle_dir, sample_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    scan, cid = _case(sample_root)
    common = ["--model", bundle_dir, "--device", "cpu", "--no-progress", "--save-prob", "--overlap", "0.25"]
    r1 = _run("segment", scan, "-o", tmp_path / "torch", "--backend", "torch", *common)
    loads: list[object] = []
    real_load = Bundle.load.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Bundle, "load", classmethod(lambda cls, path, *a, **k: loads.append(path)
                                                    or real_load(cls, path, *a, **k)))
    r2 = _run("segment", scan, "-o", tmp_path / "onnx", "--backend", "onnx", *common)  # exports into the cache
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert len(loads) == 1  # one read of the bundle serves the export lookup and the segmenter
    from dtml_deploy import __version__

    cached = tmp_path / "cache" / "dtml" / Bundle.load(bundle_dir).content_hash / f"dtml-{__version__}"
    assert (cached / "model-fp32.onnx").is_file()  # keyed by bundle and exporter version
    m1 = np.asarray(nib.load(str(tmp_path / "torch" / f"{cid}.nii.gz")).dataobj)
    m2 = np.asarray(nib.load(str(tmp_path / "onnx" / f"{cid}.nii.gz")).dataobj)
    p1 = nib.load(str(tmp_path / "torch" / f"{cid}_prob.nii.gz")).get_fdata()
    p2 = nib.load(str(tmp_path / "onnx" / f"{cid}_prob.nii.gz")).get_fdata()
    assert np.abs(p1 - p2).max() < 1e-3  # fp32 both; BN folded in both; only op order differs
    assert 0.02 < m1.mean() < 0.98 and dice(m1, m2) > 0.99


def test_real_verification_patch_is_taken_at_the_models_spacing(bundle_dir, sample_root, tmp_path):
    """A scan at 1.25 mm is resampled to the model's 0.625 mm before its centre is cut, as `dtml segment`
    would feed it: a 20x20x12 crop becomes 40x40x24, filling the 32^3 patch in x and y."""
    from dtml_deploy.bundle import Bundle
    from dtml_export.pipeline import central_patch

    src = nib.load(str(_case(sample_root)[0]))
    data = np.asarray(src.get_fdata(dtype=np.float32))[30:50, 30:50, 20:32]
    coarse = tmp_path / "coarse.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.25, 1.25, 1.25, 1.0])), str(coarse))
    patch = central_patch(coarse, Bundle.load(bundle_dir))
    assert patch.shape == (32, 32, 32)
    filled = np.argwhere(patch != 0)
    extent = filled.max(0) - filled.min(0) + 1
    assert tuple(extent) == (32, 32, 24)  # without resampling: 20 x 20 x 12
