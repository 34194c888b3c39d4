"""DICOM headers (pydicom, pixel data never read): which files are images, and whether a series is a grid.

A series is read only when its slices form one regular 3D grid, checked from the tags themselves:
every slice has finite ImagePositionPatient (3 values), ImageOrientationPatient (6 values, two
orthonormal direction cosines) and PixelSpacing (2 positive values); all slices share orientation,
pixel spacing and size; and the positions lie on one line along the slice normal (row x column) at one
step. Within `GridTolerance`, a series is that grid; outside it, it is refused with one line saying
what is wrong (sheared or gantry-tilted stacks, uneven or repeated positions, mixed slices): nothing
is guessed and nothing is resampled.

Files that are not images (a DICOM SEG, including dtml's own, an RTSTRUCT, a DICOMDIR, a presentation
state, a structured report, ...) are recognised by their SOP class, or by having no Rows/Columns.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.errors import InputError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# SOP classes (exact, or a family by prefix) that carry no scan to segment, with what to call them.
_NON_IMAGE = {SEG_SOP_CLASS: "a DICOM SEG", "1.2.840.10008.5.1.4.1.1.481.3": "an RTSTRUCT",
              "1.2.840.10008.1.3.10": "a DICOMDIR", "1.2.840.10008.5.1.4.1.1.481.2": "an RT dose",
              "1.2.840.10008.5.1.4.1.1.481.5": "an RT plan", "1.2.840.10008.5.1.4.1.1.7": "a secondary capture"}
_NON_IMAGE_FAMILIES = {"1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
                       "1.2.840.10008.5.1.4.1.1.88.": "a structured report",
                       "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document",
                       "1.2.840.10008.5.1.4.1.1.66.": "a raw-data, registration or fiducials object",
                       "1.2.840.10008.5.1.4.1.1.481.": "an RT object"}
DTML_MANUFACTURER = "dtml"  # dtml's SEGs say so (dicom_seg.build_seg)


@dataclass(frozen=True)
class GridTolerance:
    """How far header values may stray from one regular grid (DS strings round positions to ~1e-3 mm)."""

    orthonormal: float = 1e-4  # |row|, |column| within 1 +- this; |row . column| below it
    orientation: float = 1e-4  # largest difference of a direction cosine between slices
    pixel_spacing: float = 1e-6  # largest relative difference of PixelSpacing between slices
    position: float = 1e-2  # largest distance of a slice from its grid place, as a fraction of a voxel
    repeated_mm: float = 1e-3  # two slices closer than this along the normal share a position


TOLERANCE = GridTolerance()


@dataclass(frozen=True)
class SeriesGrid:
    """A checked series: slice files in index (k) order and the grid they define (LPS, mm)."""

    files: tuple[str, ...]
    origin: np.ndarray  # position of the first slice's first pixel
    direction: np.ndarray  # 3x3, columns: row direction (i), column direction (j), slice normal (k)
    spacing: tuple[float, float, float]  # i (column spacing), j (row spacing), k (slice step)
    positions: np.ndarray  # (n, 3) each slice's ImagePositionPatient, in k order


def require_pydicom() -> Any:
    """pydicom, or a one-line error naming the extra that installs it."""
    try:
        import pydicom
    except ImportError:
        raise InputError("reading DICOM needs pydicom: pip install 'dtml[dicom]'") from None
    return pydicom


def read_header(path: Path) -> Any:
    """The DICOM header of `path` (pydicom, stops before pixel data)."""
    pydicom = require_pydicom()

    try:
        with warnings.catch_warnings():  # invalid values are refused where they are used, by name
            warnings.simplefilter("ignore")
            return pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as e:  # pydicom raises many types on corrupt files; each is the same refusal
        raise InputError(f"{path}: cannot read DICOM header ({type(e).__name__})") from None


def non_image_kind(ds: Any) -> str | None:
    """What a non-image DICOM file is ('a DICOM SEG written by dtml', 'a DICOMDIR', ...); None for an image."""
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    kind = _NON_IMAGE.get(sop) or next((k for p, k in _NON_IMAGE_FAMILIES.items() if sop.startswith(p)), None)
    if kind is None and "DirectoryRecordSequence" in ds:
        kind = "a DICOMDIR"
    if kind is None and not ("Rows" in ds and "Columns" in ds):
        kind = "a DICOM object without pixel rows and columns"
    if kind is not None and str(ds.get("Manufacturer", "")) == DTML_MANUFACTURER:
        kind += " written by dtml"
    return kind


def _values(ds: Any, keyword: str, count: int, file: str) -> np.ndarray:
    """`count` finite floats from a DS tag, or a one-line error naming the file and the raw value."""
    if keyword not in ds or ds[keyword].is_empty:
        raise InputError(f"a slice of the series ({Path(file).name}) has no {keyword}; dtml does not guess "
                         "geometry")
    with warnings.catch_warnings():  # pydicom warns on values like 'nan'; the refusal below names them
        warnings.simplefilter("ignore")
        raw = ds[keyword].value
    try:
        values = np.array([float(v) for v in (raw if _is_multi(raw) else [raw])], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        values = np.array([])
    if values.size != count or not np.isfinite(values).all():
        raise InputError(f"{Path(file).name} has {keyword} {_show(raw)}: not {count} finite numbers")
    return values


def _is_multi(raw: Any) -> bool:
    return hasattr(raw, "__iter__") and not isinstance(raw, (str, bytes))


def _show(raw: Any) -> str:
    text = "\\".join(str(v) for v in raw) if _is_multi(raw) else str(raw)
    return f"'{text[:60]}'"


def _same_slices(headers: list[tuple[str, Any]], tol: GridTolerance) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice orientation, pixel spacing and positions, checked to be finite, valid and shared."""
    frames = {str(ds.get("FrameOfReferenceUID", "") or "") for _, ds in headers}
    if len(frames) > 1:  # positions in different frames of reference cannot be compared
        raise InputError(f"slices in {len(frames)} different frames of reference (FrameOfReferenceUID) in one series")
    if any(int(ds.get("NumberOfFrames") or 1) > 1 for _, ds in headers):
        raise InputError("multi-frame (enhanced) DICOM is not supported; export one file per slice")
    iops = np.array([_values(ds, "ImageOrientationPatient", 6, f) for f, ds in headers])
    spacings = np.array([_values(ds, "PixelSpacing", 2, f) for f, ds in headers])
    ipps = np.array([_values(ds, "ImagePositionPatient", 3, f) for f, ds in headers])
    bad = np.flatnonzero((spacings <= 0).any(axis=1))
    if bad.size:
        raise InputError(f"{Path(headers[bad[0]][0]).name} has PixelSpacing {_show(spacings[bad[0]])}: "
                         "pixel spacing must be positive")
    sizes = {(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) for _, ds in headers}
    if len(sizes) > 1:
        raise InputError(f"slices of different sizes in one series ({', '.join(f'{r}x{c}' for r, c in sorted(sizes))}"
                         " rows x columns)")
    if np.abs(spacings / spacings[0] - 1).max() > tol.pixel_spacing:
        raise InputError(f"slices with different PixelSpacing in one series ({spacings.min(0)} to "
                         f"{spacings.max(0)} mm)")
    if np.abs(iops - iops[0]).max() > tol.orientation:
        raise InputError("slices of the series have different orientations")
    row, col = iops[0][:3], iops[0][3:]
    if (abs(np.linalg.norm(row) - 1) > tol.orthonormal or abs(np.linalg.norm(col) - 1) > tol.orthonormal
            or abs(row @ col) > tol.orthonormal):
        raise InputError(f"ImageOrientationPatient {_show(iops[0])} is not two orthonormal directions "
                         f"(lengths {np.linalg.norm(row):.6g}, {np.linalg.norm(col):.6g}; dot {row @ col:.3g})")
    return iops[0], spacings[0], ipps


