"""DICOM SEGs written from odd but valid sources are valid, read back to the mask, and a SEG that would
not read back fails its case and leaves nothing.

Sources: a real LA sub-volume as an oblique MR series whose SliceThickness is missing, empty or zero, or
whose SpacingBetweenSlices contradicts the positions. Each SEG is checked with dicom3tools' `dciodvfy`
(no "Error" lines) and read back with dcmqi's `segimage2itkimage`, voxel for voxel at the same world
positions as the mask dtml wrote beside it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.cli import app
from dtml_deploy.io.volume import read_volume
from tests.conftest import make_bundle
from tests.dtml_deploy.test_dicom_geometry import edit_slices
from tests.dtml_deploy.test_formats import _oblique_lps, _real_voxels, write_dicom_series

pydicom = pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
hd = pytest.importorskip("highdicom", reason="the dicom extra (highdicom) is not installed")
pytest.importorskip("SimpleITK", reason="the dicom extra (SimpleITK) is not installed")

CPU = ["--backend", "torch", "--device", "cpu", "--no-progress"]
pytestmark = pytest.mark.slow  # real-data CLI runs of a few seconds each
SOURCES = {  # series number -> what is odd about the source's slice tags
    11: ("no SliceThickness", lambda ds, k: delattr(ds, "SliceThickness")),
    12: ("empty SliceThickness", lambda ds, k: setattr(ds, "SliceThickness", None)),
    13: ("zero SliceThickness", lambda ds, k: setattr(ds, "SliceThickness", 0)),
    14: ("SpacingBetweenSlices 2.5 against positions 0.625 apart",
         lambda ds, k: setattr(ds, "SpacingBetweenSlices", 2.5)),
    2**31 - 1: ("anonymised: no PatientID, Modality or StudyDate, PatientName 'ANON', PatientSex 'Male', "
                "an impossible StudyTime, the largest SeriesNumber", lambda ds, k: _anonymised(ds)),
}


def _anonymised(ds) -> None:
    for keyword in ("PatientID", "Modality", "StudyDate"):
        delattr(ds, keyword)
    ds.PatientName, ds.PatientSex, ds.StudyTime = "ANON", "Male", "250000"


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def odd_sources(sample_root, tmp_path_factory):
    """One folder with the four odd series (32^3 real voxels each), segmented in one run."""
    voxels = _real_voxels(sample_root)
    direction, origin = _oblique_lps()
    root = tmp_path_factory.mktemp("odd")
    for number, (_, change) in SOURCES.items():
        edit_slices(write_dicom_series(root / "study" / f"s{number}", voxels, direction, origin, number=number,
                                       description="LGE"), change)
    centre = voxels.astype(np.float32)
    bundle = make_bundle(centre_on=(centre - centre.mean()) / centre.std()).save(root / "bundle")
    out = root / "out"
    with warnings.catch_warnings(record=True) as caught:  # what Python would print on the console
        warnings.simplefilter("always")
        result = _cli("segment", root / "study", "-o", out, "--model", bundle, *CPU)
    result.caught = [f"{w.category.__name__}: {w.message}" for w in caught]
    return root, out, bundle, result


def test_no_library_warnings_reach_the_console(odd_sources):
    result = odd_sources[3]
    assert result.exit_code == 0, result.stderr
    assert result.caught == []


def test_odd_sources_give_segs_on_the_positions_grid(odd_sources):
    _, out, _, result = odd_sources
    assert result.exit_code == 0, result.stderr
    for number in SOURCES:
        seg = hd.seg.segread(str(out / f"S{number}_LGE_seg.dcm"))
        measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert float(measures.SliceThickness) == pytest.approx(0.625, abs=1e-6), SOURCES[number][0]
        assert float(measures.SpacingBetweenSlices) == pytest.approx(0.625, abs=1e-6), SOURCES[number][0]
        mask = read_volume(out / f"S{number}_LGE.nii.gz").array
        assert 0 < mask.mean() < 1  # both classes: agreement below means something
        volume = seg.get_volume(segment_numbers=[1])  # highdicom stacks the frames by their positions
        assert volume.array[..., 0].sum() == mask.sum()


@pytest.mark.skipif(_tool("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_finds_no_errors_in_segs_from_odd_sources(odd_sources):
    _, out, _, result = odd_sources
    assert result.exit_code == 0, result.stderr
    for number, (what, _) in SOURCES.items():
        run = subprocess.run([_tool("dciodvfy"), str(out / f"S{number}_LGE_seg.dcm")], capture_output=True,
                             text=True, timeout=60)
        errors = [ln for ln in (run.stdout + run.stderr).splitlines() if "Error" in ln]
        assert errors == [], f"{what}: {errors}"


@pytest.mark.skipif(_tool("segimage2itkimage") is None, reason="dcmqi's segimage2itkimage is not installed")
def test_dcmqi_reads_each_seg_back_to_the_mask_voxels_and_positions(odd_sources, tmp_path):
    _, out, _, result = odd_sources
    assert result.exit_code == 0, result.stderr
    for number, (what, _) in SOURCES.items():
        back = tmp_path / str(number)
        back.mkdir()
        subprocess.run([_tool("segimage2itkimage"), "--inputDICOM", str(out / f"S{number}_LGE_seg.dcm"),
                        "--outputDirectory", str(back), "--outputType", "nifti"], check=True, capture_output=True,
                       timeout=120)
        ours, theirs = nib.load(str(out / f"S{number}_LGE.nii.gz")), nib.load(str(back / "1.nii.gz"))
        assert theirs.shape == ours.shape, what
        np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-3, err_msg=what)
        np.testing.assert_array_equal(np.asarray(theirs.dataobj) > 0, np.asarray(ours.dataobj) > 0, err_msg=what)


def test_a_seg_that_does_not_read_back_to_the_mask_fails_the_case_and_leaves_nothing(
        odd_sources, monkeypatch, tmp_path):
    import dtml_deploy.io.dicom_seg as dicom_seg

    root, _, bundle, _ = odd_sources
    build = dicom_seg.build_seg

    def one_voxel_off(ref, mask, bundle_hash):  # a writer bug: the SEG gets another mask than the NIfTI
        wrong = mask.copy()
        wrong[3, 4, 5] = 1 - wrong[3, 4, 5]
        return build(ref, wrong, bundle_hash)

    monkeypatch.setattr(dicom_seg, "build_seg", one_voxel_off)
    out = tmp_path / "out"
    result = _cli("segment", root / "study" / "s11", "-o", out, "--model", bundle, *CPU)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.stderr
    assert "reads back with 1 voxels differing from the mask" in errors[0]
    assert not out.exists() or list(out.iterdir()) == []


def test_check_seg_refuses_a_seg_on_another_grid(odd_sources, tmp_path):
    from dtml_deploy.errors import InputError
    from dtml_deploy.io.dicom_seg import check_seg

    root, out, _, _ = odd_sources
    ref = read_volume(root / "study" / "s11")
    mask = read_volume(out / "S11_LGE.nii.gz").array
    ds = pydicom.dcmread(out / "S11_LGE_seg.dcm")
    for item in ds.PerFrameFunctionalGroupsSequence:  # every frame 2 mm further along x: another grid
        pos = item.PlanePositionSequence[0]
        pos.ImagePositionPatient = [float(pos.ImagePositionPatient[0]) + 2.0, *pos.ImagePositionPatient[1:]]
    moved = tmp_path / "moved.dcm"
    ds.save_as(moved)
    with pytest.raises(InputError, match="reads back on another grid"):
        check_seg(moved, ref, mask)
    check_seg(out / "S11_LGE_seg.dcm", ref, mask)  # the SEG as written passes


@pytest.mark.parametrize("fault, change, match", [
    ("no FrameOfReferenceUID", lambda ds, k: delattr(ds, "FrameOfReferenceUID"), "has no FrameOfReferenceUID"),
    ("a StudyInstanceUID with letters", lambda ds, k: setattr(ds, "StudyInstanceUID", "1.2.abc"),
     "has an invalid StudyInstanceUID"),
    ("slices of two studies", lambda ds, k: setattr(ds, "StudyInstanceUID", f"1.2.3.{k % 2}"), "belong to 2 studies"),
])
def test_a_series_no_seg_can_reference_is_refused_before_inference(fault, change, match, odd_sources, sample_root,
                                                                    monkeypatch, tmp_path):
    from dtml_deploy.segment import Segmenter

    bundle = odd_sources[2]
    series = edit_slices(write_dicom_series(tmp_path / "s", _real_voxels(sample_root)[:, :, :4], *_oblique_lps()),
                         change)

    def no_inference(*args, **kwargs):
        raise AssertionError(f"{fault}: inference ran before the refusal")

    monkeypatch.setattr(Segmenter, "segment_array", no_inference)
    out = tmp_path / "out"
    result = _cli("segment", series, "-o", out, "--model", bundle, *CPU)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, (fault, result.stderr)
    assert str(series) in errors[0] and "cannot write a DICOM SEG: " in errors[0] and match in errors[0], errors
    assert not out.exists() or list(out.iterdir()) == []
