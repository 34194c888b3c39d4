"""NRRD, MetaImage and DICOM series in; NRRD, MHA and DICOM SEG out; geometry kept exactly.

One real LA sub-volume (32x32x32 around the atrium of a shipped sample case, quantised to int16 as a
scanner stores it) is written with an oblique, rotated direction and a non-zero origin as NIfTI
(nibabel), NRRD and MHA (SimpleITK) and a DICOM MR series (pydicom, one file per slice). Every format
must read to the same voxels and the same world position of every voxel, and `dtml segment` must give
the same mask on each, written on exactly the input grid.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from dtml_deploy.cli import app
from dtml_deploy.errors import InputError
from dtml_deploy.io.volume import read_volume
from tests.conftest import make_bundle

sitk = pytest.importorskip("SimpleITK", reason="the itk extra (SimpleITK) is not installed")
pydicom = pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")

CROP = (32, 32, 32)  # one window of the patch-32 test bundle per scan
SPACING = (0.625, 0.625, 0.625)  # the bundle's: no resampling, so formats are compared alone
CPU = ["--backend", "torch", "--device", "cpu", "--no-progress"]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


# ------------------------------------------------------------------------------------------- writers


def _real_voxels(sample_root: Path) -> np.ndarray:
    """A real 48x48x32 sub-volume around the atrium, as int16 (z-score x 100, as a scanner's integers)."""
    cid = sorted(p.name[:-7] for p in (sample_root / "images").glob("*.nii.gz"))[0]
    img = nib.load(str(sample_root / "images" / f"{cid}.nii.gz")).get_fdata(dtype=np.float32)
    lab = np.asarray(nib.load(str(sample_root / "labels" / f"{cid}.nii.gz")).dataobj) > 0
    centre = ndi.center_of_mass(lab)
    start = [int(np.clip(round(c - s / 2), 0, n - s)) for c, s, n in zip(centre, CROP, img.shape)]
    sub = img[tuple(slice(a, a + s) for a, s in zip(start, CROP))]
    return np.round(sub * 100).astype(np.int16)


def _oblique_lps() -> tuple[np.ndarray, np.ndarray]:
    """A proper rotation (det +1, so DICOM's slice normal keeps the index order) and a non-zero origin."""
    direction = Rotation.from_rotvec(np.deg2rad(23.0) * np.array([1.0, -2.0, 0.5]) / np.sqrt(5.25)).as_matrix()
    return direction, np.array([-81.25, 47.5, -12.3125])


def _lps_affine(direction: np.ndarray, origin: np.ndarray) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = direction * np.asarray(SPACING)
    a[:3, 3] = origin
    return a


def write_nifti(path: Path, voxels: np.ndarray, direction: np.ndarray, origin: np.ndarray) -> Path:
    img = nib.Nifti1Image(voxels, LPS_TO_RAS @ _lps_affine(direction, origin))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def write_itk(path: Path, voxels: np.ndarray, direction: np.ndarray, origin: np.ndarray) -> Path:
    image = sitk.GetImageFromArray(voxels.transpose(2, 1, 0))
    image.SetSpacing(SPACING)
    image.SetOrigin(tuple(origin))
    image.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(image, str(path), True)
    return path


def write_dicom_series(folder: Path, voxels: np.ndarray, direction: np.ndarray, origin: np.ndarray,
                       number: int = 7, description: str = "LGE 3D", frames: int = 1, patient: str = "LA1") -> Path:
    """One MR Image Storage file per slice, positions along the rotated slice normal."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    for k in range(voxels.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_STORAGE, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "MR", patient, "Test^LA"
        ds.StudyDate, ds.StudyTime = "20260101", "120000"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_ref
        ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = number, description, k + 1
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in direction[:, :2].T.ravel()]
        ds.ImagePositionPatient = [f"{v:.8f}" for v in origin + k * SPACING[2] * direction[:, 2]]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = SPACING[2]
        ds.Rows, ds.Columns = voxels.shape[1], voxels.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.PatientBirthDate, ds.PatientSex = "", ""
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = np.ascontiguousarray(np.repeat(voxels[:, :, k].T[None], frames, 0)).tobytes()
        ds.save_as(str(folder / f"S{number}_IM{k:04d}"), enforce_file_format=True)  # no suffix, as scanners write
    return folder


@pytest.fixture(scope="module")
def oblique(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same voxels and grid in the four formats; the DICOM series in its own folder."""
    voxels = _real_voxels(sample_root)
    direction, origin = _oblique_lps()
    root = tmp_path_factory.mktemp("oblique")
    return {"nifti": write_nifti(root / "scan_nii.nii.gz", voxels, direction, origin),
            "nrrd": write_itk(root / "scan_nrrd.nrrd", voxels, direction, origin),
            "mha": write_itk(root / "scan_mha.mha", voxels, direction, origin),
            "dicom": write_dicom_series(root / "dicom" / "series", voxels, direction, origin)}


def _world(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _cli(*args: str | Path):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# ------------------------------------------------------------------------------------------- reading


def test_every_format_reads_the_same_voxels_at_the_same_world_positions(oblique, sample_root):
    voxels = _real_voxels(sample_root)
    direction, origin = _oblique_lps()
    expected_ras = LPS_TO_RAS @ _lps_affine(direction, origin)
    vols = {k: read_volume(p) for k, p in oblique.items()}
    world = _world(expected_ras, CROP)
    for name, vol in vols.items():
        assert vol.shape == CROP, name
        np.testing.assert_array_equal(vol.array, voxels.astype(np.float32), err_msg=name)
        np.testing.assert_allclose(vol.spacing, SPACING, atol=1e-6, err_msg=name)
        # world position of every voxel (RAS affine @ index) agrees across formats to 1e-4 mm
        assert np.abs(_world(vol.affine, CROP) - world).max() < 1e-4, name
    # ITK formats round-trip the stored direction exactly, not just within float32 as NIfTI does
    np.testing.assert_array_equal(vols["nrrd"].affine, vols["mha"].affine)


def test_dicom_file_stands_for_its_series_and_folder_of_several_series_gives_one_case_each(
        oblique, sample_root, tmp_path):
    from dtml_deploy.io.formats import find_scans
    from dtml_deploy.segment import case_name

    voxels = _real_voxels(sample_root)[:, :, :6]
    direction, origin = _oblique_lps()
    both = tmp_path / "study"
    write_dicom_series(both, voxels, direction, origin, number=3, description="LGE axial")
    write_dicom_series(both, voxels[::-1], direction, origin + 40.0, number=4, description="LGE/axial repeat")
    cases = find_scans(both)
    assert len(cases) == 2
    assert sorted(case_name(c) for c in cases) == ["S3_LGE_axial", "S4_LGE_axial_repeat"]
    arrays = sorted((read_volume(c).array for c in cases), key=lambda a: float(a[0, 0, 0]))
    assert sorted(float(a[0, 0, 0]) for a in arrays) == sorted([float(voxels[0, 0, 0]), float(voxels[-1, 0, 0])])
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        read_volume(both)
    one = read_volume(next(oblique["dicom"].iterdir()))  # any slice of a series reads the whole series
    assert one.shape == CROP


def _expect_error(path: Path, match: str) -> None:
    with pytest.raises(InputError, match=match):
        read_volume(path)


def test_formats_without_spacing_are_refused(tmp_path):
    raw = bytes(4 * 3 * 2)
    nrrd = tmp_path / "nospacing.nrrd"
    nrrd.write_bytes(b"NRRD0004\ntype: unsigned char\ndimension: 3\nsizes: 4 3 2\nencoding: raw\n\n" + raw)
    _expect_error(nrrd, "no voxel spacing")
    mha = tmp_path / "nospacing.mha"
    mha.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementType = MET_UCHAR\n"
                    b"ElementDataFile = LOCAL\n" + raw)
    _expect_error(mha, "no ElementSpacing")
    # spacings without orientation: read, with identity direction (documented in itk_io)
    ok = tmp_path / "spacings.nrrd"
    ok.write_bytes(b"NRRD0004\ntype: unsigned char\ndimension: 3\nsizes: 4 3 2\nspacings: 0.625 0.625 1.25\n"
                   b"encoding: raw\n\n" + bytes(range(24)))
    vol = read_volume(ok)
    np.testing.assert_allclose(vol.affine, np.diag([-0.625, -0.625, 1.25, 1.0]))
    assert vol.array[1, 0, 0] == 1.0 and vol.array[0, 1, 0] == 4.0  # x is the fastest axis on disk


def test_4d_and_multiframe_and_broken_dicom_are_refused(sample_root, tmp_path):
    voxels = _real_voxels(sample_root)[:8, :8, :4]
    direction, origin = _oblique_lps()
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(voxels.transpose(2, 1, 0))] * 3)
    sitk.WriteImage(four_d, str(tmp_path / "cine.nrrd"))
    _expect_error(tmp_path / "cine.nrrd", "4D image")
    multi = write_dicom_series(tmp_path / "multi", voxels, direction, origin, frames=2)
    _expect_error(multi, "multi-frame")
    # the same positions twice in one series: a 4D/multi-phase series, never stacked as 3D
    phases = write_dicom_series(tmp_path / "phases", voxels, direction, origin)
    uid = pydicom.dcmread(next(phases.iterdir())).SeriesInstanceUID
    for i, f in enumerate(sorted(phases.iterdir())):
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID, ds.InstanceNumber = uid, 100 + i
        ds.save_as(str(phases / f"P2_{i}"))
    _expect_error(phases, "repeated positions")
    gap = write_dicom_series(tmp_path / "gap", voxels, direction, origin)
    sorted(gap.iterdir())[1].unlink()
    _expect_error(gap, "uneven slice gaps")
    nospacing = write_dicom_series(tmp_path / "nospacing", voxels, direction, origin)
    for f in nospacing.iterdir():
        ds = pydicom.dcmread(f)
        del ds.PixelSpacing
        ds.save_as(str(f))
    _expect_error(nospacing, "no PixelSpacing")
    single = write_dicom_series(tmp_path / "single", voxels[:, :, :1], direction, origin)
    _expect_error(single, "single slice")


