"""DICOM Segmentation (SEG) out, through highdicom: a BINARY segment 'left atrium cavity' on the
source series' own slices, referencing them, with the algorithm (dtml, its version, the bundle hash).

Frames map one to one onto the source slices in the series' sorted order (empty frames are kept), so
frame k carries mask[:, :, k] transposed to (rows, columns) and the source slice's position. The SEG's
geometry comes from the checked grid of the source positions (dicom_geometry.series_grid), never from
the sources' SliceThickness or SpacingBetweenSlices (often empty, zero or contradicting the positions):
PixelSpacing as read, SpacingBetweenSlices and SliceThickness both the step between positions (the
mask's voxels touch, as on the grid the mask was computed on), each frame at its source slice's
ImagePositionPatient. A SEG is saved only after
reading it back (highdicom) reproduces the mask voxel for voxel on that grid (`save_seg`).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.errors import InputError
from dtml_deploy.io.dicom_geometry import DTML_MANUFACTURER, TOLERANCE, SeriesGrid, series_grid
from dtml_deploy.io.itk_io import ItkGeometry
from dtml_deploy.io.volume import Volume
from dtml_deploy.version import __version__

SEGMENT_LABEL = "left atrium cavity"
SERIES_DESCRIPTION = "dtml left atrium"
CONTENT_LABEL = "LA_SEG"  # not '<source Modality>_SEG', which a missing or odd Modality would break


def _require() -> tuple[Any, Any]:
    try:
        import highdicom as hd
        import pydicom
    except ImportError:
        raise InputError("writing DICOM SEG needs highdicom and pydicom: pip install 'dtml[dicom]'") from None
    return hd, pydicom


# Type 1 in a SEG and taken from its sources: without them no SEG can be written (checked before inference).
SOURCE_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
# Type 2 patient/study attributes highdicom copies from the sources: absent or invalid ones go in empty.
_TYPE2 = {"PatientID": None, "PatientName": None, "PatientBirthDate": "DA", "PatientSex": "CS",
          "StudyDate": "DA", "StudyTime": "TM", "StudyID": None, "AccessionNumber": None,
          "ReferringPhysicianName": None}
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # DICOM UI: digits and dots, no leading zeros
IS_MAX = 2**31 - 1  # the largest Integer String (SeriesNumber)


def check_seg_sources(ref: Volume, sources: list[Any] | None = None) -> None:
    """Refuse a series a SEG cannot reference (a Type 1 attribute the SEG takes from it is missing), before
    any work; `sources` are its datasets when already read."""
    if not (isinstance(ref.header, ItkGeometry) and ref.header.family == "dicom"):
        raise InputError(f"{ref.path}: --format dicom-seg needs a DICOM series as input")
    if sources is None:
        from dtml_deploy.io.dicom_geometry import read_header

        sources = [read_header(Path(f)) for f in ref.header.files]
    for ds, f in zip(sources, ref.header.files):
        with warnings.catch_warnings():  # pydicom warns on invalid UIDs as it reads them; refused below
            warnings.simplefilter("ignore")
            uids = {kw: str(ds.get(kw, "") or "") for kw in SOURCE_REQUIRED}
        missing = [kw for kw, uid in uids.items() if not uid]
        invalid = [kw for kw, uid in uids.items() if uid and not (len(uid) <= 64 and _UID.fullmatch(uid))]
        if missing or invalid:
            fault = f"has no {', '.join(missing)}" if missing else f"has an invalid {', '.join(invalid)}"
            raise InputError(f"{ref.path}: cannot write a DICOM SEG: {Path(f).name} {fault} "
                             "(--format nii.gz writes the mask alone)")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) > 1:
        raise InputError(f"{ref.path}: cannot write a DICOM SEG: the slices belong to {len(studies)} studies "
                         "(--format nii.gz writes the mask alone)")


def _fill_type2(sources: list[Any]) -> None:
    """Absent or invalid Type 2 patient/study values of the in-memory sources become empty (unknown), so
    the SEG that copies them stays valid; present, valid values are copied as they are."""
    for ds in sources:
        for keyword, vr in _TYPE2.items():
            value = ds.get(keyword)
            if value is None or not _valid(vr, str(value)):
                setattr(ds, keyword, "")


def _valid(vr: str | None, value: str) -> bool:
    from pydicom.valuerep import DA, TM

    if vr is None or value == "":
        return True
    if vr == "CS":  # PatientSex
        return value in ("M", "F", "O")
    try:
        return (DA if vr == "DA" else TM)(value) is not None
    except (ValueError, TypeError):
        return False


def _seg_series_number(source: Any) -> int:
    """The source's SeriesNumber + 1000, or 1000 when the source has none usable or the sum is not an IS."""
    try:
        number = int(source.get("SeriesNumber") or 0) + 1000
    except (TypeError, ValueError):
        return 1000
    return number if -IS_MAX <= number <= IS_MAX else 1000


