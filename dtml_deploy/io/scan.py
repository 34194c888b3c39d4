"""A 3D scan in memory: the `Volume` every reader returns, the file names readers take, and the checks
every reader applies to the array it read (kept apart from the readers so that the NIfTI/h5 reader in
volume.py and the SimpleITK and DICOM readers need not import each other)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
H5_SUFFIXES = (".h5",)
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUFFIXES = NIFTI_SUFFIXES + H5_SUFFIXES + ITK_SUFFIXES


def has_volume_suffix(path: Path) -> bool:
    """True for a file name this module can read."""
    return str(path).lower().endswith(SUFFIXES)


@dataclass
class Volume:
    """A 3D scan as float32 (X, Y, Z) plus the geometry needed to write results back on its grid."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    path: Path
    header: Any = None  # nibabel header of a NIfTI source, itk_io.ItkGeometry of an ITK/DICOM one, None for h5
    source_shape: tuple[int, ...] = field(default=())  # shape on disk (e.g. X, Y, Z, 1)
    guessed: tuple[str, ...] = ()  # geometry the file does not hold and that was assumed (h5: H5_GUESSES)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


def check_array(data: np.ndarray, path: Path | str, what: str = "image") -> np.ndarray:
    """`data` as a 3D array (a trailing axis of one dropped), or an InputError naming `path`."""
    if data.size == 0:
        raise InputError(f"{path}: {what} has no voxels (shape {tuple(data.shape)})")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D {what}, got shape {tuple(data.shape)}")
    if min(data.shape) < 1:
        raise InputError(f"{path}: {what} has an empty axis, shape {tuple(data.shape)}")
    return data
