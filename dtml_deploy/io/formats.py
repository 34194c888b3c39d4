"""Which format a case's results are written in, what the case is called, and which inputs a folder holds.

By default results go out in the input's family: NIfTI (and h5) -> `.nii.gz`, NRRD -> `.nrrd`,
MetaImage -> `.mha` (detached `.nhdr`/`.mhd` headers come back as single files, which can be written
atomically), DICOM -> a DICOM SEG referencing the source series plus a `.nii.gz` mask. `--format`
picks one explicitly; `dicom-seg` needs a DICOM input. Probability and distance maps follow the
mask's format, as NIfTI beside a DICOM SEG (SEG holds binary segments only).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from dtml_deploy.errors import InputError
from dtml_deploy.io.challenge import IMAGE as CHALLENGE_IMAGE
from dtml_deploy.io.challenge import LABEL as CHALLENGE_LABEL
from dtml_deploy.io.itk_io import ItkGeometry
from dtml_deploy.io.volume import Volume, has_volume_suffix

OUTPUT_FORMATS: tuple[str, ...] = ("auto", "nii.gz", "nrrd", "mha", "dicom-seg")
_FAMILY_FORMAT = {"nifti": "nii.gz", "nrrd": "nrrd", "mha": "mha", "dicom": "dicom-seg"}
# Single-file suffixes a mask can be written as, and the format each means (`-o FILE`).
FILE_FORMATS: dict[str, str] = {".nii.gz": "nii.gz", ".nii": "nii.gz", ".nrrd": "nrrd", ".mha": "mha"}
MAP_SUFFIXES = ("_prob", "_sdm", "_uncertainty")  # the maps `dtml segment` writes beside a mask


def input_family(vol: Volume) -> str:
    """nifti (also h5) | nrrd | mha | dicom."""
    return vol.header.family if isinstance(vol.header, ItkGeometry) else "nifti"


def resolve_format(vol: Volume, fmt: str) -> str:
    """The concrete output format for `vol` ('auto': the input's family)."""
    return format_for_family(input_family(vol), fmt, vol.path)


def format_for_family(family: str, fmt: str, path: Path) -> str:
    """`resolve_format` for an input of `family` at `path` (known from its name before it is read)."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    if fmt == "auto":
        return _FAMILY_FORMAT[family]
    if fmt == "dicom-seg" and family != "dicom":
        raise InputError(f"{path}: --format dicom-seg needs a DICOM series as input (this is {family})")
    return fmt


def map_suffix(fmt: str) -> str:
    """File suffix of the mask and maps for a resolved format (a DICOM SEG's NIfTI companion: .nii.gz)."""
    return {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom-seg": ".nii.gz"}[fmt]


def strip_suffix(name: str) -> str:
    """'scan.nii.gz' -> 'scan', 'scan.nrrd' -> 'scan' (any suffix this package reads or writes)."""
    for suffix in (".nii.gz", ".nii", ".h5", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_scans(folder: Path, notes: list[str] | None = None) -> list[Path]:
    """The scans of a folder: its volume files (a challenge case folder's label excepted), UA-MT
    `<ID>/mri_norm2.h5`, challenge `<ID>/lgemri.nrrd`, and one entry per DICOM series found below it (its
    first slice). dtml's own outputs found there are skipped (`dtml_output`), as are non-image DICOM
    files; each skip is a line in `notes`."""
    from dtml_deploy.io.dicom_series import distinct_series_names, find_series, is_dicom_file, series_name

    label = folder / CHALLENGE_LABEL if (folder / CHALLENGE_IMAGE).is_file() else None  # a case folder's label
    files = sorted(f for f in folder.iterdir() if f.is_file() and has_volume_suffix(f) and f != label)
    files += sorted(folder.glob("*/mri_norm2.h5"))
    files += sorted(folder.glob(f"*/{CHALLENGE_IMAGE}"))
    has_dicom = any(is_dicom_file(f) for f in folder.rglob("*") if not has_volume_suffix(f))
    series = find_series(folder, notes) if has_dicom else []
    series_names = set(distinct_series_names(series, [series_name(f) for f in series]))
    scans = []
    for f in files:
        why = dtml_output(f, series_names)
        if why is None:
            scans.append(f)
        elif notes is not None:
            notes.append(f"{f}: {why}, not a scan; skipped (name the file itself to segment it)")
    return scans + series


def dtml_output(path: Path, series_names: Collection[str] = ()) -> str | None:
    """Why a volume file found in a folder is an output of an earlier dtml run, or None. The rule: a
    `<case>_prob|_sdm|_uncertainty` map; the mask of a DICOM series found in the same folder tree (it is
    named after the series); or a mask beside the `<case>_seg.dcm` dtml wrote with it."""
    from dtml_deploy.io.dicom_geometry import non_image_kind, read_header

    stem = strip_suffix(path.name)
    for suffix in MAP_SUFFIXES:
        if stem.endswith(suffix):
            return f"a dtml {suffix[1:]} map"
    if stem in series_names:
        return "the mask dtml wrote for the DICOM series of the same name"
    seg = path.with_name(f"{stem}_seg.dcm")
    if seg.is_file():
        try:
            if (non_image_kind(read_header(seg)) or "").endswith("written by dtml"):
                return f"the mask dtml wrote with {seg.name}"
        except InputError:
            return None
    return None
