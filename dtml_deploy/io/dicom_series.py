"""DICOM series in: find the series under a folder, check them, read one as a 3D `Volume`.

A series is the set of files sharing a SeriesInstanceUID in one folder; SimpleITK (GDCM) sorts its
slices along the slice normal. A DICOM file given as input stands for its whole series. Only series
that are one regular 3D volume are read; each of these is a one-line error instead of a guess:
a single slice, multi-frame (enhanced) files, slices without ImagePositionPatient,
ImageOrientationPatient or PixelSpacing, differing orientations, repeated positions (a 4D, multi-echo
or multi-phase series) and uneven slice gaps.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from dtml_deploy.errors import InputError
from dtml_deploy.io.itk_io import itk_error, native_output, require_sitk, volume_from_image
from dtml_deploy.io.scan import Volume

_TAGS = {"uid": "0020|000e", "ipp": "0020|0032", "iop": "0020|0037", "spacing": "0028|0030",
         "frames": "0028|0008", "number": "0020|0011", "description": "0008|103e"}
GAP_TOLERANCE = 1e-3  # relative spread of slice gaps accepted as one spacing (DS rounding is far smaller)


def is_dicom_file(path: Path) -> bool:
    """A `.dcm` file, or any file with the DICOM preamble marker ('DICM' at byte 128)."""
    if not path.is_file():
        return False
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _tags(path: Path) -> dict[str, str]:
    sitk = require_sitk("reading DICOM", "dicom")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")
    try:
        with native_output():  # GDCM's warnings stay off the console
            reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{path}: cannot read DICOM header") from None
    keys = set(reader.GetMetaDataKeys())
    return {k: reader.GetMetaData(t).strip() for k, t in _TAGS.items() if t in keys}


def _floats(value: str | None) -> np.ndarray | None:
    try:
        return np.array([float(v) for v in value.split("\\")]) if value else None
    except ValueError:
        return None


def series_name(path: Path) -> str:
    """A readable, file-safe case name: 'S<number>_<description>', else the SeriesInstanceUID."""
    tags = _tags(path)
    parts = [f"S{tags['number']}" if tags.get("number") else "", tags.get("description", "")]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(p for p in parts if p)).strip("._")
    return name or tags.get("uid") or path.stem


def find_series(root: Path) -> list[Path]:
    """One file per DICOM series found in `root` and its sub-folders (the first slice of each)."""
    sitk = None
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if not any(is_dicom_file(Path(folder) / f) for f in sorted(files)):
            continue
        sitk = sitk or require_sitk("reading DICOM", "dicom")
        for uid in sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)):
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)
            if names:
                found.append(Path(names[0]))
    return found


def series_files(path: Path) -> tuple[str, list[str]]:
    """The UID and sorted slice files of the series that `path` (a file, or a one-series folder) is in."""
    sitk = require_sitk("reading DICOM", "dicom")
    folder = path if path.is_dir() else path.parent
    uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if path.is_dir():
        if not uids:
            raise InputError(f"{path}: not a file, and holds no DICOM series")
        if len(uids) > 1:
            raise InputError(f"{path}: holds {len(uids)} DICOM series; pass the folder to `dtml segment` "
                             "(one case per series) or name one slice file")
        uid = uids[0]
    else:
        uid = _tags(path).get("uid", "")
        if uid not in uids:
            raise InputError(f"{path}: cannot find its series (SeriesInstanceUID {uid or 'missing'})")
    return uid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))


def _check_slices(path: Path, files: list[str]) -> None:
    """Refuse series that are not one regular 3D volume (see the module docstring)."""
    if len(files) < 2:
        raise InputError(f"{path}: the series has a single slice; a 3D scan needs at least two")
    tags = [_tags(Path(f)) for f in files]
    if any(int(t.get("frames") or 1) > 1 for t in tags):
        raise InputError(f"{path}: multi-frame (enhanced) DICOM is not supported; export one file per slice")
    for key, what in (("ipp", "ImagePositionPatient"), ("iop", "ImageOrientationPatient"),
                      ("spacing", "PixelSpacing")):
        if any(_floats(t.get(key)) is None for t in tags):
            raise InputError(f"{path}: a slice of the series has no {what}; dtml does not guess geometry")
    iops = np.array([_floats(t["iop"]) for t in tags])
    if np.abs(iops - iops[0]).max() > 1e-4:
        raise InputError(f"{path}: slices of the series have different orientations")
    normal = np.cross(iops[0][:3], iops[0][3:])
    depth = np.sort(np.array([_floats(t["ipp"]) for t in tags]) @ normal)
    gaps = np.diff(depth)
    if gaps.min() < 1e-3:
        raise InputError(f"{path}: {len(files)} slices but repeated positions (a 4D, multi-echo or multi-phase "
                         "series?); split it into one 3D series per volume")
    if gaps.max() - gaps.min() > GAP_TOLERANCE * gaps.mean():
        raise InputError(f"{path}: uneven slice gaps ({gaps.min():.4g} to {gaps.max():.4g} mm); resample it to "
                         "a regular grid first")


def read_series(path: Path) -> Volume:
    """Read the DICOM series of `path` (a slice file or a one-series folder) as a checked 3D volume."""
    sitk = require_sitk("reading DICOM", "dicom")
    uid, files = series_files(path)
    _check_slices(path, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with native_output() as said:
            image = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read DICOM series ({itk_error(e, said)})") from None
    return volume_from_image(image, path, "dicom", tuple(files), uid)
