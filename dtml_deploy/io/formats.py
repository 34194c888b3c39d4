"""Which format a case's results are written in, what the case is called, and which inputs a folder holds.

By default results go out in the input's family: NIfTI (and h5) -> `.nii.gz`, NRRD -> `.nrrd`,
MetaImage -> `.mha` (detached `.nhdr`/`.mhd` headers come back as single files, which can be written
atomically), DICOM -> a DICOM SEG referencing the source series plus a `.nii.gz` mask. `--format`
picks one explicitly; `dicom-seg` needs a DICOM input. Probability and distance maps follow the
mask's format, as NIfTI beside a DICOM SEG (SEG holds binary segments only).
"""

from __future__ import annotations

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


def input_family(vol: Volume) -> str:
    """nifti (also h5) | nrrd | mha | dicom."""
    return vol.header.family if isinstance(vol.header, ItkGeometry) else "nifti"


def resolve_format(vol: Volume, fmt: str) -> str:
    """The concrete output format for `vol` ('auto': the input's family)."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    family = input_family(vol)
    if fmt == "auto":
        return _FAMILY_FORMAT[family]
    if fmt == "dicom-seg" and family != "dicom":
        raise InputError(f"{vol.path}: --format dicom-seg needs a DICOM series as input (this is {family})")
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


def find_scans(folder: Path) -> list[Path]:
    """The scans of a folder: its volume files (a challenge case folder's label excepted), UA-MT
    `<ID>/mri_norm2.h5`, challenge `<ID>/lgemri.nrrd`, and one entry per DICOM series found below it (its
    first slice)."""
    from dtml_deploy.io.dicom_series import find_series, is_dicom_file

    label = folder / CHALLENGE_LABEL if (folder / CHALLENGE_IMAGE).is_file() else None  # a case folder's label
    files = sorted(f for f in folder.iterdir() if f.is_file() and has_volume_suffix(f) and f != label)
    files += sorted(folder.glob("*/mri_norm2.h5"))
    files += sorted(folder.glob(f"*/{CHALLENGE_IMAGE}"))
    has_dicom = any(is_dicom_file(f) for f in folder.rglob("*") if not has_volume_suffix(f))
    return files + (find_series(folder) if has_dicom else [])
