"""Bad inputs to `dtml segment` and `dtml evaluate`, through the CLI: each kind gets one `error:` line naming
the input, no traceback, no raw warning, the documented exit code, nothing half-written, and in a batch
the good cases and the JSON report are still written.

Speed: a random-weight bundle (n_filters 4, patch 32^3) and real 32^3 sub-volumes of the shipped sample,
so a good case is one window, one forward.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dtml_deploy.cli import app
from tests.conftest import centred_bundle_dir
from tests.conftest import crop_real_case as _crop
from tests.conftest import sample_ids as _ids

PATCH = 32
CPU = ["--backend", "torch", "--device", "cpu", "--no-progress"]
PIXDIM = 76  # byte offset of pixdim[0] in a NIfTI-1 header (8 float32)


# ------------------------------------------------------------------------------------------- helpers




def _cli(*args: str | Path):
    """Run the CLI and fail on any Python warning it raises (a raw numpy/nibabel warning is not a message)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    raw = [f"{w.category.__name__}: {w.message}" for w in caught
           if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)]
    assert raw == [], raw
    return result


def _errors(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]


def _one_error(result, code: int, *names: str | Path) -> str:
    """Exactly one `error:` line, naming each of `names`; no traceback; exit `code`."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errs = _errors(result)
    assert len(errs) == 1, result.stderr
    for n in names:
        assert str(n) in errs[0], (n, errs[0])
    return errs[0]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype: object = None) -> Path:
    img = nib.Nifti1Image(data, affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


def _patch_header(path: Path, offset: int, fmt: str, *values: float) -> Path:
    """Write values into the stored header bytes (nibabel would fix them on save)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = bytearray(f.read())
    raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    with opener(path, "wb") as f:
        f.write(bytes(raw))
    return path