# ----------------------------------------------------------------------------------------- segmenting


@pytest.fixture(scope="module")
def segmented(oblique, sample_root, tmp_path_factory):
    """`dtml segment` over the four inputs in one run, default output formats."""
    centre = _real_voxels(sample_root).astype(np.float32)
    centre = (centre - centre.mean()) / centre.std()
    bundle = make_bundle(centre_on=centre).save(tmp_path_factory.mktemp("bundle") / "b")
    out = tmp_path_factory.mktemp("out")
    result = _cli("segment", *oblique.values(), "-o", out, "--model", bundle, *CPU)
    return result, out, bundle


def test_masks_agree_across_formats_and_land_on_the_input_grid(segmented, oblique):
    result, out, _ = segmented
    assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["S7_LGE_3D.nii.gz", "S7_LGE_3D_seg.dcm", "scan_mha.mha", "scan_nii.nii.gz", "scan_nrrd.nrrd"]
    masks = {}
    for src, name in (("nifti", "scan_nii.nii.gz"), ("nrrd", "scan_nrrd.nrrd"), ("mha", "scan_mha.mha"),
                      ("dicom", "S7_LGE_3D.nii.gz")):
        mask, ref = read_volume(out / name), read_volume(oblique[src])
        assert mask.shape == ref.shape and set(np.unique(mask.array)) == {0.0, 1.0}
        assert np.abs(_world(mask.affine, CROP) - _world(ref.affine, CROP)).max() < 1e-4, name
        masks[src] = mask.array
    for src in ("nrrd", "mha"):  # same size, spacing, origin, direction, as stored
        img, ref = sitk.ReadImage(str(out / f"scan_{src}.{src}")), sitk.ReadImage(str(oblique[src]))
        assert img.GetPixelID() == sitk.sitkUInt8
        assert (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()) == \
            (ref.GetSize(), ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection())
    assert 0.05 < masks["nifti"].mean() < 0.95  # a mask with both classes, so agreement means something
    for src in ("nrrd", "mha", "dicom"):
        np.testing.assert_array_equal(masks[src], masks["nifti"], err_msg=src)


