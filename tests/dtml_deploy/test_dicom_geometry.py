"""DICOM series whose slices are not one regular grid are refused, naming the series and the fault.

Each series is a real LA sub-volume (tests/dtml_deploy/test_formats.py writers: oblique direction,
non-zero origin, one MR file per slice), then edited the way scanners, converters and careless tools
leave them: sheared or gantry-tilted stacks, non-finite positions, bad pixel spacings, non-orthonormal
or mixed orientations, mixed sizes, uneven, repeated or missing positions.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dtml_deploy.errors import InputError
from dtml_deploy.io.volume import read_volume
from tests.dtml_deploy.test_formats import _oblique_lps, _real_voxels, write_dicom_series

pydicom = pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
pytest.importorskip("SimpleITK", reason="the dicom extra (SimpleITK) is not installed")


def edit_slices(folder: Path, change: Callable[[object, int], None]) -> Path:
    """Apply `change(dataset, k)` to every slice (k: its index along the stack) and save it in place."""
    with warnings.catch_warnings():  # pydicom warns when asked to store values like 'nan'; that is the point
        warnings.simplefilter("ignore")
        for f in sorted(folder.iterdir()):
            ds = pydicom.dcmread(f)
            change(ds, int(ds.InstanceNumber) - 1)
            ds.save_as(str(f))
    return folder


def _series(tmp_path: Path, sample_root: Path, name: str = "s") -> tuple[Path, np.ndarray, np.ndarray]:
    voxels = _real_voxels(sample_root)[:12, :10, :6]
    direction, origin = _oblique_lps()
    return write_dicom_series(tmp_path / name, voxels, direction, origin), direction, origin


def _shift(offset: Callable[[int], np.ndarray]) -> Callable[[object, int], None]:
    def change(ds, k):
        ds.ImagePositionPatient = [f"{v:.8f}" for v in np.array([float(x) for x in ds.ImagePositionPatient])
                                   + offset(k)]
    return change


def _only(k0: int, change: Callable[[object, int], None]) -> Callable[[object, int], None]:
    return lambda ds, k: change(ds, k) if k == k0 else None


def _set(keyword: str, value: object) -> Callable[[object, int], None]:
    return lambda ds, k: setattr(ds, keyword, value)


def _cases(direction: np.ndarray) -> dict[str, tuple[Callable[[object, int], None], str]]:
    row, col = direction[:, 0], direction[:, 1]
    step = 0.625
    tilted = direction[:, 2] * np.cos(np.radians(15)) + col * np.sin(np.radians(15))  # not the plane's normal
    return {
        "sheared": (_shift(lambda k: 0.2 * k * row), "not along the slice normal .*sheared or gantry-tilted"),
        "gantry tilt": (_shift(lambda k: k * step * (tilted - direction[:, 2])), "not along the slice normal"),
        "one slice off-line": (_only(3, _shift(lambda k: 0.05 * col)), "not along the slice normal"),
        "nan position": (_only(2, _set("ImagePositionPatient", ["nan", "1", "2"])),
                         r"S7_IM0002 has ImagePositionPatient 'nan\\1\\2': not 3 finite numbers"),
        "inf orientation": (_set("ImageOrientationPatient", ["inf", "0", "0", "0", "1", "0"]),
                            "ImageOrientationPatient .*not 6 finite numbers"),
        "two-value position": (_only(0, _set("ImagePositionPatient", ["1", "2"])), "not 3 finite numbers"),
        "zero spacing": (_set("PixelSpacing", ["0", "0.625"]), "PixelSpacing .*must be positive"),
        "negative spacing": (_set("PixelSpacing", ["0.625", "-0.625"]), "PixelSpacing .*must be positive"),
        "nan spacing": (_set("PixelSpacing", ["nan", "0.625"]), "PixelSpacing .*not 2 finite numbers"),
        "one spacing value": (_set("PixelSpacing", ["0.625"]), "PixelSpacing .*not 2 finite numbers"),
        "not unit": (_set("ImageOrientationPatient", ["1.1", "0", "0", "0", "1", "0"]), "not two orthonormal"),
        "not orthogonal": (_set("ImageOrientationPatient", ["1", "0", "0", "0.2", "0.98", "0"]),
                           "not two orthonormal"),
        "mixed orientation": (_only(4, _set("ImageOrientationPatient", ["0", "1", "0", "0", "0", "-1"])),
                              "different orientations"),
        "mixed spacing": (_only(1, _set("PixelSpacing", ["0.7", "0.7"])), "different PixelSpacing"),
        "mixed size": (_only(2, lambda ds, k: (setattr(ds, "Rows", 5), setattr(ds, "Columns", 24))),
                       "different sizes .*5x24"),
        "mixed frame of reference": (_only(2, _set("FrameOfReferenceUID", "1.2.3.4")),
                                     "2 different frames of reference"),
        "uneven gaps": (_only(3, _shift(lambda k: 0.1 * direction[:, 2])), "uneven slice gaps"),
        "repeated position": (_only(3, _shift(lambda k: -step * direction[:, 2])), "repeated positions"),
        "no position": (_only(1, lambda ds, k: delattr(ds, "ImagePositionPatient")),
                        r"\(S7_IM0001\) has no ImagePositionPatient"),
        "empty orientation": (_set("ImageOrientationPatient", None), "no ImageOrientationPatient"),
    }


@pytest.mark.parametrize("fault", list(_cases(np.eye(3))))
def test_series_that_are_not_one_regular_grid_are_refused_naming_the_fault(fault, sample_root, tmp_path):
    folder, direction, _ = _series(tmp_path, sample_root)
    change, match = _cases(direction)[fault]
    edit_slices(folder, change)
    with pytest.raises(InputError, match=match) as err:
        read_volume(folder)
    assert str(err.value).startswith(str(folder)) and "\n" not in str(err.value)


def test_a_missing_slice_is_an_uneven_gap(sample_root, tmp_path):
    folder, _, _ = _series(tmp_path, sample_root)
    sorted(folder.iterdir())[2].unlink()
    with pytest.raises(InputError, match=r"gaps \(0.625 to 1.25 mm; 1 slice\(s\) missing after slice 2\?\)"):
        read_volume(folder)


def test_scanner_rounding_and_file_order_are_accepted_on_the_exact_grid(sample_root, tmp_path):
    """Positions rounded to 1 um and orientation to 1e-6 (as scanners write DS) still read, in slice order
    whatever the file names, on the grid the headers define."""
    folder = _series(tmp_path, sample_root)[0]
    exact = read_volume(folder)

    def rounded(ds, k):
        ds.ImagePositionPatient = [f"{float(v):.3f}" for v in ds.ImagePositionPatient]
        ds.ImageOrientationPatient = [f"{float(v):.6f}" for v in ds.ImageOrientationPatient]
    edit_slices(folder, rounded)
    for i, f in enumerate(sorted(folder.iterdir())):  # file names in reverse slice order
        f.rename(folder / f"IM_{99 - i:03d}")
    vol = read_volume(folder)
    np.testing.assert_array_equal(vol.array, exact.array)
    np.testing.assert_allclose(vol.affine, exact.affine, atol=2e-3)
    # ITK's own warning about that rounding (C++ stderr, with its build path) does not reach the console
    run = subprocess.run([sys.executable, "-c", f"from dtml_deploy.io.volume import read_volume; "
                          f"read_volume(__import__('pathlib').Path({str(folder)!r}))"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert run.returncode == 0 and run.stderr == "", run.stderr