def _read_only_target(tmp_path: Path) -> Path:
    """A report path that cannot be created: a read-only folder, or (as root, who may write anywhere) /sys."""
    if os.geteuid() == 0:
        return Path("/sys/dtml-report.json")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "report.json"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bundle_dir(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return centred_bundle_dir(sample_root, tmp_path_factory.mktemp("bundle"), PATCH)


@pytest.fixture(scope="module")
def good(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One good 32^3 real scan (0.625 mm, the bundle's spacing)."""
    folder = tmp_path_factory.mktemp("good")
    path = folder / "GOODCASE.nii.gz"
    nib.save(_crop(sample_root, _ids(sample_root)[0], (PATCH,) * 3), str(path))
    return path


@pytest.fixture(scope="module")
def ref(good: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(good))
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine.copy()


# ---------------------------------------------------------------------- segment: bad files in a batch


def _h5(path: Path, **datasets: object) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            if isinstance(v, str) and v == "group":
                f.create_group(k)
            else:
                f.create_dataset(k, data=v)
    return path


def _with_pixdim(value: float, axis: int = 1) -> Callable:
    def build(d: Path, data: np.ndarray, aff: np.ndarray) -> Path:
        return _patch_header(_save(d / "BAD.nii.gz", data, aff), PIXDIM + 4 * axis, "<f", value)
    return build


def _with_srow_z(values: tuple[float, float, float, float]) -> Callable:
    def build(d: Path, data: np.ndarray, aff: np.ndarray) -> Path:
        return _patch_header(_save(d / "BAD.nii.gz", data, aff), 312, "<4f", *values)  # srow_z
    return build


def _scaled_overflow(d: Path, data: np.ndarray, aff: np.ndarray) -> Path:
    img = nib.Nifti1Image(np.full(data.shape, 30000, np.int16), aff)
    img.header.set_slope_inter(1e38, 0.0)
    nib.save(img, str(d / "BAD.nii.gz"))
    return d / "BAD.nii.gz"


def _with_voxel(value: float) -> Callable:
    def build(d: Path, data: np.ndarray, aff: np.ndarray) -> Path:
        x = data.copy()
        x[3, 4, 5] = value
        return _save(d / "BAD.nii.gz", x, aff)
    return build


def _spaced(mm: float) -> Callable:
    def build(d: Path, data: np.ndarray, aff: np.ndarray) -> Path:
        a = aff.copy()
        a[:3, :3] *= mm / 0.625
        return _save(d / "BAD.nii.gz", data, a)
    return build


def _truncated(d: Path, data: np.ndarray, aff: np.ndarray) -> Path:
    full = _save(d / "full.nii.gz", data, aff).read_bytes()
    (d / "full.nii.gz").unlink()
    (d / "BAD.nii.gz").write_bytes(full[: len(full) // 2])
    return d / "BAD.nii.gz"


def _truncated_plain(d: Path, data: np.ndarray, aff: np.ndarray) -> Path:
    full = _save(d / "full.nii", data, aff).read_bytes()
    (d / "full.nii").unlink()
    (d / "BAD.nii").write_bytes(full[: 352 + 1000])
    return d / "BAD.nii"


def _bytes(name: str, content: bytes) -> Callable:
    def build(d: Path, data: np.ndarray, aff: np.ndarray) -> Path:
        (d / name).write_bytes(content)
        return d / name
    return build


RNG_BYTES = np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8).tobytes()
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 400

# kind -> (builder(folder, good data, good affine) -> bad path, words the error line must contain)
BAD_FILES: dict[str, tuple[Callable, str]] = {
    "missing": (lambda d, x, a: d / "BAD.nii.gz", "no such file"),
    "empty-file": (_bytes("BAD.nii", b""), "cannot read NIfTI"),
    "random-bytes-gz": (_bytes("BAD.nii.gz", RNG_BYTES), "cannot read NIfTI"),
    "png-named-nii": (_bytes("BAD.nii", PNG), "cannot read NIfTI"),
    "text-named-nii-gz": (_bytes("BAD.nii.gz", b"hello, not a scan\n" * 30), "cannot read NIfTI"),
    "truncated-gz": (_truncated, "cannot read NIfTI"),
    "truncated-nii": (_truncated_plain, "cannot read NIfTI"),
    "unknown-extension": (_bytes("BAD.img", b"ObjectType = Image\n"), "unknown extension"),
    "mhd-without-dims": (_bytes("BAD.mhd", b"ObjectType = Image\n"), "cannot read MetaImage"),
    "2d": (lambda d, x, a: _save(d / "BAD.nii.gz", x[:, :, 0], a), "expected a 3D image"),
    "4d-3-volumes": (lambda d, x, a: _save(d / "BAD.nii.gz", np.stack([x] * 3, -1), a), "expected a 3D image"),
    "5d": (lambda d, x, a: _save(d / "BAD.nii.gz", x[..., None, None].repeat(2, -1), a), "expected a 3D image"),
    "empty-axis": (lambda d, x, a: _save(d / "BAD.nii.gz", np.zeros((32, 32, 0), np.float32), a), "no voxels"),
    "nan-voxel": (_with_voxel(np.nan), "NaN or infinite"),
    "inf-voxel": (_with_voxel(np.inf), "NaN or infinite"),
    "minus-inf-voxel": (_with_voxel(-np.inf), "NaN or infinite"),
    "float64-beyond-float32": (lambda d, x, a: _save(d / "BAD.nii.gz", np.full(x.shape, 1e300), a),
                               "NaN or infinite"),
    "scaled-int16-overflow": (_scaled_overflow, "NaN or infinite"),
    "constant-image": (lambda d, x, a: _save(d / "BAD.nii.gz", np.full(x.shape, 3.0, np.float32), a),
                       "constant image"),
    "zero-voxel-size": (_with_pixdim(0.0), "finite and positive"),
    "negative-voxel-size": (_with_pixdim(-0.625, 2), "finite and positive"),
    "nan-voxel-size": (_with_pixdim(float("nan"), 3), "finite and positive"),
    "inf-voxel-size": (_with_pixdim(float("inf")), "finite and positive"),
    "singular-affine": (_with_srow_z((0.0, 0.0, 0.0, 0.0)), "singular"),
    "nan-affine": (_with_srow_z((0.0, 0.0, 0.625, float("nan"))), "not finite"),
    "50mm-spacing": (_spaced(50.0), "over the limit"),  # 2560^3 voxels when resampled to 0.625 mm
    "8mm-spacing-too-many-windows": (_spaced(8.0), "--max-windows"),  # 410^3 voxels, 15625 windows
    "complex64": (lambda d, x, a: _save(d / "BAD.nii.gz", (x + 1j * x).astype(np.complex64), a), "complex"),
    "rgb24": (lambda d, x, a: _save(d / "BAD.nii.gz", np.zeros(x.shape, [("R", "u1"), ("G", "u1"), ("B", "u1")]),
                                    a), "unsupported data type"),
    "h5-no-image": (lambda d, x, a: _h5(d / "BAD.h5", label=(x > 0).astype(np.uint8)), "no 'image' dataset"),
    "h5-image-is-group": (lambda d, x, a: _h5(d / "BAD.h5", image="group"), "group"),
    "h5-complex": (lambda d, x, a: _h5(d / "BAD.h5", image=(x + 1j * x).astype(np.complex64)), "complex"),
    "h5-2d": (lambda d, x, a: _h5(d / "BAD.h5", image=x[:, :, 0]), "expected a 3D image"),
    "h5-nan": (lambda d, x, a: _h5(d / "BAD.h5", image=np.where(x > x.mean(), np.nan, x)), "NaN or infinite"),
    "h5-strings": (lambda d, x, a: _h5(d / "BAD.h5", image=np.array([b"abc", b"def"])), "unsupported data type"),
    "h5-random-bytes": (_bytes("BAD.h5", RNG_BYTES), "cannot read h5"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_bad_file_fails_alone_in_a_batch(kind: str, good: Path, ref, bundle_dir: Path, tmp_path: Path) -> None:
    build, words = BAD_FILES[kind]
    data, aff = ref
    src = tmp_path / "in"
    src.mkdir()
    bad = build(src, data, aff)
    out = tmp_path / "out"
    r = _cli("segment", good, bad, "-o", out, "--model", bundle_dir, *CPU, "--json", tmp_path / "r.json")
    err = _one_error(r, 1, bad)
    assert words in err, err
    assert _files(out) == [good.name]  # the good case is written, nothing of the bad one
    report = json.loads((tmp_path / "r.json").read_text())
    status = {Path(c["input"]).name: (c["status"], c["error"]) for c in report["cases"]}
    assert status[good.name] == ("ok", None)
    assert status[bad.name][0] == "failed" and status[bad.name][1] == err[len("error: "):]


def test_all_cases_bad_exits_2_and_still_reports(ref, bundle_dir: Path, tmp_path: Path) -> None:
    data, aff = ref
    bad = []
    for kind in ("zero-voxel-size", "complex64"):
        (tmp_path / kind).mkdir()
        made = BAD_FILES[kind][0](tmp_path / kind, data, aff)
        bad.append(made.rename(made.with_name(f"{kind}-{made.name}")))  # two case names: no output collision
    r = _cli("segment", *bad, "-o", tmp_path / "out", "--model", bundle_dir, *CPU, "--json", tmp_path / "r.json")
    assert r.exit_code == 2 and len(_errors(r)) == 2 and "Traceback" not in r.output
    assert _files(tmp_path / "out") == []
    assert [c["status"] for c in json.loads((tmp_path / "r.json").read_text())["cases"]] == ["failed"] * 2


def test_an_unexpected_error_in_one_case_is_one_line_with_its_type(good: Path, ref, bundle_dir: Path,
                                                                   tmp_path: Path, monkeypatch) -> None:
    """A bug (here: LCC raising) fails that case with the exception's type named; the batch goes on."""
    import dtml_deploy.segment as seg

    real = seg.largest_component
    calls = []

    def flaky(mask: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("boom")
        return real(mask)

    monkeypatch.setattr(seg, "largest_component", flaky)
    data, aff = ref
    second = _save(tmp_path / "SECOND.nii.gz", data, aff)
    out = tmp_path / "out"
    r = _cli("segment", good, second, "-o", out, "--model", bundle_dir, *CPU, "--json", tmp_path / "r.json")
    err = _one_error(r, 1, good, "KeyError", "boom")
    assert "Traceback" not in err
    assert _files(out) == [second.name]
    assert json.loads((tmp_path / "r.json").read_text())["cases"][1]["status"] == "ok"


def test_a_folder_in_the_way_of_one_output(good: Path, ref, bundle_dir: Path, tmp_path: Path) -> None:
    data, aff = ref
    other = _save(tmp_path / "OTHER.nii.gz", data, aff)
    out = tmp_path / "out"
    (out / good.name).mkdir(parents=True)  # a folder where the first mask must go
    r = _cli("segment", good, other, "-o", out, "--model", bundle_dir, *CPU, "--overwrite",
             "--json", tmp_path / "r.json")
    _one_error(r, 1, good, out / good.name)
    assert (out / good.name).is_dir() and (out / other.name).is_file()
    assert _files(out) == sorted([good.name, other.name])  # no temporary files left


def test_an_existing_output_is_not_replaced_without_overwrite(good: Path, bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / good.name).write_bytes(b"old")
    r = _cli("segment", good, "-o", out, "--model", bundle_dir, *CPU)
    _one_error(r, 2, out / good.name, "--overwrite")
    assert (out / good.name).read_bytes() == b"old"


# ------------------------------------------------------------------------ segment: options and outputs

BAD_OPTIONS: dict[str, tuple[list[str], str]] = {
    "device-bogus": (["--device", "bogus"], "auto, cpu, cuda"),
    "device-mps": (["--device", "mps"], "CPU or CUDA only"),
    "device-bad-index": (["--device", "cpu:x"], "not a device"),
    "batch-zero": (["--batch", "0"], "batch must be >= 1"),
    "batch-negative": (["--batch", "-3"], "batch must be >= 1"),
    "overlap-one": (["--overlap", "1.0"], "overlap must be in [0, 1)"),
    "overlap-negative": (["--overlap", "-0.2"], "overlap must be in [0, 1)"),
    "overlap-nan": (["--overlap", "nan"], "overlap must be in [0, 1)"),
    "stride-zero": (["--stride", "0", "4", "4"], "stride must be 3 positive integers"),
    "spacing-zero": (["--spacing", "0", "0.625", "0.625"], "finite and positive"),
    "spacing-nan": (["--spacing", "nan", "1", "1"], "finite and positive"),
    "spacing-negative": (["--spacing", "1", "-1", "1"], "finite and positive"),
    "max-windows-zero": (["--max-windows", "0"], "max_windows must be >= 1"),
    "rank-timeout-zero": (["--rank-timeout", "0"], "--rank-timeout must be between 1 and"),
    "rank-timeout-nan": (["--rank-timeout", "nan"], "--rank-timeout must be between 1 and"),
    "rank-timeout-inf": (["--rank-timeout", "inf"], "--rank-timeout must be between 1 and"),
    "rank-timeout-huge": (["--rank-timeout", "1e12"], "--rank-timeout must be between 1 and"),
}


@pytest.mark.parametrize("kind", sorted(BAD_OPTIONS))
def test_a_bad_option_is_one_line_before_any_work(kind: str, good: Path, bundle_dir: Path, tmp_path: Path) -> None:
    args, words = BAD_OPTIONS[kind]
    out = tmp_path / "out"
    r = _cli("segment", good, "-o", out, "--model", bundle_dir, *CPU, *args, "--json", tmp_path / "r.json")
    err = _one_error(r, 2)
    assert words in err, err
    assert not out.exists() and not (tmp_path / "r.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_one_line(device: str, good: Path, bundle_dir: Path, tmp_path: Path) -> None:
    r = _cli("segment", good, "-o", tmp_path / "out", "--model", bundle_dir, "--device", device, "--no-progress")
    assert "no CUDA device" in _one_error(r, 2, device)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--overlap", "0.999"], ["--stride", "1", "1", "1"]],
                         ids=["overlap-0.999", "stride-1"])
def test_too_many_windows_is_refused_with_the_count_and_time(args: list[str], sample_root: Path, bundle_dir: Path,
                                                             tmp_path: Path) -> None:
    src = tmp_path / "WIDE.nii.gz"
    nib.save(_crop(sample_root, _ids(sample_root)[1], (48, 48, 48)), str(src))
    out = tmp_path / "out"
    r = _cli("segment", src, "-o", out, "--model", bundle_dir, *CPU, *args, "--json", tmp_path / "r.json")
    err = _one_error(r, 2, src, "4,913 windows", "limit of 4,096", "--max-windows 4913")
    assert " s on the cpu" in err or " min on the cpu" in err
    assert _files(out) == [] and json.loads((tmp_path / "r.json").read_text())["cases"][0]["status"] == "failed"


def test_memory_estimate_over_what_is_available_is_refused(good: Path, bundle_dir: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    import dtml_deploy.limits as limits

    monkeypatch.setattr(limits, "available_memory", lambda: 1_000_000)  # 1 MB free
    r = _cli("segment", good, "-o", tmp_path / "out", "--model", bundle_dir, *CPU, "--batch", "100000")
    err = _one_error(r, 2, good, "batches of 1 window(s)", "GB of memory", "0.0 GB is available")
    assert "lower --batch" in err and _files(tmp_path / "out") == []


def test_batch_is_capped_at_the_window_count(good: Path, bundle_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """--batch 100000 on a one-window volume runs one forward of one window, not a padded batch."""
    from dtml_deploy.backends.torch_backend import TorchBackend

    seen: list[int] = []
    real = TorchBackend.predict

    def spy(self, windows):
        seen.append(int(windows.shape[0]))
        return real(self, windows)

    monkeypatch.setattr(TorchBackend, "predict", spy)
    r = _cli("segment", good, "-o", tmp_path / "out", "--model", bundle_dir, *CPU, "--batch", "100000")
    assert r.exit_code == 0, r.output
    assert seen == [1]


@pytest.mark.parametrize("where", ["folder", "under-a-file", "read-only"])
def test_json_report_that_cannot_be_written(where: str, good: Path, bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    if where == "folder":
        target = tmp_path / "report.json"
        target.mkdir()
    elif where == "under-a-file":
        (tmp_path / "afile").write_text("x")
        target = tmp_path / "afile" / "report.json"
    else:
        target = _read_only_target(tmp_path)
    r = _cli("segment", good, "-o", out, "--model", bundle_dir, *CPU, "--json", target)
    _one_error(r, 2, target)
    if where == "read-only":  # found only when writing: the mask already written stays
        assert _files(out) == [good.name]
    else:  # refused before any work
        assert not out.exists()


def test_o_file_with_one_input_writes_that_file(good: Path, bundle_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "res" / "mask.nii.gz"
    r = _cli("segment", good, "-o", target, "--model", bundle_dir, *CPU, "--save-prob")
    assert r.exit_code == 0, r.output
    assert target.is_file() and _files(target.parent) == ["mask.nii.gz", "mask_prob.nii.gz"]
    img = nib.load(str(target))
    assert img.shape == (PATCH,) * 3 and img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(img.affine, nib.load(str(good)).affine)
    r = _cli("segment", good, "-o", tmp_path / "plain.nii", "--model", bundle_dir, *CPU)
    assert r.exit_code == 0 and (tmp_path / "plain.nii").is_file()


def test_o_file_in_another_format_writes_that_format(good: Path, bundle_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("SimpleITK")
    from dtml_deploy.io.volume import read_volume

    target = tmp_path / "mask.nrrd"
    r = _cli("segment", good, "-o", target, "--model", bundle_dir, *CPU, "--save-prob")
    assert r.exit_code == 0, r.output
    assert _files(tmp_path) == ["mask.nrrd", "mask_prob.nrrd"]
    back, src = read_volume(target), read_volume(good)
    assert back.shape == src.shape and set(np.unique(back.array)) <= {0.0, 1.0}
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-6)
    r = _cli("segment", good, "-o", tmp_path / "x.mha", "--model", bundle_dir, *CPU, "--format", "nrrd")
    _one_error(r, 2, "x.mha", "disagrees")
    assert not (tmp_path / "x.mha").exists()


def test_o_file_with_several_inputs_is_an_error(good: Path, ref, bundle_dir: Path, tmp_path: Path) -> None:
    second = _save(tmp_path / "SECOND.nii.gz", *ref)
    r = _cli("segment", good, second, "-o", tmp_path / "mask.nii.gz", "--model", bundle_dir, *CPU)
    _one_error(r, 2, "mask.nii.gz", "2 inputs")
    assert not (tmp_path / "mask.nii.gz").exists()


def test_o_that_is_an_existing_file_fails_the_case(good: Path, bundle_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "results").write_text("not a folder")
    r = _cli("segment", good, "-o", tmp_path / "results", "--model", bundle_dir, *CPU)
    _one_error(r, 2, good, "results")
    assert (tmp_path / "results").read_text() == "not a folder"


# --------------------------------------------------------------- segment: geometry guessed or given


def test_h5_geometry_guess_is_announced_once(ref, bundle_dir: Path, tmp_path: Path) -> None:
    data, _ = ref
    for cid in ("A", "B"):
        (tmp_path / "h5" / cid).mkdir(parents=True)
        _h5(tmp_path / "h5" / cid / "mri_norm2.h5", image=data)
    r = _cli("segment", tmp_path / "h5", "-o", tmp_path / "out", "--model", bundle_dir, *CPU)
    assert r.exit_code == 0, r.output
    warns = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1, r.stderr
    assert "no geometry" in warns[0] and "0.625" in warns[0] and "identity orientation" in warns[0]
    assert "x,y,z" in warns[0]
    r = _cli("segment", tmp_path / "h5", "-o", tmp_path / "out2", "--model", bundle_dir, *CPU,
             "--spacing", "0.3125", "0.3125", "0.3125", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    (warn,) = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:") and "geometry" in ln]
    assert "spacing" not in warn and "identity orientation" in warn
    cases = json.loads((tmp_path / "r.json").read_text())["cases"]
    assert all(c["spacing"] == [0.3125] * 3 and c["resampled"] for c in cases)
    img = nib.load(str(tmp_path / "out2" / "A.nii.gz"))
    np.testing.assert_allclose(img.affine, np.diag([0.3125, 0.3125, 0.3125, 1.0]))


def test_explicit_spacing_overrides_a_zero_voxel_size(ref, bundle_dir: Path, tmp_path: Path) -> None:
    data, aff = ref
    bad = _with_pixdim(0.0)(tmp_path, data, aff)
    r = _cli("segment", bad, "-o", tmp_path / "out", "--model", bundle_dir, *CPU, "--spacing", "0.625", "0.625",
             "0.625", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    out = nib.load(str(tmp_path / "out" / "BAD.nii.gz"))
    np.testing.assert_array_equal(out.affine, nib.load(str(bad)).affine)
    assert json.loads((tmp_path / "r.json").read_text())["cases"][0]["resampled"] is False


# ------------------------------------------------------------------------------- evaluate: folders


def _label(sample_root: Path, cid: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(sample_root / "labels" / f"{cid}.nii.gz"))
    return (np.asarray(img.dataobj) > 0).astype(np.uint8), img


def _shifted(mm: tuple[float, float, float]) -> Callable:
    def build(path: Path, mask: np.ndarray, like: nib.Nifti1Image) -> None:
        aff = like.affine.copy()
        aff[:3, 3] += mm
        _save(path, mask, aff)
    return build


def _rescaled(path: Path, mask: np.ndarray, like: nib.Nifti1Image) -> None:
    aff = like.affine.copy()
    aff[:3, :3] *= 1.0 / 0.625  # stored at 1 mm against the 0.625 mm label
    _save(path, mask, aff)


def _raw(transform: Callable[[np.ndarray], np.ndarray], dtype: object = None) -> Callable:
    def build(path: Path, mask: np.ndarray, like: nib.Nifti1Image) -> None:
        _save(path, transform(mask), like.affine, dtype)
    return build


def _pred_bytes(content: bytes) -> Callable:
    def build(path: Path, mask: np.ndarray, like: nib.Nifti1Image) -> None:
        path.write_bytes(content)
    return build


BAD_PREDICTIONS: dict[str, tuple[Callable, str]] = {
    "shifted-10mm": (_shifted((10.0, 0.0, 0.0)), "origin 10 mm away"),
    "shifted-0.01mm": (_shifted((0.0, 0.0, 0.01)), "origin 0.01 mm away"),
    "stored-at-1mm": (_rescaled, "spacing (1.0, 1.0, 1.0) vs (0.625, 0.625, 0.625)"),
    "flipped-axis": (lambda p, m, like: _save(p, m, like.affine @ np.diag([-1.0, 1, 1, 1])), "voxel axes differ"),
    "shape-mismatch": (_raw(lambda m: m[:, :, :40]), "shape"),
    "non-binary": (_raw(lambda m: m * 2 + (m > 0)), "not binary"),
    "nan-in-mask": (_raw(lambda m: np.where(m > 0, np.nan, 0.0).astype(np.float32)), "NaN or infinite"),
    "complex-mask": (_raw(lambda m: m.astype(np.complex64)), "complex"),
    "4d-mask": (_raw(lambda m: np.stack([m, m], -1)), "expected a 3D image"),
    "corrupt-file": (_pred_bytes(RNG_BYTES), "cannot read NIfTI"),
    "truncated-file": (_pred_bytes(gzip.compress(b"\x5c\x01" + b"\x00" * 500)[:200]), "cannot read NIfTI"),
}


@pytest.fixture(scope="module")
def gt_dir(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gt")
    for cid in _ids(sample_root)[:2]:
        (folder / f"{cid}.nii.gz").write_bytes((sample_root / "labels" / f"{cid}.nii.gz").read_bytes())
    return folder


@pytest.mark.parametrize("kind", sorted(BAD_PREDICTIONS))
def test_evaluate_a_bad_prediction_fails_alone(kind: str, sample_root: Path, gt_dir: Path, tmp_path: Path) -> None:
    build, words = BAD_PREDICTIONS[kind]
    good_id, bad_id = _ids(sample_root)[:2]
    pred = tmp_path / "pred"
    pred.mkdir()
    mask, like = _label(sample_root, good_id)
    _save(pred / f"{good_id}.nii.gz", mask, like.affine)
    bad_mask, bad_like = _label(sample_root, bad_id)
    build(pred / f"{bad_id}.nii.gz", bad_mask, bad_like)
    js, cs = tmp_path / "e.json", tmp_path / "e.csv"
    r = _cli("evaluate", pred, gt_dir, "--json", js, "--csv", cs)
    err = _one_error(r, 1, pred / f"{bad_id}.nii.gz")
    assert words in err, err
    report = json.loads(js.read_text())
    rows = {row["case"]: row for row in report["cases"]}
    assert rows[good_id]["status"] == "ok" and rows[good_id]["dice"] == 1.0
    assert rows[bad_id]["status"] == "failed" and rows[bad_id]["error"] == err[len("error: "):]
    assert report["summary"]["cases"] == {"scored": 1, "failed": 1, "both_empty": 0}
    assert report["summary"]["dice"]["count"] == 1
    assert good_id in r.stdout and bad_id not in r.stdout
    assert cs.read_text().count("\n") == 3  # header + both rows


def test_ignore_geometry_scores_a_shifted_prediction(sample_root: Path, gt_dir: Path, tmp_path: Path) -> None:
    cid = _ids(sample_root)[0]
    pred = tmp_path / "pred"
    pred.mkdir()
    mask, like = _label(sample_root, cid)
    _shifted((10.0, 0.0, 0.0))(pred / f"{cid}.nii.gz", mask, like)
    r = _cli("evaluate", pred, gt_dir)
    _one_error(r, 2, cid, "--ignore-geometry")
    assert r.stdout == ""
    r = _cli("evaluate", pred, gt_dir, "--ignore-geometry")
    assert r.exit_code == 0 and _errors(r) == []


def test_both_empty_cases_are_left_out_of_every_mean_and_counted(sample_root: Path, tmp_path: Path) -> None:
    a, b = _ids(sample_root)[:2]
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    mask, like = _label(sample_root, a)
    _save(pred / f"{a}.nii.gz", mask, like.affine)
    _save(gt / f"{a}.nii.gz", mask, like.affine)
    empty, like_b = _label(sample_root, b)
    _save(pred / f"{b}.nii.gz", np.zeros_like(empty), like_b.affine)
    _save(gt / f"{b}.nii.gz", np.zeros_like(empty), like_b.affine)
    r = _cli("evaluate", pred, gt, "--json", tmp_path / "e.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e.json").read_text())
    s = report["summary"]
    assert s["cases"] == {"scored": 2, "failed": 0, "both_empty": 1}
    for key in ("dice", "jaccard", "hd95", "asd", "hd95_mm", "asd_mm"):  # the same rule for every metric
        assert s[key]["count"] == 1 and s[key]["nan_count"] == 1, key
    assert s["dice"]["mean"] == 1.0 and s["jaccard"]["mean"] == 1.0
    row = {c["case"]: c for c in report["cases"]}[b]
    assert row["both_empty"] is True and row["dice"] is None and row["jaccard"] is None
    assert "both masks empty" in r.stdout


def _label_as_prediction(sample_root: Path, tmp_path: Path) -> tuple[Path, str]:
    """A folder `pred` holding the first sample case's label as its prediction; (folder, case id)."""
    cid = _ids(sample_root)[0]
    pred = tmp_path / "pred"
    pred.mkdir()
    mask, like = _label(sample_root, cid)
    _save(pred / f"{cid}.nii.gz", mask, like.affine)
    return pred, cid


@pytest.mark.parametrize("which", ["json", "csv", "report"])
@pytest.mark.parametrize("where", ["folder", "read-only"])
def test_evaluate_report_that_cannot_be_written(which: str, where: str, sample_root: Path, gt_dir: Path,
                                                 tmp_path: Path) -> None:
    if which == "report":
        pytest.importorskip("matplotlib")
    pred, _ = _label_as_prediction(sample_root, tmp_path)
    if where == "folder":
        target = tmp_path / f"report.{which}"
        target.mkdir()
    else:
        target = _read_only_target(tmp_path)
    r = _cli("evaluate", pred, gt_dir, f"--{which}", target)
    _one_error(r, 2, target)


@pytest.mark.parametrize("extra", [["x.nii", "x.nii.gz"]], ids=["two-files-one-case"])
def test_evaluate_two_predictions_for_one_case(extra: list[str], sample_root: Path, gt_dir: Path,
                                              tmp_path: Path) -> None:
    pred, cid = _label_as_prediction(sample_root, tmp_path)
    mask, like = _label(sample_root, cid)
    _save(pred / f"{cid}.nii", mask, like.affine)
    r = _cli("evaluate", pred, gt_dir)
    _one_error(r, 2, cid, "two predictions")


# ------------------------------------------------------------------------------ evaluate: --model


@pytest.fixture
def la_data(sample_root: Path, tmp_path: Path) -> Path:
    """An LA2018-layout folder of three real 32^3 cases (image and label cropped alike) and its splits.json."""
    root = tmp_path / "la"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    (root / "splits.json").write_text(json.dumps({"train": _ids(sample_root)}))
    for cid in _ids(sample_root):
        for sub in ("images", "labels"):
            nib.save(_crop(sample_root, cid, (PATCH,) * 3, sub), str(root / sub / f"{cid}.nii.gz"))
    return root


def test_evaluate_model_a_missing_or_corrupt_case_fails_alone(la_data: Path, bundle_dir: Path,
                                                              sample_root: Path, tmp_path: Path) -> None:
    a, b, c = _ids(sample_root)
    (la_data / "images" / f"{b}.nii.gz").unlink()  # missing image
    (la_data / "labels" / f"{c}.nii.gz").write_bytes(RNG_BYTES)  # corrupt label
    js = tmp_path / "e.json"
    r = _cli("evaluate", "--model", bundle_dir, "--data", la_data, "--cases", f"{a},{b},{c}", *CPU, "--json", js)
    assert r.exit_code == 1, r.output
    errs = _errors(r)
    assert len(errs) == 2 and "Traceback" not in r.output
    assert f"{b}.nii.gz: no such file" in errs[0] and f"{c}.nii.gz: cannot read NIfTI" in errs[1]
    rows = json.loads(js.read_text())["cases"]
    assert [row["status"] for row in rows] == ["ok", "failed", "failed"]
    assert 0.0 <= rows[0]["dice"] <= 1.0


def test_evaluate_model_label_off_the_image_grid_fails(la_data: Path, bundle_dir: Path, sample_root: Path,
                                                       tmp_path: Path) -> None:
    a, b, _ = _ids(sample_root)
    lab = nib.load(str(la_data / "labels" / f"{b}.nii.gz"))
    _shifted((0.0, 10.0, 0.0))(la_data / "labels" / f"{b}.nii.gz", np.asarray(lab.dataobj), lab)
    r = _cli("evaluate", "--model", bundle_dir, "--data", la_data, "--cases", f"{a},{b}", *CPU)
    _one_error(r, 1, f"{b}.nii.gz", "origin 10 mm away")
    r = _cli("evaluate", "--model", bundle_dir, "--data", la_data, "--cases", f"{a},{b}", *CPU, "--ignore-geometry")
    assert r.exit_code == 0 and _errors(r) == []


@pytest.mark.parametrize("cases", ["{a},{a}", "{a},{b},{a}"])
def test_evaluate_duplicate_case_ids_are_refused(cases: str, la_data: Path, bundle_dir: Path, sample_root: Path,
                                                 tmp_path: Path) -> None:
    a, b, _ = _ids(sample_root)
    r = _cli("evaluate", "--model", bundle_dir, "--data", la_data, "--cases", cases.format(a=a, b=b), *CPU,
             "--json", tmp_path / "e.json")
    _one_error(r, 2, a, "listed twice")
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("args,words", [(["--device", "bogus"], "not a device"),
                                        (["--device", "mps"], "CPU or CUDA only"),
                                        (["--spacing", "0", "1", "1"], "finite and positive")],
                         ids=["device-bogus", "device-mps", "spacing-zero"])
def test_evaluate_model_bad_option(args: list[str], words: str, la_data: Path, bundle_dir: Path) -> None:
    r = _cli("evaluate", "--model", bundle_dir, "--data", la_data, "--no-progress", *args)
    assert words in _one_error(r, 2)


def test_evaluate_h5_masks_announce_their_assumed_geometry_once(sample_root: Path, tmp_path: Path) -> None:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for cid in _ids(sample_root)[:2]:
        mask, _ = _label(sample_root, cid)
        _h5(pred / f"{cid}.h5", label=mask)
        _h5(gt / f"{cid}.h5", label=mask)
    r = _cli("evaluate", pred, gt)
    assert r.exit_code == 0, r.output
    (warn,) = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert "no geometry" in warn and "(1.0, 1.0, 1.0)" in warn


# ------------------------------------------------------------------------- the bounds, unit by unit


@pytest.mark.parametrize("seed", range(4))
def test_window_count_matches_the_listed_grid(seed: int) -> None:
    """The count the limit is checked on is the number of windows the engine then runs."""
    from dtml_deploy.engine.grid import GridSpec, pad_volume, window_count, window_starts

    rng = np.random.default_rng(seed)
    patch = (32, 32, 16)
    for _ in range(20):
        shape = tuple(int(v) for v in rng.integers(5, 120, 3))
        spec = (GridSpec(overlap=float(rng.uniform(0, 0.95))) if rng.random() < 0.5
                else GridSpec(stride=tuple(int(v) for v in rng.integers(1, 17, 3))))
        padded = pad_volume(np.zeros(shape, np.float32), patch)[0].shape
        assert window_count(shape, patch, spec) == len(window_starts(padded, patch, spec))


def test_grid_tolerance_is_the_documented_one() -> None:
    from dtml_deploy.evaluate import GridTolerance, grid_mismatch
    from dtml_deploy.io.volume import Volume

    tol = GridTolerance()
    aff = np.array([[0.0, 0.0, -0.625, 10.0], [0.0, 0.625, 0.0, -3.0], [0.625, 0.0, 0.0, 7.0], [0, 0, 0, 1]])

    def vol(a: np.ndarray) -> Volume:
        return Volume(np.zeros((4, 4, 4), np.float32), (0.625,) * 3, a, Path("v.nii.gz"))

    moved, scaled = aff.copy(), aff.copy()
    moved[1, 3] += 0.9 * tol.translation_mm
    scaled[:3, :3] *= 1 + 0.9 * tol.rtol
    assert grid_mismatch(vol(moved), vol(aff)) is None and grid_mismatch(vol(scaled), vol(aff)) is None
    moved[1, 3] += 0.2 * tol.translation_mm
    scaled[:3, :3] *= 1 + 0.2 * tol.rtol
    assert "origin" in grid_mismatch(vol(moved), vol(aff))
    assert "voxel axes" in grid_mismatch(vol(scaled), vol(aff))
    assert grid_mismatch(vol(moved), vol(aff), check_affine=False) is None


def test_limits_messages_carry_the_estimates() -> None:
    from dtml_deploy.errors import InputError
    from dtml_deploy.limits import WorkLimits, check_memory, check_voxels, check_windows, seconds_per_window

    lim = WorkLimits()
    with pytest.raises(InputError, match=r"2560x2560x2560 = 16,777,216,000 voxels"):
        check_voxels((2560, 2560, 2560), lim, "scan")
    check_voxels((1000, 1000, 1000), lim, "scan")  # 1e9: allowed
    s = seconds_per_window("cpu", (112, 112, 80), 16)
    assert s == pytest.approx(0.8)
    with pytest.raises(InputError, match=r"1,934,425 windows .*about 18 days on the cpu"):
        check_windows(1_934_425, (576, 576, 88), lim, "scan", s, "cpu")
    check_windows(4096, (576, 576, 88), lim, "scan", s, "cpu")
    with pytest.raises(InputError, match=r"needs about 3.0 GB of memory, 2.0 GB is available"):
        check_memory(3_000_000_000, "scan", "it", "lower --batch", available=2_000_000_000)
