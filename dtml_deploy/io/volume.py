"""Reading scans and writing results on exactly the input grid.

Formats, picked by extension: NIfTI (`.nii`, `.nii.gz`, through nibabel), the UA-MT h5 layout
(`.h5` with an `image` dataset, no geometry: spacing comes from the caller, identity orientation),
NRRD and MetaImage (`.nrrd`, `.nhdr`, `.mha`, `.mhd`, through SimpleITK: itk_io.py) and DICOM series
(a slice file or a one-series folder: dicom_series.py). Every failure is an `InputError` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.errors import InputError
from dtml_deploy.io.atomic import atomic_paths
from dtml_deploy.io.geometry import H5_GUESSES, check_affine, check_dtype, check_spacing, quiet_nibabel, raw_pixdim
from dtml_deploy.io.scan import (
    H5_SUFFIXES,
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    SUFFIXES,
    Volume,
    check_array,
    has_volume_suffix,
)
from dtml_deploy.limits import WorkLimits

__all__ = ["H5_SUFFIXES", "ITK_SUFFIXES", "NIFTI_SUFFIXES", "SUFFIXES", "Volume", "has_volume_suffix",
           "read_volume", "write_all_like", "write_like"]


def read_volume(path: Path, default_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                dataset: str = "image", check_finite: bool = True, spacing: tuple[float, float, float] | None = None,
                max_voxels: int | None = None) -> Volume:
    """Read a 3D volume as float32; `dataset` selects the h5 dataset (`image` or `label`).

    `spacing` overrides the file's voxel sizes (and lets a singular affine through); `max_voxels` refuses
    a larger volume before its data is read. Voxel sizes and affine are checked (io/geometry.py)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    name = path.name.lower()
    if spacing is not None:
        spacing = check_spacing(spacing, "--spacing", "option")  # callers validate it; a library call may not
    from dtml_deploy.io.dicom_series import is_dicom_file

    if not name.endswith(SUFFIXES) and (path.is_dir() or is_dicom_file(path)):
        from dtml_deploy.io.dicom_series import read_series

        vol = _checked_itk(read_series(path), spacing, max_voxels)
    elif not path.is_file():
        raise InputError(f"{path}: not a file")
    elif name.endswith(NIFTI_SUFFIXES):
        vol = _read_nifti(path, spacing, max_voxels)
    elif name.endswith(H5_SUFFIXES):
        vol = _read_h5(path, dataset, default_spacing, spacing, max_voxels)
    elif name.endswith(ITK_SUFFIXES):
        from dtml_deploy.io.itk_io import read_itk

        limit = WorkLimits.max_voxels if max_voxels is None else max_voxels
        vol = _checked_itk(read_itk(path, limit, need_spacing=spacing is None), spacing, max_voxels)
    else:
        raise InputError(f"{path}: unknown extension (expected one of {', '.join(SUFFIXES)})")
    if check_finite and not np.isfinite(vol.array).all():
        n = int((~np.isfinite(vol.array)).sum())
        raise InputError(f"{path}: {n} voxels are NaN or infinite (as stored, or after scaling to float32)")
    return vol


def _check_size(shape: tuple[int, ...], path: Path, max_voxels: int | None) -> None:
    n = int(np.prod(shape, dtype=np.float64))
    if max_voxels is not None and n > max_voxels:
        raise InputError(f"{path}: {'x'.join(map(str, shape))} = {n:,} voxels, over the limit of {max_voxels:,}")


def _checked_itk(vol: Volume, spacing: tuple[float, float, float] | None, max_voxels: int | None) -> Volume:
    """The same geometry and size checks as NIfTI for a volume read through SimpleITK (NRRD, MHA, DICOM).
    NRRD/MHA sizes were checked from the header before reading (io/headers.py); a DICOM series' here."""
    _check_size(vol.shape, vol.path, max_voxels)
    if spacing is None:
        check_spacing(vol.spacing, vol.path)
        check_affine(vol.affine, vol.path)
    else:
        vol.spacing = spacing
    return vol


def _read_nifti(path: Path, spacing: tuple[float, float, float] | None, max_voxels: int | None) -> Volume:
    import nibabel as nib

    try:
        with quiet_nibabel(), np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
            img = nib.load(str(path))
            check_dtype(img.get_data_dtype(), path)
            _check_size(tuple(img.shape), path, max_voxels)
            data = np.asarray(img.get_fdata(dtype=np.float32))
            source_shape = tuple(data.shape)
            data = check_array(data, path)
            explicit = spacing is not None
            if spacing is None:
                spacing = check_spacing(raw_pixdim(path, img.header), path)
    except InputError:
        raise
    except Exception as e:  # nibabel raises many types for truncated/corrupt files
        raise InputError(f"{path}: cannot read NIfTI ({type(e).__name__}: {str(e)[:120]})") from None
    check_affine(img.affine, path, allow_singular=explicit)
    return Volume(np.ascontiguousarray(data), spacing, img.affine.copy(), path, img.header, source_shape)