def test_dicom_seg_frames_geometry_and_references(segmented, oblique):
    import highdicom as hd

    from dtml_deploy import __version__
    from dtml_deploy.bundle import Bundle

    _, out, bundle = segmented
    seg = hd.seg.segread(str(out / "S7_LGE_3D_seg.dcm"))
    files = sorted(oblique["dicom"].iterdir())
    sources = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))
    mask = read_volume(out / "S7_LGE_3D.nii.gz").array.astype(np.uint8)
    assert seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == len(sources)
    desc = seg.SegmentSequence[0]
    assert desc.SegmentLabel == "left atrium cavity"
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "82471001"  # SCT left atrium
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # anatomical structure
    algo = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("dtml", __version__)
    assert Bundle.load(bundle).content_hash in algo.AlgorithmParameters
    referenced = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for r in s.ReferencedInstanceSequence}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert referenced == {d.SOPInstanceUID for d in sources}
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[d.SOPInstanceUID for d in sources],
                                               segment_numbers=[1])[..., 0]
    for k, frame in enumerate(pixels):  # in the order asked: the series' slice order
        np.testing.assert_array_equal(frame, mask[:, :, k].T, err_msg=f"slice {k}")
    by_uid = {d.SOPInstanceUID: d for d in sources}
    for k, item in enumerate(seg.PerFrameFunctionalGroupsSequence):  # each frame sits on the slice it derives from
        src = by_uid[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        pos = item.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in pos], [float(v) for v in src.ImagePositionPatient],
                                   atol=1e-6, err_msg=f"frame {k}")
    orient = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orient], [float(v) for v in sources[0].ImageOrientationPatient],
                               atol=1e-9)


