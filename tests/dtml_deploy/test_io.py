"""Volume I/O: NIfTI/h5 reading, geometry-exact writing, input errors, intensity normalisation, atomic writes.

Inputs are the shipped real sample (tests/data/la_sample) and small synthetic NIfTI files whose geometry
(oblique affines, qform/sform codes, 4D singleton axes) is built explicitly in the test.
"""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from dtml_deploy.config import IntensityConfig
from dtml_deploy.errors import DtmlError, InputError
from dtml_deploy.intensity import normalise, prepare
from dtml_deploy.io.atomic import atomic_path, atomic_paths, atomic_write_text
from dtml_deploy.io.volume import Volume, has_volume_suffix, read_volume, write_like
from dtml_deploy.segment import case_name

# Header fields that define the grid on disk; write_like must reproduce each one bit for bit.
GEOMETRY_FIELDS = ("dim", "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                   "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")


def _sample_case(sample_root: Path, index: int = 0) -> tuple[str, Path, Path]:
    ids = sorted(p.name[: -len(".nii.gz")] for p in (sample_root / "images").glob("*.nii.gz"))
    cid = ids[index]
    return cid, sample_root / "images" / f"{cid}.nii.gz", sample_root / "labels" / f"{cid}.nii.gz"


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def _oblique_affine(orientation: str, zooms=(0.625, 0.7, 1.25), angles=(15.0, -10.0, 30.0),
                    offset=(-40.5, 12.25, 7.0)) -> np.ndarray:
    """A rotation (about all three axes, no shear) times anisotropic zooms, plus a translation.

    'RAS' is that affine as is; 'LPS' flips the sign of the first two world axes (as DICOM-derived
    files do), which is still a proper, shear-free qform.
    """
    rot = _rotation(2, angles[2]) @ _rotation(1, angles[1]) @ _rotation(0, angles[0])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(zooms)
    aff[:3, 3] = offset
    if orientation == "LPS":
        aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    assert not np.allclose(np.abs(aff[:3, :3]) > 1e-6, np.eye(3, dtype=bool))  # truly oblique
    return aff


def _save(path: Path, data: np.ndarray, qform: np.ndarray | None = None, sform: np.ndarray | None = None,
          qcode: int = 1, scode: int = 1) -> Path:
    img = nib.Nifti1Image(data, None)
    if qform is not None:
        img.set_qform(qform, code=qcode)
    if sform is not None:
        img.set_sform(sform, code=scode)
    nib.save(img, str(path))
    return path


def _raw_header(path: Path) -> np.ndarray:
    """The 348-byte NIfTI-1 header exactly as stored on disk (no nibabel interpretation)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(348), dtype=nib.nifti1.header_dtype)


def _hidden_or_temp(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name)


# --------------------------------------------------------------------------------------------- reading


def test_nifti_round_trip_on_sample(sample_root: Path, tmp_path: Path) -> None:
    _, img_path, lab_path = _sample_case(sample_root)
    ref = nib.load(str(img_path))
    vol = read_volume(img_path)
    assert isinstance(vol, Volume)
    assert vol.array.dtype == np.float32 and vol.array.flags.c_contiguous
    assert vol.shape == ref.shape == (80, 72, 56)
    np.testing.assert_array_equal(vol.array, ref.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(vol.affine, ref.affine)
    assert vol.spacing == pytest.approx(tuple(float(z) for z in ref.header.get_zooms()[:3]), abs=0)
    assert vol.path == img_path

    # image -> float32 map and label -> uint8 mask, both back on the same grid and read back identically
    out_img = write_like(vol, vol.array, tmp_path / "img.nii.gz", np.float32)
    back = read_volume(out_img)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_array_equal(back.affine, vol.affine)
    assert nib.load(str(out_img)).get_data_dtype() == np.float32

    lab = read_volume(lab_path)
    mask = (lab.array > 0.5).astype(np.uint8)
    out_lab = write_like(vol, mask, tmp_path / "lab.nii.gz")
    disk = nib.load(str(out_lab))
    assert disk.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(disk.dataobj), mask)
    raw_in, raw_out = _raw_header(img_path), _raw_header(out_lab)
    for key in GEOMETRY_FIELDS:
        np.testing.assert_array_equal(raw_out[key], raw_in[key], err_msg=key)


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
@pytest.mark.parametrize(("qcode", "scode"), [(1, 2), (2, 1), (1, 0), (0, 4), (3, 3)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_write_like_keeps_oblique_geometry_exactly(tmp_path: Path, rng: np.random.Generator, orientation: str,
                                                   qcode: int, scode: int, dtype: type) -> None:
    aff = _oblique_affine(orientation)
    data = (rng.random((20, 18, 14)) * 300.0 - 50.0).astype(np.float32)
    src = _save(tmp_path / "in.nii.gz", data, aff, aff, qcode, scode)
    vol = read_volume(src)
    arr = (vol.array > 100).astype(np.uint8) if dtype is np.uint8 else vol.array * np.float32(0.25)
    out = write_like(vol, arr, tmp_path / "out.nii.gz", dtype)

    a, b = nib.load(str(src)), nib.load(str(out))
    assert b.shape == a.shape
    assert b.get_data_dtype() == dtype
    np.testing.assert_array_equal(b.affine, a.affine)
    qa, qca = a.header.get_qform(coded=True)
    qb, qcb = b.header.get_qform(coded=True)
    sa, sca = a.header.get_sform(coded=True)
    sb, scb = b.header.get_sform(coded=True)
    assert (int(qca), int(sca)) == (qcode, scode) == (int(qcb), int(scb))
    for m_in, m_out in ((qa, qb), (sa, sb), (a.header.get_qform(), b.header.get_qform()),
                        (a.header.get_sform(), b.header.get_sform())):
        if m_in is None:
            assert m_out is None
        else:
            np.testing.assert_array_equal(m_out, m_in)
    raw_in, raw_out = _raw_header(src), _raw_header(out)
    for key in GEOMETRY_FIELDS:
        np.testing.assert_array_equal(raw_out[key], raw_in[key], err_msg=key)
    np.testing.assert_array_equal(np.asarray(b.dataobj), arr)
    assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(aff)


def test_write_like_keeps_distinct_qform_and_sform(tmp_path: Path, rng: np.random.Generator) -> None:
    """qform and sform describing different (oblique) grids, with different codes, both survive."""
    q = _oblique_affine("LPS")
    s = _oblique_affine("RAS", angles=(-5.0, 20.0, 40.0), offset=(3.0, -8.5, 60.0))
    data = rng.normal(size=(16, 12, 10)).astype(np.float32)
    src = _save(tmp_path / "in.nii", data, q, s, qcode=1, scode=2)
    vol = read_volume(src)
    np.testing.assert_allclose(vol.affine, s, atol=1e-5)  # sform wins in nibabel when coded
    out = write_like(vol, (vol.array > 0).astype(np.uint8), tmp_path / "out.nii.gz")
    raw_in, raw_out = _raw_header(src), _raw_header(out)
    for key in GEOMETRY_FIELDS:
        np.testing.assert_array_equal(raw_out[key], raw_in[key], err_msg=key)
    b = nib.load(str(out))
    np.testing.assert_array_equal(b.header.get_qform(), nib.load(str(src)).header.get_qform())
    np.testing.assert_array_equal(b.header.get_sform(), nib.load(str(src)).header.get_sform())


def test_4d_singleton_read_as_3d_and_written_back_4d(tmp_path: Path, sample_root: Path) -> None:
    _, img_path, _ = _sample_case(sample_root, 1)
    arr3 = read_volume(img_path).array[:40, :36, :28]
    aff = _oblique_affine("RAS")
    src = _save(tmp_path / "four_d.nii.gz", arr3[..., None], aff, aff, 1, 1)
    assert nib.load(str(src)).shape == (40, 36, 28, 1)
    vol = read_volume(src)
    assert vol.shape == (40, 36, 28)
    assert vol.array.ndim == 3
    assert vol.source_shape == (40, 36, 28, 1)
    np.testing.assert_array_equal(vol.array, arr3)
    mask = (vol.array > 0).astype(np.uint8)
    for name, arr, dtype in (("m.nii.gz", mask, np.uint8), ("p.nii.gz", vol.array, np.float32)):
        out = nib.load(str(write_like(vol, arr, tmp_path / name, dtype)))
        assert out.shape == (40, 36, 28, 1)
        np.testing.assert_array_equal(np.asarray(out.dataobj)[..., 0], arr)
        np.testing.assert_array_equal(out.affine, nib.load(str(src)).affine)


def test_h5_ua_mt_layout_matches_nifti(sample_root: Path, tmp_path: Path) -> None:
    cid, img_path, lab_path = _sample_case(sample_root, 2)
    image = nib.load(str(img_path)).get_fdata(dtype=np.float32)
    label = np.asarray(nib.load(str(lab_path)).dataobj).astype(np.uint8)
    h5_path = tmp_path / cid / "mri_norm2.h5"
    h5_path.parent.mkdir()
    with h5py.File(h5_path, "w") as f:
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("label", data=label, compression="gzip")

    spacing = (0.625, 0.625, 0.625)
    vol_h5 = read_volume(h5_path, default_spacing=spacing)
    vol_nii = read_volume(img_path)
    assert vol_h5.array.dtype == np.float32
    np.testing.assert_array_equal(vol_h5.array, vol_nii.array)
    assert vol_h5.spacing == spacing
    np.testing.assert_array_equal(vol_h5.affine, np.diag([*spacing, 1.0]))
    assert vol_h5.header is None

    lab_h5 = read_volume(h5_path, default_spacing=spacing, dataset="label")
    np.testing.assert_array_equal(lab_h5.array, read_volume(lab_path).array)
    assert set(np.unique(lab_h5.array).tolist()) == {0.0, 1.0}

    assert case_name(h5_path) == cid
    assert case_name(img_path) == cid
    assert has_volume_suffix(h5_path) and has_volume_suffix(img_path)

    with pytest.raises(InputError) as ei:
        read_volume(h5_path, dataset="prob")
    assert str(h5_path) in str(ei.value) and "prob" in str(ei.value)

    # a mask written on an h5 grid (no header) gets the h5's identity-orientation geometry
    out = write_like(vol_h5, label, tmp_path / f"{cid}.nii.gz")
    disk = nib.load(str(out))
    np.testing.assert_array_equal(disk.affine, np.diag([*spacing, 1.0]))
    np.testing.assert_array_equal(np.asarray(disk.dataobj), label)


# ---------------------------------------------------------------------------------------------- errors


def _expect_input_error(path: Path, match: str | None = None, **kw) -> InputError:
    with pytest.raises(InputError) as ei:
        read_volume(path, **kw)
    msg = str(ei.value)
    assert path.name in msg, msg
    assert "\n" not in msg
    if match is not None:
        assert match.lower() in msg.lower(), msg
    assert isinstance(ei.value, DtmlError)
    return ei.value


def test_missing_file(tmp_path: Path) -> None:
    _expect_input_error(tmp_path / "nowhere.nii.gz", "no such file")


def test_folder_is_not_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "looks_like.nii.gz"
    folder.mkdir()
    _expect_input_error(folder, "not a file")


def test_truncated_nii_gz(sample_root: Path, tmp_path: Path) -> None:
    _, img_path, _ = _sample_case(sample_root)
    good = tmp_path / "whole.nii.gz"
    write_like(read_volume(img_path), read_volume(img_path).array, good, np.float32)
    read_volume(good)  # valid before cutting
    blob = good.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(blob[: len(blob) // 2])
    _expect_input_error(cut, "cannot read")


def test_random_bytes_named_nii_gz(tmp_path: Path, rng: np.random.Generator) -> None:
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    _expect_input_error(junk, "cannot read")


def test_empty_file_named_nii(tmp_path: Path) -> None:
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    _expect_input_error(empty, "cannot read")


@pytest.mark.parametrize("shape", [(30, 20), (8, 8, 8, 2, 2), (8, 8, 8, 1, 3), (8, 8, 8, 3)],
                         ids=["2d", "5d", "5d-vector", "4d-multi"])
def test_wrong_dimensionality(tmp_path: Path, rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    path = _save(tmp_path / f"dims{len(shape)}.nii.gz", rng.normal(size=shape).astype(np.float32), np.eye(4))
    err = _expect_input_error(path, "3D")
    assert str(shape) in str(err)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_voxels(sample_root: Path, tmp_path: Path, bad: float) -> None:
    _, img_path, _ = _sample_case(sample_root)
    vol = read_volume(img_path)
    arr = vol.array.copy()
    arr[10, 20, 30] = bad
    arr[40, 41, 42] = bad
    path = write_like(vol, arr, tmp_path / "nonfinite.nii.gz", np.float32)
    err = _expect_input_error(path, "NaN or infinite")
    assert "2 voxels" in str(err)
    # the check can be switched off by callers that want the raw data
    raw = read_volume(path, check_finite=False)
    assert int((~np.isfinite(raw.array)).sum()) == 2


@pytest.mark.parametrize("name", ["scan.png", "scan.nii.zip", "scan"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00" * 512)
    assert not has_volume_suffix(path)
    _expect_input_error(path, "unknown extension")


@pytest.mark.parametrize("name", ["scan.mha", "scan.nrrd"])
def test_zeros_named_like_itk_formats(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00" * 512)
    assert has_volume_suffix(path)
    _expect_input_error(path, "cannot read")


def test_write_like_rejects_non_nifti_output_and_wrong_shape(sample_root: Path, tmp_path: Path) -> None:
    _, img_path, _ = _sample_case(sample_root)
    vol = read_volume(img_path)
    mask = (vol.array > 0).astype(np.uint8)
    with pytest.raises(InputError, match=r"out\.png"):
        write_like(vol, mask, tmp_path / "out.png")
    with pytest.raises(ValueError, match="does not match"):
        write_like(vol, mask[:-1], tmp_path / "short.nii.gz")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- intensity


def test_normalise_constant_image_raises() -> None:
    for value in (0.0, 3.5, -1200.0):
        with pytest.raises(InputError, match="constant"):
            normalise(np.full((16, 12, 8), value, dtype=np.float32), IntensityConfig(), name="flat.nii.gz")
    with pytest.raises(InputError, match=r"flat\.nii\.gz"):
        normalise(np.zeros((4, 4, 4), dtype=np.float32), IntensityConfig(), name="flat.nii.gz")


@pytest.mark.parametrize("policy", ["auto", "zscore", "none"])
def test_prepare_refuses_non_finite_arrays(policy: str) -> None:
    """Arrays handed to the Segmenter directly (files are checked when read): a NaN would blank every
    window it touches without a word."""
    x = np.random.default_rng(0).standard_normal((16, 12, 8)).astype(np.float32)
    x[3, 4, 5], x[0, 0, 0] = np.nan, np.inf
    with pytest.raises(InputError, match=r"scan\.nii\.gz: 2 voxels are NaN or infinite"):
        prepare(x, IntensityConfig(), policy, name="scan.nii.gz")  # type: ignore[arg-type]


def test_normalise_zscore_against_float64_reference(sample_root: Path) -> None:
    """Tolerance: the result is float32, so per-voxel agreement with float64 is ~1e-6 relative to the
    value range (we allow 1e-5 absolute on z-scores up to ~10); mean/std of the result within 1e-5."""
    _, img_path, _ = _sample_case(sample_root, 1)
    raw = np.asarray(nib.load(str(img_path)).dataobj).astype(np.float32) * 37.0 + 215.0  # MRI-like range
    out = normalise(raw, IntensityConfig())
    assert out.dtype == np.float32 and out.shape == raw.shape
    x = raw.astype(np.float64)
    ref = (x - x.mean()) / x.std()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    assert abs(out.astype(np.float64).mean()) < 1e-5
    assert abs(out.astype(np.float64).std() - 1.0) < 1e-5
    # 'none' leaves the intensities alone
    np.testing.assert_array_equal(normalise(raw, IntensityConfig(mode="none")), raw)


# ---------------------------------------------------------------------------------- overwrite / atomic


def test_write_like_refuses_to_overwrite_input(sample_root: Path, tmp_path: Path) -> None:
    _, img_path, _ = _sample_case(sample_root)
    src = tmp_path / "scan.nii.gz"
    src.write_bytes(img_path.read_bytes())
    before = src.read_bytes()
    vol = read_volume(src)
    mask = (vol.array > 0).astype(np.uint8)
    for target in (src, tmp_path / "." / "scan.nii.gz", tmp_path / "sub" / ".." / "scan.nii.gz"):
        with pytest.raises(InputError, match="overwrite the input"):
            write_like(vol, mask, target)
    link = tmp_path / "link.nii.gz"
    link.symlink_to(src)
    with pytest.raises(InputError, match="overwrite the input"):
        write_like(vol, mask, link)
    assert src.read_bytes() == before
    assert _hidden_or_temp(tmp_path) == []


def _failing_save(written: list[Path]):
    def save(img, filename, *args, **kwargs):
        path = Path(filename)
        path.write_bytes(b"\x1f\x8b partial nifti bytes")  # something partial is on disk when it fails
        written.append(path)
        raise OSError("disk full (simulated)")

    return save


def test_failed_write_leaves_no_temp_and_no_partial_file(sample_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, img_path, _ = _sample_case(sample_root)
    vol = read_volume(img_path)
    mask = (vol.array > 0).astype(np.uint8)
    out_dir = tmp_path / "out"
    written: list[Path] = []
    monkeypatch.setattr(nib, "save", _failing_save(written))
    target = out_dir / "case.nii.gz"
    with pytest.raises(OSError, match="simulated"):
        write_like(vol, mask, target)
    assert written and written[0] != target and written[0].parent == out_dir  # it wrote to a temp name
    assert not target.exists()
    assert list(out_dir.iterdir()) == []

    # an existing output survives a failed replacement unchanged
    monkeypatch.undo()
    write_like(vol, mask, target)
    before = target.read_bytes()
    monkeypatch.setattr(nib, "save", _failing_save(written))
    with pytest.raises(OSError, match="simulated"):
        write_like(vol, 1 - mask, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["case.nii.gz"]


def test_atomic_paths_put_all_files_in_place_or_none(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "c.nii.gz"
    c.mkdir()  # the third rename cannot replace a folder
    with pytest.raises(OSError), atomic_paths([a, b, c]) as tmps:
        for t in tmps:
            t.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.nii.gz"]  # a and b were taken back

    with atomic_paths([a, b]) as tmps:
        for i, t in enumerate(tmps):
            t.write_bytes(bytes([i]))
    assert a.read_bytes() == b"\x00" and b.read_bytes() == b"\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]


def test_atomic_path_and_text(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "report.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert tmp.name.endswith(".json")
        tmp.write_text('{"half": ')
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []

    atomic_write_text(target, '{"ok": true}\n')
    assert target.read_text() == '{"ok": true}\n'
    assert list(target.parent.iterdir()) == [target]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's owner-only 0600

    nii = tmp_path / "a.b.nii.gz"
    with atomic_path(nii) as tmp:
        assert tmp.name.endswith(".nii.gz")  # nibabel picks the format from the suffix
        tmp.write_bytes(b"x")
    assert nii.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.b.nii.gz", "deep"]
