"""`dtml segment` end to end through Typer's CliRunner, on real LA scans with a tiny random bundle.

Speed: the shipped sample cases (80x72x56) would take 48 windows each at overlap 0.5; the scans here are
real sub-volumes of them (48x48x32 around the atrium, affine shifted accordingly), which need 4 windows,
one forward of the default batch. Every run uses `--backend torch --device cpu --no-progress`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

from dtml_deploy.cli import app
from dtml_deploy.engine.sliding import EngineConfig
from tests.conftest import centred_bundle_dir
from tests.conftest import crop_real_case as _crop_real_case
from tests.conftest import sample_ids as _ids

PATCH = 32
CROP = (48, 48, 32)
FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
CPU = ["--backend", "torch", "--device", "cpu", "--no-progress"]


# ------------------------------------------------------------------------------------------- helpers




def _n_windows(shape, patch=PATCH, overlap=0.5, stride=None) -> int:
    """Window count re-derived from the documented grid rules (pad to the patch, then tile)."""
    total = 1
    for a, n in enumerate(shape):
        n = max(n, patch)
        if n == patch:
            continue
        step = stride[a] if stride is not None else max(1.0, patch * (1.0 - overlap))
        total *= math.ceil((n - patch) / step) + 1
    return total


def _cli(*args: str | Path) -> object:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _error_lines(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]


def _load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


def _n_components(mask: np.ndarray) -> int:
    return int(ndi.label(mask, structure=FULL)[1])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask, structure=FULL)
    if n == 0:
        return np.zeros(mask.shape, dtype=np.uint8)
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == 1 + int(np.argmax(sizes))).astype(np.uint8)


def _check_mask_on_grid(out: Path, src: Path) -> np.ndarray:
    data, img = _load(out)
    ref = nib.load(str(src))
    assert img.get_data_dtype() == np.uint8
    assert data.dtype == np.uint8
    assert img.shape == ref.shape
    np.testing.assert_array_equal(img.affine, ref.affine)
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == \
        (int(ref.header["qform_code"]), int(ref.header["sform_code"]))
    assert set(np.unique(data).tolist()) <= {0, 1}
    return data


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bundle_dir(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """n_filters 4, patch 32, heads centred on a real crop: masks are partly foreground, partly not."""
    return centred_bundle_dir(sample_root, tmp_path_factory.mktemp("bundle"), PATCH)


@pytest.fixture(scope="module")
def scans(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3 sample cases as 48x48x32 real sub-volumes, <ID>.nii.gz in one folder."""
    folder = tmp_path_factory.mktemp("scans")
    for cid in _ids(sample_root):
        nib.save(_crop_real_case(sample_root, cid, CROP), str(folder / f"{cid}.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def default_run(scans: Path, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The whole folder with default options and a JSON report."""
    out = tmp_path_factory.mktemp("default_out")
    before = _snapshot(scans)
    result = _cli("segment", scans, "-o", out, "--model", bundle_dir, *CPU, "--json", out / "report.json")
    after = _snapshot(scans)
    return result, out, before, after


@pytest.fixture(scope="module")
def maps_run(scans: Path, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One case, head seg (the paper's, not the default), every extra map."""
    out = tmp_path_factory.mktemp("maps_out")
    src = sorted(scans.glob("*.nii.gz"))[0]
    result = _cli("segment", src, "-o", out, "--model", bundle_dir, *CPU, "--head", "seg", "--save-prob", "--save-sdm",
                  "--save-uncertainty", "--json", out / "r.json")
    return result, out, src


# ----------------------------------------------------------------------------------------------- tests


def test_folder_segments_every_case_and_reports(default_run, scans: Path, sample_root: Path) -> None:
    result, out, _, _ = default_run
    assert result.exit_code == 0, result.output
    assert _error_lines(result) == []
    ids = _ids(sample_root)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{i}.nii.gz" for i in ids)
    report = json.loads((out / "report.json").read_text())
    assert report["engine"]["head"] == EngineConfig.head == "mean" and report["engine"]["lcc"] is True
    assert report["engine"]["tta"] is False
    assert report["engine"]["batch"] == 4  # the CPU default (8 on CUDA: tests/test_gpu.py)
    cases = {Path(c["input"]).name: c for c in report["cases"]}
    assert sorted(cases) == sorted(f"{i}.nii.gz" for i in ids)
    for cid in ids:
        src = scans / f"{cid}.nii.gz"
        mask = _check_mask_on_grid(out / f"{cid}.nii.gz", src)
        c = cases[src.name]
        assert c["status"] == "ok" and c["error"] is None
        assert Path(c["output"]) == out / f"{cid}.nii.gz"
        assert c["shape"] == list(CROP)
        assert c["spacing"] == pytest.approx([0.625] * 3)
        assert c["windows"] == _n_windows(CROP)
        assert c["resampled"] is False
        assert c["foreground_voxels"] == int(mask.sum())
        assert 0.0 <= c["agreement"] <= 1.0
        stages = c["seconds"]
        assert {"read", "normalise", "windows", "lcc", "write"} <= set(stages)
        assert "resample" not in stages
        assert all(math.isfinite(v) and v >= 0 for v in stages.values())
        assert stages["windows"] > 0


@pytest.mark.parametrize("native", [True, False])
def test_bf16_tip_only_on_cpus_that_have_it_and_only_by_default(scans: Path, bundle_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    import dtml_deploy.backends.torch_backend as tb

    monkeypatch.setattr(tb, "cpu_has_native_bf16", lambda: native)
    src = sorted(scans.glob("*.nii.gz"))[0]
    r = _cli("segment", src, "-o", tmp_path / "a", "--model", bundle_dir, *CPU)
    assert r.exit_code == 0 and ("--precision bf16" in r.stderr) == native
    r = _cli("segment", src, "-o", tmp_path / "b", "--model", bundle_dir, *CPU, "--precision", "fp32")
    assert r.exit_code == 0 and "--precision bf16" not in r.stderr


def test_batch_zero_is_an_error_not_the_default(scans: Path, bundle_dir: Path, tmp_path: Path) -> None:
    r = _cli("segment", sorted(scans.glob("*.nii.gz"))[0], "-o", tmp_path / "o", "--model", bundle_dir, *CPU,
             "--batch", "0")
    assert r.exit_code == 2 and r.stderr.strip() == "error: batch must be >= 1, got 0"
    assert not (tmp_path / "o").exists()


def test_cpu_bf16_detection(tmp_path: Path) -> None:
    from dtml_deploy.backends.torch_backend import cpu_has_native_bf16

    def info(flags: str) -> str:
        p = tmp_path / f"cpuinfo{len(list(tmp_path.iterdir()))}"
        p.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\nbugs\t\t: avx512_bf16x\n\n"
                     f"processor\t: 1\nflags\t\t: {flags}\n")
        return str(p)

    assert cpu_has_native_bf16(info("fpu sse avx2 avx512f avx512_bf16 avx512_vnni"))  # Zen 4
    assert cpu_has_native_bf16(info("fpu avx512f amx_bf16 amx_tile"))  # Sapphire Rapids
    assert not cpu_has_native_bf16(info("fpu sse avx2 avx512f avx512_vnni"))  # Ice Lake: emulated bf16
    assert not cpu_has_native_bf16(str(tmp_path / "absent"))  # not Linux


def test_inputs_are_never_modified(default_run, maps_run, scans: Path) -> None:
    _, _, before, after = default_run
    assert before == after
    assert set(before) == {p.name for p in scans.iterdir()}  # nothing was added beside the inputs


def test_default_output_is_one_connected_component(default_run, scans: Path) -> None:
    _, out, _, _ = default_run
    for p in sorted(scans.glob("*.nii.gz")):
        mask, _ = _load(out / p.name)
        assert 0.02 < mask.mean() < 0.98 and _n_components(mask) == 1


def test_extra_maps(maps_run) -> None:
    result, out, src = maps_run
    assert result.exit_code == 0, result.output
    name = src.name[: -len(".nii.gz")]
    mask = _check_mask_on_grid(out / f"{name}.nii.gz", src)
    ref = nib.load(str(src))
    maps = {}
    for kind in ("prob", "sdm", "uncertainty"):
        data, img = _load(out / f"{name}_{kind}.nii.gz")
        assert img.get_data_dtype() == np.float32 and data.dtype == np.float32
        assert img.shape == ref.shape
        np.testing.assert_array_equal(img.affine, ref.affine)
        assert np.isfinite(data).all()
        maps[kind] = data
    assert maps["prob"].min() >= 0.0 and maps["prob"].max() <= 1.0
    assert maps["sdm"].min() >= -1.0 and maps["sdm"].max() <= 1.0
    assert maps["uncertainty"].min() >= 0.0 and maps["uncertainty"].max() <= 1.0
    assert maps["prob"].std() > 0 and maps["sdm"].std() > 0  # real maps, not constant fill
    # the mask is the largest 26-connected component of prob > 0.5, which has several
    assert _n_components(maps["prob"] > 0.5) > 1 and 0.02 < mask.mean() < 0.98
    np.testing.assert_array_equal(mask, _largest_component(maps["prob"] > 0.5))
    report = json.loads((out / "r.json").read_text())
    (case,) = report["cases"]
    assert case["status"] == "ok" and 0.0 <= case["agreement"] <= 1.0


def test_heads_mean_and_sdm_agree_with_seg_maps(maps_run, bundle_dir: Path, tmp_path: Path) -> None:
    """--head sdm thresholds p_dis, --head mean thresholds (p_seg + p_dis)/2; cross-checked with the maps
    of the seg run: uncertainty == |p_seg - p_dis| and agreement == Dice(p_seg > .5, p_dis > .5)."""
    _, seg_out, src = maps_run
    name = src.name[: -len(".nii.gz")]
    p_seg, _ = _load(seg_out / f"{name}_prob.nii.gz")
    unc, _ = _load(seg_out / f"{name}_uncertainty.nii.gz")
    seg_case = json.loads((seg_out / "r.json").read_text())["cases"][0]
    probs = {}
    for head in ("sdm", "mean"):
        out = tmp_path / head
        r = _cli("segment", src, "-o", out, "--model", bundle_dir, *CPU, "--head", head, "--save-prob",
                 "--no-lcc", "--json", out / "r.json")
        assert r.exit_code == 0, r.output
        mask = _check_mask_on_grid(out / f"{name}.nii.gz", src)
        prob, _ = _load(out / f"{name}_prob.nii.gz")
        assert prob.min() >= 0.0 and prob.max() <= 1.0
        np.testing.assert_array_equal(mask, (prob > 0.5).astype(np.uint8))  # --no-lcc: plain threshold
        case = json.loads((out / "r.json").read_text())["cases"][0]
        assert case["agreement"] == pytest.approx(seg_case["agreement"], abs=1e-9)
        probs[head] = prob
    p_dis = probs["sdm"]
    assert not np.allclose(p_dis, p_seg, atol=1e-3)  # the heads really differ
    np.testing.assert_allclose(probs["mean"], 0.5 * (p_seg + p_dis), rtol=0, atol=1e-6)
    np.testing.assert_allclose(unc, np.abs(p_seg - p_dis), rtol=0, atol=1e-6)
    a, b = p_seg > 0.5, p_dis > 0.5
    expected = 1.0 if a.sum() + b.sum() == 0 else 2.0 * (a & b).sum() / (a.sum() + b.sum())
    assert seg_case["agreement"] == pytest.approx(expected, abs=1e-9)


def test_no_lcc_keeps_every_component(maps_run, bundle_dir: Path, tmp_path: Path) -> None:
    """The module's bundle has its heads centred on a real crop (the random net's probabilities follow
    the anatomy, so the mask is fragmented): --no-lcc keeps every fragment, the default keeps exactly
    the largest 26-connected one."""
    _, _, src = maps_run
    name = src.name[: -len(".nii.gz")]
    model = bundle_dir

    outs = {}
    for flag in ("--lcc", "--no-lcc"):
        out = tmp_path / flag.strip("-")
        r = _cli("segment", src, "-o", out, "--model", model, *CPU, flag, "--save-prob")
        assert r.exit_code == 0, r.output
        outs[flag] = (_check_mask_on_grid(out / src.name, src), _load(out / f"{name}_prob.nii.gz")[0])
    (lcc_mask, prob_a), (raw, prob_b) = outs["--lcc"], outs["--no-lcc"]
    np.testing.assert_array_equal(prob_a, prob_b)
    assert 0.05 < raw.mean() < 0.95  # the centring did what it is for
    np.testing.assert_array_equal(raw, (prob_b > 0.5).astype(np.uint8))  # no post-processing at all
    assert _n_components(raw) > 1
    assert _n_components(lcc_mask) == 1
    assert not (lcc_mask & (1 - raw)).any()  # LCC only removes voxels
    np.testing.assert_array_equal(lcc_mask, _largest_component(raw))
    assert lcc_mask.sum() < raw.sum()


def test_glob_input(scans: Path, bundle_dir: Path, tmp_path: Path, sample_root: Path) -> None:
    ids = _ids(sample_root)
    pattern = str(scans / "[SU]*.nii.gz")  # passed unexpanded, as a quoted shell argument is
    expected = sorted(i for i in ids if i[0] in "SU")
    assert 0 < len(expected) < len(ids)
    r = _cli("segment", pattern, "-o", tmp_path, "--model", bundle_dir, *CPU)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.nii.gz" for i in expected]


def test_glob_matching_nothing_is_an_error(scans: Path, bundle_dir: Path, tmp_path: Path) -> None:
    r = _cli("segment", str(scans / "nothing*.nii.gz"), "-o", tmp_path, "--model", bundle_dir, *CPU)
    assert r.exit_code == 2
    assert len(_error_lines(r)) == 1
    assert list(tmp_path.iterdir()) == []


def test_batch_with_bad_files_exits_1_and_writes_good_outputs(scans: Path, bundle_dir: Path,
                                                              tmp_path: Path, rng: np.random.Generator) -> None:
    good = sorted(scans.glob("*.nii.gz"))[:2]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    missing = bad_dir / "MISSINGCASE.nii.gz"
    corrupt = bad_dir / "CORRUPTCASE.nii.gz"
    corrupt.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    r = _cli("segment", good[0], missing, corrupt, good[1], "-o", out, "--model", bundle_dir, *CPU,
             "--json", tmp_path / "r.json")
    assert r.exit_code == 1, r.output
    errors = _error_lines(r)
    assert len(errors) == 2, r.stderr
    assert sum(str(missing) in e for e in errors) == 1
    assert sum(str(corrupt) in e for e in errors) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in good)
    for g in good:
        _check_mask_on_grid(out / g.name, g)
    report = json.loads((tmp_path / "r.json").read_text())
    status = {Path(c["input"]).name: c["status"] for c in report["cases"]}
    assert status == {good[0].name: "ok", missing.name: "failed", corrupt.name: "failed", good[1].name: "ok"}


def test_all_bad_exits_2(bundle_dir: Path, tmp_path: Path, rng: np.random.Generator) -> None:
    missing = tmp_path / "gone.nii.gz"
    corrupt = tmp_path / "noise.nii.gz"
    corrupt.write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 40, 40), 7.0, np.float32), np.diag([0.625] * 3 + [1.0])), str(flat))
    out = tmp_path / "out"
    r = _cli("segment", missing, corrupt, flat, "-o", out, "--model", bundle_dir, *CPU)
    assert r.exit_code == 2, r.output
    errors = _error_lines(r)
    assert len(errors) == 3, r.stderr
    for p in (missing, corrupt, flat):
        assert sum(str(p) in e for e in errors) == 1
    assert not out.exists() or not any(out.glob("*.nii.gz"))