def test_format_option_and_its_one_line_errors(segmented, oblique, tmp_path):
    _, _, bundle = segmented
    result = _cli("segment", oblique["nifti"], "-o", tmp_path / "a", "--model", bundle, *CPU, "--format", "nrrd")
    assert result.exit_code == 0, result.stderr
    written = read_volume(tmp_path / "a" / "scan_nii.nrrd")
    assert np.abs(_world(written.affine, CROP) - _world(read_volume(oblique["nifti"]).affine, CROP)).max() < 1e-4
    result = _cli("segment", oblique["nrrd"], "-o", tmp_path / "b", "--model", bundle, *CPU,
                  "--format", "dicom-seg")
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "dicom-seg needs a DICOM series" in errors[0]
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_a_missing_extra_is_one_line_naming_it(oblique, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import fails as if not installed
    _expect_error(oblique["nrrd"], r"reading \.nrrd needs SimpleITK: pip install 'dtml\[itk\]'")
    _expect_error(oblique["dicom"], r"reading DICOM needs SimpleITK: pip install 'dtml\[dicom\]'")
    monkeypatch.setitem(sys.modules, "SimpleITK", sitk)  # installed again: now pydicom is missing
    monkeypatch.setitem(sys.modules, "pydicom", None)
    _expect_error(oblique["dicom"], r"reading DICOM needs pydicom: pip install 'dtml\[dicom\]'")
    monkeypatch.setitem(sys.modules, "highdicom", None)
    from dtml_deploy.io.dicom_seg import _require

    with pytest.raises(InputError, match=r"DICOM SEG needs highdicom and pydicom: pip install 'dtml\[dicom\]'"):
        _require()


def test_dicom_seg_and_its_nifti_appear_together_or_not_at_all(segmented, oblique, monkeypatch, tmp_path):
    import dtml_deploy.io.dicom_seg as dicom_seg

    def full_disk(dataset, path, *checked):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(dicom_seg, "save_seg", full_disk)
    out = tmp_path / "out"
    result = _cli("segment", oblique["dicom"], "-o", out, "--model", segmented[2], *CPU)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "No space left" in errors[0]
    assert list(out.iterdir()) == []  # the NIfTI mask, written first, is not left behind either
