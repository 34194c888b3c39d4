"""Folders as archives hold more than scans: non-image DICOM and dtml's own earlier outputs are skipped
with a note, and same-named series of several patients get distinct output names.

Series are real LA sub-volumes (test_formats writers); the non-image objects are minimal but
well-formed headers of their SOP classes (RTSTRUCT, presentation state, structured report, DICOMDIR),
and dtml's outputs are those of a real earlier `dtml segment` run written into the input folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.cli import app
from tests.conftest import make_bundle
from tests.dtml_deploy.test_formats import _oblique_lps, _real_voxels, write_dicom_series

pydicom = pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
pytest.importorskip("highdicom", reason="the dicom extra (highdicom) is not installed")
pytest.importorskip("SimpleITK", reason="the dicom extra (SimpleITK) is not installed")

CPU = ["--backend", "torch", "--device", "cpu", "--no-progress"]
pytestmark = pytest.mark.slow  # real-data CLI runs of a few seconds each
NON_IMAGES = {"RTSTRUCT.dcm": ("1.2.840.10008.5.1.4.1.1.481.3", "an RTSTRUCT"),
              "PR0001": ("1.2.840.10008.5.1.4.1.1.11.1", "a presentation state"),
              "SR0001": ("1.2.840.10008.5.1.4.1.1.88.22", "a structured report"),
              "DICOMDIR": ("1.2.840.10008.1.3.10", "a DICOMDIR")}


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write_non_image(path: Path, sop_class: str, study: str) -> Path:
    """A minimal non-image DICOM object of `sop_class` (no pixel rows or columns), with the DICM preamble."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if sop_class == "1.2.840.10008.1.3.10":  # a DICOMDIR: directory records, no SOP instance of its own
        ds.FileSetID, ds.DirectoryRecordSequence = "LA", []
    else:
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study, generate_uid(), "LA1"
        ds.Modality, ds.SeriesNumber = "OT", 99
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def bundle(sample_root, tmp_path_factory) -> Path:
    centre = _real_voxels(sample_root).astype(np.float32)
    return make_bundle(centre_on=(centre - centre.mean()) / centre.std()).save(tmp_path_factory.mktemp("b") / "b")


def test_non_image_dicom_and_earlier_outputs_in_a_series_folder_are_skipped_with_a_note(
        sample_root, bundle, tmp_path):
    series = write_dicom_series(tmp_path / "series", _real_voxels(sample_root), *_oblique_lps())
    first = _cli("segment", series, "-o", series, "--model", bundle, "--save-prob", *CPU)  # outputs into the input
    assert first.exit_code == 0, first.stderr
    assert {"S7_LGE_3D.nii.gz", "S7_LGE_3D_seg.dcm", "S7_LGE_3D_prob.nii.gz"} <= {p.name for p in series.iterdir()}
    study = pydicom.dcmread(next(series.glob("S7_IM*"))).StudyInstanceUID
    for name, (sop, _) in NON_IMAGES.items():
        write_non_image(series / name, sop, study)
    before = sorted(p.name for p in series.iterdir())
    out = tmp_path / "again"
    result = _cli("segment", series, "-o", out, "--model", bundle, "--json", tmp_path / "r.json", *CPU)
    assert result.exit_code == 0, result.stderr
    cases = json.loads((tmp_path / "r.json").read_text())["cases"]
    assert [Path(c["input"]).parent for c in cases] == [series] and cases[0]["status"] == "ok"
    assert sorted(p.name for p in out.iterdir()) == ["S7_LGE_3D.nii.gz", "S7_LGE_3D_seg.dcm"]
    # the skip notes (the test bundle has no `qc` block, which is a note of its own)
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith("note:") and "qc" not in ln]
    expected = {"S7_LGE_3D_seg.dcm": "a DICOM SEG written by dtml", "S7_LGE_3D.nii.gz": "the mask dtml wrote",
                "S7_LGE_3D_prob.nii.gz": "a dtml prob map"}
    expected.update({name: kind for name, (_, kind) in NON_IMAGES.items()})
    for name, kind in expected.items():
        assert sum(name in ln and kind in ln and "skipped" in ln for ln in notes) == 1, (name, notes)
    assert len(notes) == len(expected)
    assert sorted(p.name for p in series.iterdir()) == before  # the input folder is left as it was