def test_duplicate_case_names_fail(scans: Path, bundle_dir: Path, tmp_path: Path) -> None:
    src = sorted(scans.glob("*.nii.gz"))[0]
    twin = tmp_path / "copy" / src.name
    twin.parent.mkdir()
    twin.write_bytes(src.read_bytes())
    r = _cli("segment", src, twin, "-o", tmp_path / "out", "--model", bundle_dir, *CPU)
    assert r.exit_code == 2
    (err,) = _error_lines(r)  # refused before any work, naming both inputs
    assert str(src) in err and str(twin) in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(scans: Path, bundle_dir: Path, tmp_path: Path, sample_root: Path) -> None:
    src = sorted(scans.glob("*.nii.gz"))[1]
    out = tmp_path / "out"
    out.mkdir()
    target = out / src.name
    # a valid, different mask already sits at the output path
    nib.save(nib.Nifti1Image(np.zeros(CROP, np.uint8), nib.load(str(src)).affine), str(target))
    old = target.read_bytes()
    r = _cli("segment", src, "-o", out, "--model", bundle_dir, *CPU)
    assert r.exit_code == 2
    (err,) = _error_lines(r)
    assert str(target) in err and "--overwrite" in err
    assert target.read_bytes() == old
    assert [p.name for p in out.iterdir()] == [src.name]

    r = _cli("segment", src, "-o", out, "--model", bundle_dir, *CPU, "--overwrite")
    assert r.exit_code == 0, r.output
    assert target.read_bytes() != old
    mask = _check_mask_on_grid(target, src)
    assert mask.any()
    assert [p.name for p in out.iterdir()] == [src.name]  # no temp files left beside it


