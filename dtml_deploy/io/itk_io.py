"""NRRD (.nrrd/.nhdr) and MetaImage (.mha/.mhd) through SimpleITK, with exact geometry.

ITK places index (i, j, k) at `origin + D @ diag(spacing) @ (i, j, k)` in LPS physical space; NIfTI
affines (and `Volume.affine`) are RAS. The two differ by a sign flip of the first two rows, so the
RAS affine is `diag(-1, -1, 1, 1) @ [[D @ diag(spacing), origin], [0, 0, 0, 1]]`, oblique directions
included. Arrays stay in ITK index order (X, Y, Z): `GetArrayFromImage` returns (Z, Y, X), so reads and
writes transpose. The geometry read from a file is kept as given (`ItkGeometry`) and written back
unchanged, so a mask lands on exactly the input grid.

Spacing is never guessed: a NRRD without `space directions` or `spacings`, or a MetaImage without
`ElementSpacing`/`ElementSize`, is an error (ITK would silently use 1 mm). A NRRD that gives spacings
but no `space directions` has no orientation; it is read with identity direction and zero origin, as
ITK and 3D Slicer read it (the challenge data's own convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.errors import InputError
from dtml_deploy.io.geometry import check_dtype
from dtml_deploy.io.scan import Volume, check_array

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


def _header_text(path: Path, stop: bytes) -> str:
    """The text header of a NRRD or MetaImage file (up to `stop`), for checking which fields it declares."""
    with open(path, "rb") as f:
        head = f.read(65536)
    return head.split(stop, 1)[0].decode("latin-1").lower()


def _check_spacing_declared(path: Path, family: str) -> None:
    if family == "nrrd":
        head = _header_text(path, b"\n\n")
        if not head.startswith("nrrd000"):
            raise InputError(f"{path}: cannot read NRRD (no NRRD magic line)")
        if "space directions:" not in head and "spacings:" not in head:
            raise InputError(f"{path}: NRRD header gives no voxel spacing ('space directions' or 'spacings'); "
                             "add it (dtml does not guess spacing)")
    else:
        head = _header_text(path, b"ElementDataFile")
        if "ndims" not in head:
            raise InputError(f"{path}: cannot read MetaImage (no NDims in the header)")
        if "elementspacing" not in head and "elementsize" not in head:
            raise InputError(f"{path}: MetaImage header gives no ElementSpacing; add it (dtml does not guess "
                             "spacing)")


def itk_error(e: Exception) -> str:
    """The last line of ITK's multi-line exception text (ITK reports every failure as RuntimeError)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "ITK error"


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


def read_itk(path: Path) -> Volume:
    """Read a .nrrd/.nhdr/.mha/.mhd scan; spacing must be declared in the header."""
    name = path.name.lower()
    family = "nrrd" if name.endswith(NRRD_SUFFIXES) else "mha"
    _check_spacing_declared(path, family)
    sitk = require_sitk(f"reading {Path(name).suffix}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read {family.upper()} ({itk_error(e)})") from None
    return volume_from_image(image, path, family)


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

    sitk.WriteImage(image, str(path), True)
