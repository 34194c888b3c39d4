"""DICOM series in: find the series under a folder, check them, read one as a 3D `Volume`.

A series is the set of image files sharing a SeriesInstanceUID in one folder. Headers are read with
pydicom (dicom_geometry): files that are not images (SEG, RTSTRUCT, DICOMDIR, presentation states,
structured reports, dtml's own SEGs) are skipped with a note, and a series is read only when its slices
are one regular 3D grid (dicom_geometry.series_grid); every other series is a one-line error instead of
a guess. SimpleITK reads the pixels of the slices in the checked order, and the image gets exactly the
checked grid. A DICOM file given as input stands for its whole series.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from dtml_deploy.errors import InputError
from dtml_deploy.io.dicom_geometry import non_image_kind, read_header, require_pydicom, series_grid
from dtml_deploy.io.itk_io import itk_error, native_output, require_sitk, volume_from_image
from dtml_deploy.io.scan import Volume


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


def folder_series(folder: Path, notes: list[str] | None = None) -> dict[str, list[tuple[str, Any]]]:
    """The image series of one folder: SeriesInstanceUID -> [(file, header)], files in name order.
    Unreadable and non-image DICOM files are skipped, each with a line in `notes`."""
    require_sitk("reading DICOM", "dicom")
    require_pydicom()  # before the loop below, where a failed read only skips that file
    series: dict[str, list[tuple[str, Any]]] = {}
    for f in sorted(p for p in folder.iterdir() if is_dicom_file(p)):
        try:
            ds = read_header(f)
        except InputError as e:
            _note(notes, f"{e}; skipped")
            continue
        kind = non_image_kind(ds)
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if kind is not None:
            _note(notes, f"{f}: {kind}, not an image series; skipped")
        elif not uid:
            _note(notes, f"{f}: DICOM image without a SeriesInstanceUID; skipped")
        else:
            series.setdefault(uid, []).append((str(f), ds))
    return series


def _note(notes: list[str] | None, line: str) -> None:
    if notes is not None:
        notes.append(line)


def series_name(path: Path) -> str:
    """A readable, file-safe case name: 'S<number>_<description>', else the SeriesInstanceUID."""
    try:
        ds = read_header(path)
    except InputError:  # the case fails when read, with this error; its name is the file's
        return path.stem
    number, description = str(ds.get("SeriesNumber", "") or ""), str(ds.get("SeriesDescription", "") or "")
    parts = [f"S{number}" if number else "", description]
    name = _safe("_".join(p for p in parts if p))
    return name or _safe(str(ds.get("SeriesInstanceUID", "") or "")) or path.stem


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")


def distinct_series_names(paths: list[Path], names: list[str], taken: Collection[str] = ()) -> list[str]:
    """`names` (the readable series names of DICOM slices `paths`), made distinct where two differ only
    in their series, or where a name is `taken` by another input: the PatientID is appended when that
    tells them apart, else a short SeriesInstanceUID digest. Two paths of one series keep one name (they
    are the same case)."""
    headers = [_header_or_empty(p) for p in paths]
    uids = [str(ds.get("SeriesInstanceUID", "") or p) for p, ds in zip(paths, headers)]
    out = list(names)
    for name in set(names):
        group = [i for i, n in enumerate(names) if n == name]
        series = {uids[i] for i in group}
        if len(series) < 2 and name not in taken:
            continue
        patient = {i: _safe(str(headers[i].get("PatientID", "") or "")) for i in group}
        pairs = {(uids[i], patient[i]) for i in group}
        by_patient = all(patient.values()) and len(pairs) == len(series) == len(set(patient.values()))
        for i in group:
            out[i] = f"{name}_{patient[i] if by_patient else _uid_digest(uids[i])}"
    return out


def _header_or_empty(path: Path) -> Any:
    """The header, or an empty one for a file that cannot be read: that case fails when it is read."""
    try:
        return read_header(path)
    except InputError:
        return {}


def _uid_digest(uid: str) -> str:
    return hashlib.sha1(uid.encode()).hexdigest()[:8]


def find_series(root: Path, notes: list[str] | None = None) -> list[Path]:
    """One file per DICOM image series found in `root` and its sub-folders (the first slice of each)."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if any(is_dicom_file(Path(folder) / f) for f in files):
            found += [Path(sl[0][0]) for _, sl in sorted(folder_series(Path(folder), notes).items())]
    return found


def series_files(path: Path) -> tuple[str, list[tuple[str, Any]]]:
    """The UID and the (file, header) slices of the series that `path` (a slice, or a one-series folder) is in."""
    folder = path if path.is_dir() else path.parent
    series = folder_series(folder)
    if path.is_dir():
        if not series:
            raise InputError(f"{path}: not a file, and holds no DICOM image series")
        if len(series) > 1:
            raise InputError(f"{path}: holds {len(series)} DICOM series; pass the folder to `dtml segment` "
                             "(one case per series) or name one slice file")
        return next(iter(series.items()))
    ds = read_header(path)
    kind = non_image_kind(ds)
    if kind is not None:
        raise InputError(f"{path}: {kind}, not an image series to segment")
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if uid not in series:
        raise InputError(f"{path}: cannot find its series (SeriesInstanceUID {uid or 'missing'})")
    return uid, series[uid]


def read_series(path: Path) -> Volume:
    """Read the DICOM series of `path` (a slice file or a one-series folder) as a checked 3D volume."""
    sitk = require_sitk("reading DICOM", "dicom")
    uid, slices = series_files(path)
    grid = series_grid(str(path), slices)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(grid.files))
    # ITK warns (to stderr, with its build path) about position rounding far below what series_grid
    # accepted; native_output keeps that off the console for this read only.
    try:
        with native_output() as said:
            image = reader.Execute()
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read DICOM series ({itk_error(e, said)})") from None
    if image.GetDimension() == 3 and image.GetSize()[2] == len(grid.files):
        # the grid checked from the headers, not the one ITK derives (it does not check shear or gaps)
        image.SetOrigin(tuple(float(v) for v in grid.origin))
        image.SetSpacing(grid.spacing)
        image.SetDirection(tuple(float(v) for v in grid.direction.ravel()))
    return volume_from_image(image, path, "dicom", grid.files, uid)