def _set_slice_geometry(sources: list[Any], grid: SeriesGrid) -> None:
    """Give the in-memory source headers the slice step of their positions as SliceThickness and
    SpacingBetweenSlices: highdicom copies both into the SEG, and reads SliceThickness unconditionally."""
    from pydicom.valuerep import DS

    step = DS(grid.spacing[2], auto_format=True)
    for ds in sources:
        ds.SliceThickness = step
        ds.SpacingBetweenSlices = step


def build_seg(ref: Volume, mask: np.ndarray, bundle_hash: str) -> Any:
    """The SEG dataset for `mask` (X, Y, Z) on `ref`, a volume read from a DICOM series."""
    if tuple(mask.shape) != ref.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the reference grid {ref.shape}")
    hd, pydicom = _require()
    from pydicom.sr.codedict import codes

    with warnings.catch_warnings():  # pydicom's warnings on odd source values; what a SEG needs is checked
        warnings.simplefilter("ignore")
        sources = [pydicom.dcmread(f) for f in ref.header.files]
    check_seg_sources(ref, sources)
    _fill_type2(sources)
    grid = series_grid(str(ref.path), list(zip(ref.header.files, sources)))
    if grid.files != tuple(ref.header.files):
        raise InputError(f"{ref.path}: the series changed on disk while it was segmented")
    _set_slice_geometry(sources, grid)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="dtml", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters={"bundle_hash": bundle_hash})
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.LeftAtrium,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
    try:
        with warnings.catch_warnings():  # highdicom's advice on copied values (e.g. a PatientName 'ANON')
            warnings.simplefilter("ignore")
            return hd.seg.Segmentation(
                source_images=sources, pixel_array=np.ascontiguousarray(mask.transpose(2, 1, 0) > 0),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
                series_instance_uid=hd.UID(), series_number=_seg_series_number(sources[0]),
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer=DTML_MANUFACTURER,
                manufacturer_model_name="dtml", software_versions=__version__, device_serial_number="none",
                series_description=SERIES_DESCRIPTION, content_label=CONTENT_LABEL, omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError) as e:  # highdicom's checks on the source series
        raise InputError(f"{ref.path}: cannot build DICOM SEG from this series ({str(e)[:160]})") from None


def save_seg(dataset: Any, path: Path, ref: Volume, mask: np.ndarray) -> None:
    """Write `dataset` to `path`, then read it back (`check_seg`); a SEG that does not reproduce `mask`
    on `ref`'s grid is an error (the caller removes the file)."""
    dataset.save_as(str(path), enforce_file_format=True)
    check_seg(path, ref, mask)


def check_seg(path: Path, ref: Volume, mask: np.ndarray) -> None:
    """Read the SEG at `path` as a volume with highdicom and check that it is `mask` (X, Y, Z), voxel for
    voxel, at the same world positions as `ref`'s grid (within `GridTolerance.position` of a voxel)."""
    hd, _ = _require()
    try:
        volume = hd.seg.segread(str(path)).get_volume(segment_numbers=[1])
    except Exception as e:  # any failure to read it back means the SEG is not what was meant
        raise InputError(f"{path}: the DICOM SEG written does not read back as a volume ({type(e).__name__}: "
                         f"{str(e)[:120]})") from None
    geo = ref.header
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(geo.direction, dtype=np.float64).reshape(3, 3) * np.asarray(geo.spacing)
    lps[:3, 3] = geo.origin
    to_ours = np.linalg.solve(lps, volume.affine)  # highdicom's (slice, row, column) -> our (i, j, k)
    axes, offset = np.round(to_ours[:3, :3]), np.round(to_ours[:3, 3])
    signed_permutation = (np.abs(axes).sum(0) == 1).all() and (np.abs(axes).sum(1) == 1).all()
    if not signed_permutation or np.abs(to_ours[:3] - np.c_[axes, offset]).max() > TOLERANCE.position:
        raise InputError(f"{path}: the DICOM SEG written reads back on another grid than its source series")
    array = np.asarray(volume.array).reshape(volume.array.shape[:3])
    source_axis = [int(np.flatnonzero(axes[a])[0]) for a in range(3)]
    array = array.transpose(source_axis)
    for a in range(3):
        if axes[a, source_axis[a]] < 0:
            array = np.flip(array, a)
    start = [int(o) if axes[a, source_axis[a]] > 0 else int(o) - n + 1
             for a, (o, n) in enumerate(zip(offset, array.shape))]
    if start != [0, 0, 0] or array.shape != mask.shape:
        raise InputError(f"{path}: the DICOM SEG written reads back as {array.shape} voxels at {start} instead of "
                         f"the mask's {mask.shape}")
    wrong = int(np.count_nonzero((array > 0) != (mask > 0)))
    if wrong:
        raise InputError(f"{path}: the DICOM SEG written reads back with {wrong} voxels differing from the mask")