def series_grid(label: str, headers: list[tuple[str, Any]], tol: GridTolerance = TOLERANCE) -> SeriesGrid:
    """Check that the slices `headers` ((file, dataset) pairs of one series) are one regular 3D grid."""
    if len(headers) < 2:
        raise InputError(f"{label}: the series has a single slice; a 3D scan needs at least two")
    try:
        iop, pixel, ipps = _same_slices(headers, tol)
    except InputError as e:
        raise InputError(f"{label}: {e}") from None
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    depth = (ipps - ipps[0]) @ normal
    order = np.argsort(depth, kind="stable")
    depth, ipps = depth[order] - depth[order][0], ipps[order]
    gaps = np.diff(depth)
    if gaps.min() < tol.repeated_mm:
        raise InputError(f"{label}: {len(headers)} slices but repeated positions (a 4D, multi-echo or "
                         "multi-phase series?); split it into one 3D series per volume")
    offsets = ipps - ipps[0] - np.outer(depth, normal)  # in-plane drift of each slice from the first
    drift = np.linalg.norm(offsets, axis=1)
    if drift.max() > tol.position * pixel.min():
        k = int(drift.argmax())
        raise InputError(f"{label}: slice positions are not along the slice normal (a sheared or gantry-tilted "
                         f"stack: {drift[k]:.3g} mm sideways over {depth[k]:.3g} mm, "
                         f"{np.degrees(np.arctan2(drift[k], depth[k])):.2f} degrees); resample it to a regular "
                         "grid first")
    step = depth[-1] / (len(depth) - 1)
    if np.abs(depth - step * np.arange(len(depth))).max() > tol.position * step:
        ratio = gaps.max() / gaps.min()
        missing = (f"; {round(ratio) - 1} slice(s) missing after slice {int(gaps.argmax()) + 1}?"
                   if round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.05 else "")
        raise InputError(f"{label}: uneven slice gaps ({gaps.min():.4g} to {gaps.max():.4g} mm{missing}); resample "
                         "it to a regular grid first")
    return SeriesGrid(files=tuple(headers[i][0] for i in order), origin=ipps[0],
                      direction=np.stack([row, col, normal], axis=1),
                      spacing=(float(pixel[1]), float(pixel[0]), float(step)), positions=ipps)
