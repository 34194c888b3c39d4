"""Checks on what a scan says about itself: voxel sizes, affine and data type.

A voxel size of 0, NaN or -1 mm, or an affine that is singular or not finite, cannot place a mask in
the world (nibabel quietly turns a zero voxel size into 1 mm); such files are refused with the file
named, unless the user gives the spacing explicitly (`--spacing`). Files that carry no geometry at all
(UA-MT h5) get a documented guess, which the caller announces once per run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.errors import InputError

# What an h5 file's missing geometry is replaced by, in the words of the warning.
H5_GUESSES = ("spacing", "orientation", "axis order")
# The smallest singular value of the affine's 3x3 part, relative to the largest: below it the axes are
# (numerically) dependent and voxel positions cannot be told apart.
SINGULAR_RTOL = 1e-6


@dataclass(frozen=True)
class GridTolerance:
    """How far two grids (a prediction's and its label's, a label's and its image's) may differ and still
    be taken as one, voxel by voxel."""

    translation_mm: float = 1e-3  # origin (affine column 4)
    rtol: float = 1e-4  # voxel axes (affine 3x3 part), relative to its largest entry


def check_spacing(spacing: Sequence[float], path: Path | str, source: str = "header") -> tuple[float, float, float]:
    """Three finite, positive voxel sizes, or an `InputError` naming the file and the bad values."""
    values = [float(s) for s in spacing]
    if len(values) != 3:
        raise InputError(f"{path}: expected 3 voxel sizes, got {len(values)}")
    bad = [v for v in values if not (np.isfinite(v) and v > 0)]
    if bad:
        hint = " (pass --spacing X Y Z to give them explicitly)" if source == "header" else ""
        raise InputError(f"{path}: voxel sizes {tuple(values)} in the {source} must be finite and positive{hint}")
    return values[0], values[1], values[2]


@contextlib.contextmanager
def quiet_nibabel() -> Iterator[None]:
    """Silence nibabel's header-fix log lines ("setting 0 dims to 1"): what they fix is checked here and
    refused with one `error:` line instead."""
    logger = logging.getLogger("nibabel.global")
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


def raw_pixdim(path: Path | str, header: Any) -> list[float]:
    """The voxel sizes as stored: nibabel's loaded header has already replaced 0 by 1 and -x by x."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as f:
        raw = type(header).from_fileobj(f, check=False)
    return [float(z) for z in raw["pixdim"][1:4]]


def check_affine(affine: np.ndarray, path: Path | str, allow_singular: bool = False) -> None:
    """A finite 4x4 affine whose 3x3 part is invertible (singular allowed when the spacing is explicit)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise InputError(f"{path}: the affine (voxel-to-world matrix) is not finite")
    if allow_singular:
        return
    sv = np.linalg.svd(a[:3, :3], compute_uv=False)
    if not sv[0] > 0 or sv[-1] < SINGULAR_RTOL * sv[0]:
        raise InputError(f"{path}: the affine (voxel-to-world matrix) is singular: its axes do not span 3D "
                         f"(singular values {', '.join(f'{v:.3g}' for v in sv)}; pass --spacing X Y Z to "
                         f"use the file anyway)")


def check_dtype(dtype: np.dtype, path: Path | str) -> None:
    """Refuse data types that have no single real value per voxel (complex, RGB/structured, objects, text)."""
    kind = np.dtype(dtype).kind
    if kind == "c":
        raise InputError(f"{path}: complex-valued data ({np.dtype(dtype)}); save the magnitude (or the real "
                         f"part) as a real-valued image")
    if kind not in "biuf":
        raise InputError(f"{path}: unsupported data type {np.dtype(dtype)} (expected one real number per voxel)")


def guessed_geometry_note(name: str, guessed: Sequence[str], spacing: Sequence[float]) -> str:
    """The one warning line (per run) for inputs whose geometry had to be assumed."""
    parts = []
    if "spacing" in guessed:
        parts.append(f"spacing {tuple(round(float(s), 4) for s in spacing)} mm (--spacing X Y Z sets it)")
    if "orientation" in guessed:
        parts.append("identity orientation")
    if "axis order" in guessed:
        parts.append("axis order x,y,z")
    return (f"warning: {name} (like every h5 input of this run) carries no geometry; assumed "
            f"{', '.join(parts)}")
