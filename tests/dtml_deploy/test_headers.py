"""NRRD and MetaImage headers read field by field (io/headers.py): every case is a real 32^3 LA crop written
by SimpleITK, whose header text is then edited the way a careless tool or a hostile user would."""

from __future__ import annotations

import gzip
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dtml_deploy.errors import InputError
from dtml_deploy.io.extent import voxel_estimate
from dtml_deploy.io.volume import read_volume
from tests.conftest import crop_real_case, sample_ids

sitk = pytest.importorskip("SimpleITK", reason="the itk extra (SimpleITK) is not installed")

SPACING = (0.625, 0.625, 0.625)


@pytest.fixture(scope="module")
def crop(sample_root: Path) -> np.ndarray:
    """A real LA crop as int16 (X, Y, Z), as scanners store it."""
    z = crop_real_case(sample_root, sample_ids(sample_root)[0], (32, 32, 32)).get_fdata(dtype=np.float32)
    return np.round(z * 100).astype(np.int16)


def _write(crop: np.ndarray, path: Path, compress: bool = False) -> Path:
    image = sitk.GetImageFromArray(np.ascontiguousarray(crop.transpose(2, 1, 0)))
    image.SetSpacing(SPACING)
    sitk.WriteImage(image, str(path), compress)
    return path


def _edit(path: Path, edit: Callable[[list[str]], list[str]]) -> Path:
    """Rewrite the header's lines with `edit`, keeping the attached data byte for byte."""
    raw = path.read_bytes()
    end = raw.index(b"\n\n") + 1 if path.suffix == ".nrrd" else raw.index(b"ElementDataFile")
    lines = edit(raw[:end].decode().splitlines())
    path.write_bytes("\n".join(lines).encode() + b"\n" + raw[end:])
    return path


def _drop(*names: str) -> Callable[[list[str]], list[str]]:
    return lambda lines: [ln for ln in lines if not ln.lower().startswith(names)]


def _swap(name: str, line: str) -> Callable[[list[str]], list[str]]:
    return lambda lines: [line if ln.startswith(name) else ln for ln in lines]


def _add(*extra: str, before: str = "") -> Callable[[list[str]], list[str]]:
    def edit(lines: list[str]) -> list[str]:
        at = next((i for i, ln in enumerate(lines) if before and ln.startswith(before)), len(lines))
        return lines[:at] + list(extra) + lines[at:]
    return edit


def _then(*edits: Callable[[list[str]], list[str]]) -> Callable[[list[str]], list[str]]:
    def edit(lines: list[str]) -> list[str]:
        for e in edits:
            lines = e(lines)
        return lines
    return edit