def test_a_case_whose_outputs_cannot_all_be_written_leaves_none_and_the_batch_goes_on(
        scans: Path, bundle_dir: Path, tmp_path: Path) -> None:
    first, second = sorted(scans.glob("*.nii.gz"))[:2]
    out = tmp_path / "out"
    blocker = out / first.name.replace(".nii.gz", "_sdm.nii.gz")
    blocker.mkdir(parents=True)  # a folder where the first case's SDM map must go
    r = _cli("segment", first, second, "-o", out, "--model", bundle_dir, *CPU, "--save-prob", "--save-sdm",
             "--overwrite")
    assert r.exit_code == 1, r.output  # some inputs failed
    (err,) = _error_lines(r)
    assert str(first) in err and str(blocker) in err
    stem = second.name.replace(".nii.gz", "")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [blocker.name, second.name, f"{stem}_prob.nii.gz", f"{stem}_sdm.nii.gz"])  # nothing of the first case
    assert blocker.is_dir() and not any(blocker.iterdir())


@pytest.mark.parametrize("kind", ["missing", "empty", "not-a-bundle"])
def test_bad_bundle_path(scans: Path, tmp_path: Path, kind: str) -> None:
    model = tmp_path / "model"
    if kind == "empty":
        model.mkdir()
    elif kind == "not-a-bundle":
        model.mkdir()
        (model / "config.json").write_text('{"hello": "world"}')
    src = sorted(scans.glob("*.nii.gz"))[0]
    r = _cli("segment", src, "-o", tmp_path / "out", "--model", model, *CPU)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and str(model) in lines[0]
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_paper_stride_and_constant_blend(sample_root: Path, bundle_dir: Path, tmp_path: Path) -> None:
    cid = _ids(sample_root)[2]
    shape = (40, 40, 40)
    src = tmp_path / f"{cid}.nii.gz"
    nib.save(_crop_real_case(sample_root, cid, shape), str(src))
    out = tmp_path / "out"
    r = _cli("segment", src, "-o", out, "--model", bundle_dir, *CPU, "--stride", "18", "18", "4",
             "--blend", "constant", "--batch", "6", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    _check_mask_on_grid(out / src.name, src)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["engine"]["stride"] == [18, 18, 4] and report["engine"]["blend"] == "constant"
    (case,) = report["cases"]
    assert case["windows"] == _n_windows(shape, stride=(18, 18, 4)) == 12
    assert case["windows"] != _n_windows(shape)  # really the stride grid, not the overlap one


def test_spacing_is_resampled_unless_disabled(sample_root: Path, bundle_dir: Path, tmp_path: Path) -> None:
    """A real 24x24x16 sub-volume relabelled as 1.25 mm: the model (0.625 mm) sees 48x48x32."""
    cid = _ids(sample_root)[0]
    crop = _crop_real_case(sample_root, cid, (24, 24, 16))
    aff = crop.affine.copy()
    aff[:3, :3] *= 2.0
    img = nib.Nifti1Image(np.asarray(crop.get_fdata(dtype=np.float32)), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=2)
    src = tmp_path / f"{cid}.nii.gz"
    nib.save(img, str(src))
    assert nib.load(str(src)).header.get_zooms() == pytest.approx((1.25, 1.25, 1.25))

    runs = {}
    for flag in ("--resample", "--no-resample"):
        out = tmp_path / flag.strip("-")
        r = _cli("segment", src, "-o", out, "--model", bundle_dir, *CPU, flag, "--save-prob",
                 "--json", out / "r.json")
        assert r.exit_code == 0, r.output
        mask = _check_mask_on_grid(out / src.name, src)
        prob, pimg = _load(out / f"{cid}_prob.nii.gz")
        assert prob.shape == (24, 24, 16)
        assert prob.min() >= 0.0 and prob.max() <= 1.0
        np.testing.assert_array_equal(pimg.affine, nib.load(str(src)).affine)
        (case,) = json.loads((out / "r.json").read_text())["cases"]
        assert case["shape"] == [24, 24, 16]
        assert case["spacing"] == pytest.approx([1.25] * 3)
        runs[flag] = (case, mask, prob)
    resampled, _, prob_rs = runs["--resample"]
    plain, _, prob_plain = runs["--no-resample"]
    assert resampled["resampled"] is True and "resample" in resampled["seconds"]
    assert plain["resampled"] is False and "resample" not in plain["seconds"]
    assert resampled["windows"] == _n_windows((48, 48, 32))
    assert plain["windows"] == _n_windows((24, 24, 16)) == 1
    assert not np.array_equal(prob_rs, prob_plain)


def test_ua_mt_h5_folder_input(sample_root: Path, bundle_dir: Path, tmp_path: Path) -> None:
    """A folder in the UA-MT layout (<ID>/mri_norm2.h5): case name from the folder, identity geometry."""
    cid = _ids(sample_root)[1]
    image = np.asarray(_crop_real_case(sample_root, cid, CROP).get_fdata(dtype=np.float32))
    data = tmp_path / "h5data"
    (data / cid).mkdir(parents=True)
    with h5py.File(data / cid / "mri_norm2.h5", "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=(image > image.mean()).astype(np.uint8))
    out = tmp_path / "out"
    r = _cli("segment", data, "-o", out, "--model", bundle_dir, *CPU, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert [p.name for p in out.iterdir()] == [f"{cid}.nii.gz"]
    mask, img = _load(out / f"{cid}.nii.gz")
    assert mask.dtype == np.uint8 and mask.shape == CROP
    np.testing.assert_array_equal(img.affine, np.diag([0.625, 0.625, 0.625, 1.0]))  # the bundle's spacing
    (case,) = json.loads((tmp_path / "r.json").read_text())["cases"]
    assert case["resampled"] is False and case["windows"] == _n_windows(CROP)


def test_output_folder_equal_to_input_folder_is_refused(scans: Path, bundle_dir: Path, tmp_path: Path) -> None:
    src = sorted(scans.glob("*.nii.gz"))[2]
    here = tmp_path / "data"
    here.mkdir()
    copy = here / src.name
    copy.write_bytes(src.read_bytes())
    r = _cli("segment", copy, "-o", here, "--model", bundle_dir, *CPU)
    assert r.exit_code == 2
    (err,) = _error_lines(r)
    assert str(copy) in err and "input" in err
    assert copy.read_bytes() == src.read_bytes()
    assert [p.name for p in here.iterdir()] == [src.name]


def test_console_case_time_is_not_double_counted(default_run) -> None:
    import re

    result, out, _, _ = default_run
    assert result.exit_code == 0
    cases = json.loads((out / "report.json").read_text())["cases"]
    printed = [float(m.group(2)) for m in re.finditer(r"\((\d+)\s+windows,\s+([\d.]+)\s+s\b", result.stderr)]
    assert len(printed) == len(cases) == 3
    # the report's stages do not nest, so the case time is their sum
    assert "engine_total" not in cases[0]["seconds"]
    wall = [sum(c["seconds"].values()) for c in cases]
    # printed with 2 decimals from 4-decimal stage values: each within 0.005 of the true sum
    assert sum(printed) == pytest.approx(sum(wall), abs=0.016)


def test_stride_larger_than_patch_is_refused(sample_root: Path, bundle_dir: Path, tmp_path: Path) -> None:
    """A stride above the patch would leave voxels no window covers (x: starts 0, 40, 48 -> 32..39)."""
    cid = _ids(sample_root)[0]
    src = tmp_path / f"{cid}.nii.gz"
    nib.save(_crop_real_case(sample_root, cid, (80, 48, 32)), str(src))
    out = tmp_path / "out"
    r = _cli("segment", src, "-o", out, "--model", bundle_dir, *CPU, "--stride", "40", "16", "16")
    assert r.exit_code == 2 and len(_error_lines(r)) == 1
    assert "--stride 40 16 16 is longer than the model's patch 32 32 32" in r.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("native", [True, False])
def test_bf16_chosen_on_a_cpu_that_emulates_it_is_warned(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    import torch

    import dtml_deploy.backends.torch_backend as tb

    monkeypatch.setattr(tb, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    warned = tb.cpu_precision_note("torch", cpu, "bf16", chosen=True)
    assert (warned is not None and "warning: this CPU has no native bf16" in warned) == (not native)
    assert tb.cpu_precision_note("torch", cpu, "fp32", chosen=True) is None
    assert tb.cpu_precision_note("onnx", cpu, "bf16", chosen=True) is None  # the torch backend's own matter
