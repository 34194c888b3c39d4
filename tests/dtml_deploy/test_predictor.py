"""The public Python API (dtml_deploy.Predictor): same masks as the command, one settings tree resolved
once, the command's one-line errors, nothing printed."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy import Predictor, PredictorSettings, SegmentEvents
from dtml_deploy.cli import app
from dtml_deploy.errors import DtmlError, InputError
from dtml_deploy.segment import CaseReport
from dtml_deploy.settings import ROUTES
from tests.conftest import centred_bundle_dir, crop_real_case, sample_ids

SIZE = (48, 44, 36)  # a real crop larger than the 32^3 patch: several windows, stitched


@pytest.fixture(scope="module")
def case(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A saved bundle centred on real data and a real crop of another case, as NIfTI."""
    tmp = tmp_path_factory.mktemp("predictor")
    bundle = centred_bundle_dir(sample_root, tmp)
    scan = tmp / "scan.nii.gz"
    nib.save(crop_real_case(sample_root, sample_ids(sample_root)[1], SIZE), str(scan))
    return bundle, scan


SETTINGS = {"backend": "torch", "device": "cpu", "head": "seg", "overlap": 0.25, "qc": False}


@pytest.fixture(scope="module")
def predictor(case: tuple[Path, Path]) -> Predictor:
    return Predictor.load(case[0], **SETTINGS)


@pytest.mark.slow
def test_mask_equals_the_clis_for_the_same_input_and_settings(case: tuple[Path, Path], predictor: Predictor,
                                                               tmp_path: Path) -> None:
    bundle, scan = case
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["segment", str(scan), "-o", str(out), "--model", str(bundle), "--backend", "torch",
                                   "--device", "cpu", "--head", "seg", "--overlap", "0.25", "--no-qc", "--no-progress"])
    assert res.exit_code == 0, res.output
    cli = nib.load(str(out / "scan.nii.gz"))
    r = predictor.segment(scan)
    assert 0 < r.mask.sum() < r.mask.size  # a mask with both classes, so equality means something
    np.testing.assert_array_equal(r.mask, np.asarray(cli.dataobj))
    written = r.save(tmp_path / "api")
    np.testing.assert_array_equal(nib.load(str(written[0])).affine, cli.affine)
    assert written == [tmp_path / "api" / "scan.nii.gz"]


@pytest.mark.slow
def test_an_array_with_its_affine_gives_the_files_mask(case: tuple[Path, Path], predictor: Predictor,
                                                       tmp_path: Path) -> None:
    _, scan = case
    img = nib.load(str(scan))
    from_file = predictor.segment(scan)
    from_array = predictor.segment(img.get_fdata(dtype=np.float32), affine=img.affine)
    np.testing.assert_array_equal(from_array.mask, from_file.mask)
    assert from_array.report["status"] == "ok" and from_array.report["windows"] == from_file.report["windows"]
    (mask,) = from_array.save(tmp_path / "m.nii.gz")
    assert mask == tmp_path / "m.nii.gz"
    np.testing.assert_allclose(nib.load(str(mask)).affine, img.affine)


def test_settings_are_resolved_once_and_reported(case: tuple[Path, Path]) -> None:
    bundle, _ = case
    s = Predictor.load(bundle, device="auto", backend="auto").settings
    assert (s.backend, s.runtime.precision, s.runtime.batch, s.runtime.cuda_graphs) in (
        ("torch", "fp32", 4, False), ("torch", "fp16", 8, True))
    assert s.runtime.device in ("cpu", "cuda")
    paper = Predictor.load(bundle, device="cpu", protocol="paper").settings
    assert (paper.engine.grid.stride, paper.engine.blend, paper.engine.head, paper.runtime.precision) == \
        ((18, 18, 4), "constant", "seg", "fp32")


def test_one_tree_without_a_flat_copy() -> None:
    assert [f.name for f in fields(PredictorSettings)] == ["backend", "protocol", "segment", "runtime"]
    s = PredictorSettings.build(head="sdm", overlap=0.25, device="cpu", max_windows=9, keep_prob=True)
    assert (s.engine.head, s.engine.grid.overlap, s.runtime.device, s.segment.limits.max_windows,
            s.engine.keep_prob) == ("sdm", 0.25, "cpu", 9, True)
    assert {"head", "overlap", "device", "precision", "lcc", "max_windows", "artifact"} <= set(ROUTES)