def _read_h5(path: Path, dataset: str, default_spacing: tuple[float, float, float],
             spacing: tuple[float, float, float] | None, max_voxels: int | None) -> Volume:
    import h5py

    guessed = H5_GUESSES if spacing is None else tuple(g for g in H5_GUESSES if g != "spacing")
    spacing = spacing or default_spacing
    try:
        with h5py.File(path, "r") as f:
            if dataset not in f:
                raise InputError(f"{path}: no '{dataset}' dataset (has: {', '.join(f.keys())})")
            ds = f[dataset]
            if not isinstance(ds, h5py.Dataset):
                raise InputError(f"{path}: '{dataset}' is a group, not an array")
            check_dtype(ds.dtype, path)
            _check_size(tuple(ds.shape), path, max_voxels)
            with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 are reported below
                data = np.asarray(ds[()], dtype=np.float32)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: cannot read h5 ({type(e).__name__}: {str(e)[:120]})") from None
    source_shape = tuple(data.shape)
    data = check_array(data, path)
    return Volume(np.ascontiguousarray(data), tuple(spacing), np.diag([*spacing, 1.0]), path, None, source_shape,
                  guessed)


def write_like(ref: Volume, array: np.ndarray, path: Path, dtype: type = np.uint8) -> Path:
    """Write `array` as NIfTI on `ref`'s grid: same shape, affine, qform/sform and their codes.

    The write is atomic and refuses to replace `ref`'s own file.
    """
    write_all_like(ref, [(Path(path), array, dtype)])
    return Path(path)


def write_all_like(ref: Volume, outputs: Sequence[tuple[Path, np.ndarray, type]],
                   prepared: Sequence[tuple[Path, Callable[[Path], None]]] = (), exclusive: bool = False,
                   remove: Sequence[Path] | Callable[[], Sequence[Path]] = ()) -> None:
    """`write_like` for several arrays as one unit: every file appears, or none does (`exclusive` and
    `remove` as for io/atomic.atomic_paths).

    The format follows each path's suffix (NIfTI, or NRRD/MHA through SimpleITK). `prepared` adds
    outputs already built in memory (a DICOM SEG), each with the function that saves it to a path."""
    import nibabel as nib

    savers: list[Callable[[Path], None]] = []
    for path, array, dtype in outputs:
        if Path(path).resolve() == ref.path.resolve():
            raise InputError(f"{path}: refusing to overwrite the input scan")
        if str(path).lower().endswith((".nrrd", ".mha")):  # single-file formats only: atomic
            from dtml_deploy.io.itk_io import itk_image_like, write_itk

            savers.append(lambda tmp, im=itk_image_like(ref, array, dtype): write_itk(im, tmp))
        elif str(path).lower().endswith(NIFTI_SUFFIXES):
            savers.append(lambda tmp, im=_nifti_like(ref, array, dtype): nib.save(im, str(tmp)))
        else:
            raise InputError(f"{path}: output must end in .nii, .nii.gz, .nrrd or .mha")
    for path, _ in prepared:
        if Path(path).resolve() == ref.path.resolve():
            raise InputError(f"{path}: refusing to overwrite the input scan")
    paths = [Path(p) for p, _, _ in outputs] + [Path(p) for p, _ in prepared]
    with atomic_paths(paths, exclusive=exclusive, remove=remove) as tmps:
        for tmp, save in zip(tmps, [*savers, *(s for _, s in prepared)], strict=True):
            save(tmp)


def _nifti_like(ref: Volume, array: np.ndarray, dtype: type) -> Any:
    import nibabel as nib

    if tuple(array.shape[:3]) != ref.shape:
        raise ValueError(f"array shape {array.shape} does not match the reference grid {ref.shape}")
    out = np.asarray(array, dtype=dtype)
    if ref.source_shape and len(ref.source_shape) == 4 and out.ndim == 3:
        out = out[..., None]
    if hasattr(ref.header, "get_qform"):  # a NIfTI source: keep its header, qform and sform
        hdr = ref.header.copy()
        hdr.set_data_dtype(dtype)
        img = nib.Nifti1Image(out, ref.affine, header=hdr)
        img.set_qform(ref.header.get_qform(), code=int(ref.header["qform_code"]))
        img.set_sform(ref.header.get_sform(), code=int(ref.header["sform_code"]))
    else:
        img = nib.Nifti1Image(out, ref.affine)
        img.set_qform(ref.affine, code=1)
        img.set_sform(ref.affine, code=1)
    img.header.set_slope_inter(1.0, 0.0) if dtype is not np.uint8 else img.header.set_slope_inter(None, None)
    return img