NO_GEOMETRY = ("space directions", "space:", "space origin")
LONG_COMMENT = [f"# {i:05d} " + "x" * 90 for i in range(800)]  # 80 KB of comments before the field
# name -> (suffix, header edit, words of the error)
REFUSED: dict[str, tuple[str, Callable, str]] = {
    "nrrd-spacing-only-in-a-comment": (".nrrd", _then(_drop(*NO_GEOMETRY), _add("# spacings: 0.625 0.625 0.625")),
                                       "no voxel spacing"),
    "nrrd-spacing-as-key-value": (".nrrd", _then(_drop(*NO_GEOMETRY), _add("spacings:=0.625 0.625 0.625")),
                                  "no voxel spacing"),
    "nrrd-nan-spacing": (".nrrd", _then(_drop(*NO_GEOMETRY), _add("spacings: 0.625 nan 0.625")),
                         "finite and positive"),
    "nrrd-negative-spacing": (".nrrd", _then(_drop(*NO_GEOMETRY), _add("spacings: 0.625 -0.625 0.625")),
                              "finite and positive"),
    "nrrd-singular-directions": (".nrrd", _swap("space directions", "space directions: (0.625,0,0) (0,0.625,0) "
                                                "(0.625,0,0)"), "'space directions' is singular"),
    "nrrd-zero-direction": (".nrrd", _swap("space directions", "space directions: (0.625,0,0) (0,0,0) (0,0,0.625)"),
                            "finite and positive"),
    "nrrd-space-units-cm": (".nrrd", _add('space units: "cm" "cm" "cm"'), "not millimetres"),
    "nrrd-huge-sizes": (".nrrd", _swap("sizes", "sizes: 2000 2000 2000"), "over the limit of 2,000,000,000"),
    "nrrd-truncated": (".nrrd", _swap("sizes", "sizes: 32 32 64"), "the data is truncated"),
    "nrrd-unknown-field": (".nrrd", _add("spacingz: 1 1 1"), "of the NRRD header is neither a field"),
    "nrrd-no-endian": (".nrrd", _drop("endian"), "needs an 'endian' field"),
    "mha-lowercase-spacing": (".mha", _swap("ElementSpacing", "elementspacing = 0.625 0.625 0.625"),
                              "no ElementSpacing"),
    "mha-spacing-only-in-a-comment": (".mha", _then(_drop("elementspacing"),
                                                    _add("Comment = ElementSpacing = 0.625 0.625 0.625")),
                                      "no ElementSpacing"),
    "mha-negative-spacing": (".mha", _swap("ElementSpacing", "ElementSpacing = 0.625 -0.625 0.625"),
                             "finite and positive"),
    "mha-singular-direction": (".mha", _swap("TransformMatrix", "TransformMatrix = 1 0 0 0 1 0 1 0 0"),
                               "the direction matrix (TransformMatrix) is singular"),
    "mha-huge-dims": (".mha", _swap("DimSize", "DimSize = 1200 1200 1200"), "the data is truncated"),
    "mha-2d": (".mha", _swap("NDims", "NDims = 2"), "expected a 3D image"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_a_bad_header_is_refused_before_itk_reads_it(kind: str, crop: np.ndarray, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    suffix, edit, words = REFUSED[kind]
    path = _edit(_write(crop, tmp_path / f"scan{suffix}"), edit)

    def never(*_: object) -> None:
        raise AssertionError("ITK read a file whose header was refusable")

    monkeypatch.setattr(sitk, "ReadImage", never)
    with pytest.raises(InputError) as e:
        read_volume(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and words in msg and "\n" not in msg, msg


def test_a_field_after_64_kib_of_comments_is_read(crop: np.ndarray, tmp_path: Path) -> None:
    nrrd = _edit(_write(crop, tmp_path / "long.nrrd"), _add(*LONG_COMMENT, before="type"))
    mha = _edit(_write(crop, tmp_path / "long.mha"),
                _add(*[f"Note{i:05d} = " + "y" * 90 for i in range(800)], before="TransformMatrix"))
    for path, name in ((nrrd, b"space directions:"), (mha, b"ElementSpacing")):
        assert path.read_bytes().index(name) > 65536
        vol = read_volume(path)
        assert vol.spacing == pytest.approx(SPACING)
        np.testing.assert_array_equal(vol.array, crop.astype(np.float32))


def test_spacing_given_by_the_user_reads_a_header_without_one(crop: np.ndarray, tmp_path: Path) -> None:
    path = _edit(_write(crop, tmp_path / "bare.nrrd"), _drop(*NO_GEOMETRY))
    with pytest.raises(InputError, match="no voxel spacing"):
        read_volume(path)
    assert read_volume(path, spacing=(0.625, 0.625, 1.0)).spacing == (0.625, 0.625, 1.0)


def test_elementsize_and_colon_separators_are_read_as_metaio_reads_them(crop: np.ndarray, tmp_path: Path) -> None:
    path = _edit(_write(crop, tmp_path / "size.mha"), _swap("ElementSpacing", "ElementSize: 0.625 0.625 0.625"))
    assert read_volume(path).spacing == pytest.approx(SPACING)


def test_a_missing_data_file_is_named_and_itk_prints_nothing(crop: np.ndarray, tmp_path: Path,
                                                             capfd: pytest.CaptureFixture) -> None:
    mhd = _write(crop, tmp_path / "detached.mhd")
    (tmp_path / "detached.raw").rename(tmp_path / "moved.raw")
    with pytest.raises(InputError, match=r"its data file .*detached\.raw \(ElementDataFile\) does not exist"):
        read_volume(mhd)
    nhdr = tmp_path / "detached.nhdr"
    _write(crop, nhdr)
    data = next(p for p in tmp_path.iterdir() if p.name.startswith("detached.") and p.suffix in (".raw", ".gz"))
    data.unlink()
    with pytest.raises(InputError, match=rf"its data file .*{re.escape(data.name)} \(data file\) does not exist"):
        read_volume(nhdr)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_what_itk_prints_stays_off_the_console_and_its_text_has_no_build_path(
        crop: np.ndarray, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """Headers that pass dtml's checks but that ITK still refuses: its reason, in one line of dtml's."""
    for suffix, family, words in ((".mha", "MHA", "data not read completely"),
                                  (".nrrd", "NRRD", "expected 65536 bytes but received")):
        whole = _write(crop, tmp_path / f"whole{suffix}", compress=True).read_bytes()
        path = tmp_path / f"cut{suffix}"
        path.write_bytes(whole[: len(whole) - 4000])  # gzip data cut short: enough to pass the size bound
        with pytest.raises(InputError) as e:
            read_volume(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: cannot read {family} (") and words in msg, msg
        assert "SimpleITK" not in msg and ".cxx" not in msg and "\n" not in msg and "(0x" not in msg, msg
    os.write(2, b"after\n")  # the console is back once the read is over
    assert capfd.readouterr() == ("", "after\n")


def test_a_tiny_gzip_header_asking_for_gigabytes_is_refused_at_once(tmp_path: Path) -> None:
    """4 GB of float32 claimed by 30 bytes of gzip data: refused in milliseconds, before any allocation."""
    header = ("NRRD0004\ntype: float\nendian: little\ndimension: 3\nsizes: 1000 1000 1000\n"
              "spacings: 0.625 0.625 0.625\nencoding: gzip\n\n")
    nrrd = tmp_path / "claims.nrrd"
    nrrd.write_bytes(header.encode() + gzip.compress(b"\0" * 4000))
    mha = tmp_path / "claims.mha"
    mha.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 1000 1000 1000\nElementSpacing = 1 1 1\n"
                    b"ElementType = MET_FLOAT\nCompressedData = True\nElementDataFile = LOCAL\n"
                    + gzip.compress(b"\0" * 4000))
    for path in (nrrd, mha):
        t = time.perf_counter()
        with pytest.raises(InputError, match="cannot hold the 4,000,000,000 bytes"):
            read_volume(path)
        assert time.perf_counter() - t < 0.1


def test_the_work_weight_comes_from_the_parsed_header(crop: np.ndarray, tmp_path: Path) -> None:
    path = _edit(_write(crop, tmp_path / "w.nrrd"), _add(*LONG_COMMENT, before="type"))
    assert voxel_estimate(path) == 32**3