def test_a_mask_written_beside_a_series_without_seg_is_not_read_as_a_scan(sample_root, bundle, tmp_path):
    study = tmp_path / "study"
    write_dicom_series(study / "lge", _real_voxels(sample_root), *_oblique_lps())
    first = _cli("segment", study, "-o", study, "--model", bundle, "--format", "nii.gz", *CPU)
    assert first.exit_code == 0 and (study / "S7_LGE_3D.nii.gz").exists(), first.stderr
    result = _cli("segment", study, "-o", tmp_path / "again", "--model", bundle, "--format", "nii.gz", *CPU)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["S7_LGE_3D.nii.gz"]
    assert any("S7_LGE_3D.nii.gz" in ln and "the mask dtml wrote for the DICOM series" in ln
               for ln in result.stderr.splitlines() if ln.startswith("note:"))


def test_a_seg_given_as_input_is_refused_in_one_line(sample_root, bundle, tmp_path):
    series = write_dicom_series(tmp_path / "series", _real_voxels(sample_root)[:, :, :4], *_oblique_lps())
    rt = write_non_image(tmp_path / "series" / "RTSTRUCT.dcm", NON_IMAGES["RTSTRUCT.dcm"][0], "1.2.3")
    result = _cli("segment", rt, "-o", tmp_path / "out", "--model", bundle, *CPU)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "an RTSTRUCT, not an image series" in errors[0]
    assert series.exists()


def test_same_numbered_series_of_several_patients_get_distinct_names(sample_root, bundle, tmp_path):
    voxels, (direction, origin) = _real_voxels(sample_root), _oblique_lps()
    archive = tmp_path / "archive"
    for patient in ("P001", "P002"):  # every patient's LGE is series 7 'LGE 3D'
        write_dicom_series(archive / patient / "7", voxels, direction, origin, patient=patient)
    result = _cli("segment", archive, "-o", tmp_path / "out", "--model", bundle, *CPU)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "S7_LGE_3D_P001.nii.gz", "S7_LGE_3D_P001_seg.dcm", "S7_LGE_3D_P002.nii.gz", "S7_LGE_3D_P002_seg.dcm"]


def test_same_named_series_of_one_patient_get_a_short_uid_suffix(sample_root, tmp_path):
    from dtml_deploy.segment import case_names

    voxels, (direction, origin) = _real_voxels(sample_root)[:, :, :3], _oblique_lps()
    firsts = [next(iter(sorted(write_dicom_series(tmp_path / f"r{i}", voxels, direction, origin).iterdir())))
              for i in range(3)]  # a repeated acquisition: same patient, number and description
    other = next(iter(sorted(write_dicom_series(tmp_path / "o", voxels, direction, origin, number=8).iterdir())))
    names = case_names([*firsts, other, firsts[0]])
    uids = [pydicom.dcmread(f).SeriesInstanceUID for f in firsts]
    assert len(set(names[:3])) == 3 and all(n.startswith("S7_LGE_3D_") and len(n) == 18 for n in names[:3])
    assert names[3] == "S8_LGE_3D"  # a name no other series shares stays as it was
    assert names[4] == names[0]  # two paths of one series are one case name (refused later as a duplicate)
    assert case_names(firsts) == names[:3] and uids[0] != uids[1]  # the suffix depends on the UID alone
    scan = tmp_path / "S8_LGE_3D.nii.gz"  # a scan file named like a series: the series gives way
    scan.write_bytes(b"")
    assert case_names([other, scan]) == ["S8_LGE_3D_LA1", "S8_LGE_3D"]


def test_a_batch_keeps_its_good_series_when_others_are_not_a_grid(sample_root, bundle, tmp_path):
    from tests.dtml_deploy.test_dicom_geometry import edit_slices

    voxels, (direction, origin) = _real_voxels(sample_root), _oblique_lps()
    archive = tmp_path / "archive"
    write_dicom_series(archive / "good", voxels, direction, origin, number=1)
    def tilt(ds, k):  # each slice 0.3 mm further along the columns: a tilted stack
        ipp = np.array([float(x) for x in ds.ImagePositionPatient]) + 0.3 * k * direction[:, 1]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]

    faults = {"tilted": (2, tilt, "gantry-tilted"),
              "nanspacing": (3, lambda ds, k: setattr(ds, "PixelSpacing", ["nan", "0.625"]), "not 2 finite numbers"),
              "mixedsize": (4, lambda ds, k: setattr(ds, "Rows", 8) if k == 5 else None, "different sizes")}
    for name, (number, change, _) in faults.items():
        edit_slices(write_dicom_series(archive / name, voxels[:, :, :8], direction, origin, number=number), change)
    out = tmp_path / "out"
    result = _cli("segment", archive, "-o", out, "--model", bundle, *CPU)
    assert result.exit_code == 1, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["S1_LGE_3D.nii.gz", "S1_LGE_3D_seg.dcm"]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == len(faults)
    for name, (_, _, match) in faults.items():
        assert sum(str(archive / name) in ln and match in ln for ln in errors) == 1, (name, errors)
