"""NRRD (.nrrd/.nhdr) and MetaImage (.mha/.mhd) through SimpleITK, with exact geometry.

ITK places index (i, j, k) at `origin + D @ diag(spacing) @ (i, j, k)` in LPS physical space; NIfTI
affines (and `Volume.affine`) are RAS. The two differ by a sign flip of the first two rows, so the
RAS affine is `diag(-1, -1, 1, 1) @ [[D @ diag(spacing), origin], [0, 0, 0, 1]]`, oblique directions
included. Arrays stay in ITK index order (X, Y, Z): `GetArrayFromImage` returns (Z, Y, X), so reads and
writes transpose. The geometry read from a file is kept as given (`ItkGeometry`) and written back
unchanged, so a mask lands on exactly the input grid.

Spacing is never guessed: a NRRD without `space directions` or `spacings`, or a MetaImage without
`ElementSpacing`/`ElementSize`, is an error (ITK would silently use 1 mm); headers are parsed field by
field and checked before ITK reads any data (headers.py). A NRRD that gives spacings
but no `space directions` has no orientation; it is read with identity direction and zero origin, as
ITK and 3D Slicer read it (the challenge data's own convention).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.errors import InputError
from dtml_deploy.io.geometry import check_dtype
from dtml_deploy.io.header_reader import read_header
from dtml_deploy.io.headers import check_header
from dtml_deploy.io.scan import Volume, check_array
from dtml_deploy.limits import WorkLimits

NRRD_SUFFIXES = (".nrrd", ".nhdr")
META_SUFFIXES = (".mha", ".mhd")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class ItkGeometry:
    """The grid of an ITK-read scan as stored: LPS origin, direction (row-major 3x3), spacing."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    family: str  # nrrd | mha | dicom
    files: tuple[str, ...] = ()  # the DICOM slices in index (k) order
    series_uid: str = ""


def require_sitk(what: str, extra: str = "itk") -> Any:
    """SimpleITK, or a one-line error naming the extra that installs it."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise InputError(f"{what} needs SimpleITK: pip install 'dtml[{extra}]'") from None
    return sitk


def ras_affine(geo: ItkGeometry) -> np.ndarray:
    """The RAS (NIfTI-convention) affine of an LPS ITK grid."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(geo.direction, dtype=np.float64).reshape(3, 3) * np.asarray(geo.spacing)
    lps[:3, 3] = geo.origin
    return LPS_TO_RAS @ lps


def geometry_from_affine(affine: np.ndarray, family: str) -> ItkGeometry:
    """The ITK grid of a RAS affine (for writing a NIfTI- or h5-read scan's results as NRRD/MHA)."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return ItkGeometry(tuple(float(s) for s in spacing), tuple(float(o) for o in lps[:3, 3]),
                       tuple(float(d) for d in direction.ravel()), family)


@contextlib.contextmanager
def native_output() -> Iterator[list[str]]:
    """Keep what ITK's C++ code prints (warnings with build paths, MetaIO's "Cannot open data file") off
    the console for the calls inside: its warning display is turned off and file descriptors 1 and 2 are
    sent to a temporary file. The lines it printed are in the yielded list afterwards, for the caller to
    turn into its own message (`itk_error`). Scoped to the block; the previous state is restored."""
    sitk = require_sitk("reading NRRD/MHA")
    said: list[str] = []
    display = sitk.ProcessObject_GetGlobalWarningDisplay()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            try:
                yield said
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                tmp.seek(0)
                said.extend(ln.strip() for ln in tmp.read().decode("utf-8", "replace").splitlines() if ln.strip())
    finally:
        for fd in saved:
            os.close(fd)
        sitk.ProcessObject_SetGlobalWarningDisplay(display)


_PREFIX = re.compile(r"^(?:(?:ITK ERROR|[\w:]+)(?:\(0x[0-9a-f]+\))?: )+")  # "ITK ERROR: NrrdImageIO(0x..): "
_BUILD_PATH = re.compile(r"(/[\w.+-]+)+\.(cxx|hxx|h|cpp|txx)\b")


def itk_error(e: Exception, said: Sequence[str] = ()) -> str:
    """One line for an ITK failure: what its C++ code printed (`native_output`; MetaIO prints its reason
    and throws a generic one), else teem's own reason for a NRRD, else the exception's last line; without
    function names and never with a build path."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not _BUILD_PATH.search(ln)]
    nrrd = [ln for ln in lines if ln.startswith("[nrrd] ")]
    chosen = [ln for ln in said if not _BUILD_PATH.search(ln)] or nrrd[-1:] or lines[-1:]
    text = "; ".join(_PREFIX.sub("", ln.replace("[nrrd] ", "")) for ln in chosen)
    return text[:160] if text else "ITK error"


def volume_from_image(image: Any, path: Path, family: str, files: tuple[str, ...] = (),
                      series_uid: str = "") -> Volume:
    """A `Volume` (float32, X, Y, Z, RAS affine) from a SimpleITK image."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a "
                         "scalar 3D scan")
    if image.GetDimension() != 3:
        raise InputError(f"{path}: expected a 3D image, got a {image.GetDimension()}D image of size "
                         f"{tuple(image.GetSize())}")
    view = sitk.GetArrayViewFromImage(image)
    check_dtype(view.dtype, path)  # complex data is refused, not cast with numpy's warning
    data = view.astype(np.float32).transpose(2, 1, 0)
    data = check_array(np.ascontiguousarray(data), path)
    geo = ItkGeometry(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()),
                      family, files, series_uid)
    return Volume(data, geo.spacing, ras_affine(geo), path, geo, tuple(data.shape))


def read_itk(path: Path, max_voxels: int = WorkLimits.max_voxels, need_spacing: bool = True) -> Volume:
    """Read a .nrrd/.nhdr/.mha/.mhd scan. Its header is parsed and checked first (io/headers.py: declared
    spacing unless `need_spacing` is False, size within `max_voxels` and free memory, data present), so
    ITK never guesses a spacing nor allocates what a header merely claims."""
    header = read_header(path, geometry=need_spacing)
    check_header(header, max_voxels, need_spacing)
    sitk = require_sitk(f"reading {path.suffix.lower()}")
    try:
        with native_output() as said:
            image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read {header.family.upper()} ({itk_error(e, said)})") from None
    return volume_from_image(image, path, header.family)


def itk_image_like(ref: Volume, array: np.ndarray, dtype: type) -> Any:
    """A SimpleITK image of `array` (X, Y, Z) on `ref`'s grid, exactly as read (or from its RAS affine)."""
    sitk = require_sitk("writing NRRD/MHA")
    if tuple(array.shape[:3]) != ref.shape:
        raise ValueError(f"array shape {array.shape} does not match the reference grid {ref.shape}")
    geo = ref.header if isinstance(ref.header, ItkGeometry) else geometry_from_affine(ref.affine, "nrrd")
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype=dtype).transpose(2, 1, 0)))
    image.SetSpacing(geo.spacing)
    image.SetOrigin(geo.origin)
    image.SetDirection(geo.direction)
    return image


def write_itk(image: Any, path: Path) -> None:
    """Write a SimpleITK image; the format follows the suffix of `path` (compressed)."""
    import SimpleITK as sitk

    try:
        with native_output() as said:
            sitk.WriteImage(image, str(path), True)
    except RuntimeError as e:  # the caller names the output; ITK's text loses its build paths
        raise RuntimeError(itk_error(e, said)) from None