@pytest.mark.parametrize(("given", "message"), [
    ({"headd": "seg"}, "unknown setting 'headd'"),
    ({"protocol": "paper", "head": "mean"}, "--protocol paper uses --head seg"),
    ({"device": "tpu"}, "--device 'tpu' is not a device"),
    ({"backend": "onnx", "compile": True}, "--compile is an option of the torch backend"),
])
def test_bad_settings_are_the_clis_one_line_errors(case: tuple[Path, Path], given: dict, message: str) -> None:
    bundle, _ = case
    with pytest.raises((ValueError, DtmlError)) as err:
        Predictor.load(bundle, **given)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "give the array's geometry as affine= or spacing="),
    ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
    ({"affine": np.eye(3)}, "affine must be 4x4"),
])
def test_an_array_without_usable_geometry_is_refused(predictor: Predictor, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        predictor.segment(np.zeros((40, 40, 40), np.float32), **kwargs)


@pytest.mark.slow
def test_segment_files_keeps_good_cases_reports_events_and_never_prints(
        case: tuple[Path, Path], predictor: Predictor, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, scan = case
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    seen: list[tuple[str, str]] = []

    class Events(SegmentEvents):
        def case_finished(self, index: int, name: str, report: CaseReport) -> None:
            seen.append((name, report.status))

    reports = predictor.segment_files([scan, bad], tmp_path / "out", progress=Events())
    assert reports is not None and [r.status for r in reports] == ["ok", "failed"]
    assert seen == [("scan", "ok"), ("bad", "failed")]
    assert reports[1].error is not None and str(bad) in reports[1].error
    assert (tmp_path / "out" / "scan.nii.gz").is_file() and not (tmp_path / "out" / "bad.nii.gz").exists()
    assert capsys.readouterr() == ("", "")


def test_onnx_without_an_artifact_asks_the_exporter(case: tuple[Path, Path]) -> None:
    """The auto-export policy lives with the Predictor: the exporter is asked for the run's precision."""
    bundle, _ = case
    asked: list[tuple[Path, str]] = []

    def exporter(b: object, folder: Path, precision: str) -> Path:
        asked.append((folder, precision))
        raise DtmlError("exporter reached")

    with pytest.raises(DtmlError, match="exporter reached"):
        Predictor.load(bundle, backend="onnx", device="cpu", exporter=exporter)
    assert asked == [(bundle, "fp32")]


def test_the_declared_exporter_is_the_clis_cache_without_printing() -> None:
    """pyproject declares the exporter an installed dtml's Predictor finds (entry point dtml.exporters)."""
    import importlib
    import inspect

    import tomllib

    from dtml_deploy.predictor import EXPORTER_ENTRY_POINT

    group, name = EXPORTER_ENTRY_POINT
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    target = tomllib.loads(text)["project"]["entry-points"][group][name]
    module, attr = target.split(":")
    fn = getattr(importlib.import_module(module), attr)
    assert list(inspect.signature(fn).parameters) == ["bundle", "bundle_dir", "precision"]


@pytest.mark.slow
def test_with_settings_shares_the_backend_and_gives_the_masks_of_a_fresh_load(case: tuple[Path, Path],
                                                                              predictor: Predictor) -> None:
    """What a server gives each job: other segmentation settings on the loaded backend, same masks as a
    Predictor loaded with them; backend settings and outputs the backend lacks are refused."""
    bundle, scan = case
    base = Predictor.load(bundle, device="cpu", qc=False, head="seg")
    job = base.with_settings(overlap=0.25)
    assert job.segmenter.backend is base.segmenter.backend
    np.testing.assert_array_equal(job.segment(scan).mask, predictor.segment(scan).mask)
    with pytest.raises(ValueError, match="precision is fixed when the model is loaded"):
        base.with_settings(precision="bf16")
    with pytest.raises(ValueError, match="need the network outputs"):
        base.with_settings(head="mean")
    paper = Predictor.load(bundle, device="cpu", protocol="paper")
    with pytest.raises(ValueError, match="--protocol paper uses --head seg"):
        paper.with_settings(head="sdm")
