"""The CLI on bad NRRD/MetaImage headers, the LA challenge layout and --stride: one `error:` line per bad
case (or one usage line before any work), the good cases still written and scored, notes for what is
skipped. Scans are real LA crops (tests/data/la_sample)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from tests.cli.test_bad_inputs import CPU, PATCH, _cli, _errors, _files, _one_error
from tests.conftest import centred_bundle_dir
from tests.conftest import crop_real_case as _crop
from tests.conftest import sample_ids as _ids
from tests.dtml_deploy.test_challenge import M, S, _sample, _write_nrrd

sitk = pytest.importorskip("SimpleITK", reason="the itk extra (SimpleITK) is not installed")


@pytest.fixture(scope="module")
def bundle_dir(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return centred_bundle_dir(sample_root, tmp_path_factory.mktemp("bundle"), PATCH)


@pytest.fixture(scope="module")
def good(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "GOODCASE.nii.gz"
    nib.save(_crop(sample_root, _ids(sample_root)[0], (PATCH,) * 3), str(path))
    return path


def _nrrd_text(good: Path, folder: Path, name: str, edit: dict[str, str | None]) -> Path:
    """The good scan as an uncompressed NRRD whose header fields are replaced (None: removed)."""
    data = np.round(nib.load(str(good)).get_fdata(dtype=np.float32) * 100).astype(np.int16)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing((0.625,) * 3)
    path = folder / name
    sitk.WriteImage(image, str(path), False)
    raw = path.read_bytes()
    end = raw.index(b"\n\n")
    lines = []
    for line in raw[:end].decode().splitlines():
        key = line.split(":")[0]
        if key in edit:
            if edit[key] is not None:
                lines.append(edit[key])
        else:
            lines.append(line)
    path.write_bytes("\n".join(lines).encode() + raw[end:])
    return path


def test_bad_headers_fail_alone_in_a_batch(good: Path, bundle_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    bad = {
        _nrrd_text(good, src, "COMMENT.nrrd", {"space directions": "# spacings: 0.625 0.625 0.625", "space": None,
                                               "space origin": None}): "no voxel spacing",
        _nrrd_text(good, src, "SINGULAR.nrrd", {"space directions": "space directions: (0.625,0,0) (0,0.625,0) "
                                                "(0,0.625,0)"}): "is singular",
        _nrrd_text(good, src, "HUGE.nrrd", {"sizes": "sizes: 2048 2048 1024"}): "over the limit of",
    }
    out = tmp_path / "out"
    r = _cli("segment", good, *bad, "-o", out, "--model", bundle_dir, *CPU, "--json", tmp_path / "r.json")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    errs = _errors(r)
    assert len(errs) == len(bad), r.stderr
    for path, words in bad.items():
        line = next(e for e in errs if str(path) in e)
        assert words in line, line
    assert _files(out) == [good.name]
    status = {Path(c["input"]).name: c["status"] for c in json.loads((tmp_path / "r.json").read_text())["cases"]}
    assert status == {good.name: "ok", **{p.name: "failed" for p in bad}}


@pytest.mark.parametrize("command", ["segment", "evaluate"])
def test_stride_longer_than_the_patch_is_one_usage_line_before_any_work(command: str, good: Path, bundle_dir: Path,
                                                                        sample_root: Path, tmp_path: Path) -> None:
    second = tmp_path / "SECOND.nii.gz"
    nib.save(_crop(sample_root, _ids(sample_root)[1], (48, 48, 40)), str(second))
    js = tmp_path / "r.json"
    if command == "segment":
        args = ["segment", good, second, "-o", tmp_path / "out"]
    else:
        args = ["evaluate", "--data", sample_root]
    r = _cli(*args, "--model", bundle_dir, *CPU, "--stride", "18", "18", "400", "--json", js)
    err = _one_error(r, 2, "--stride 18 18 400", "patch 32 32 32")
    assert "never be predicted" in err
    assert not js.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- the challenge layout


def _challenge_case(root: Path, cid: str, z: np.ndarray, lab: np.ndarray, label_shape: tuple[int, ...] = (64, 64, 32),
                    label_values: tuple[int, int] = (0, 255)) -> None:
    """A 48x48x32 real sub-volume around the atrium in a 64x64x32 uint8 canvas, its label on a canvas of
    `label_shape` at the same voxel indices."""
    centre = ndi.center_of_mass(lab)
    start = [int(np.clip(round(c - s / 2), 0, n - s)) for c, s, n in zip(centre, (48, 48, 32), z.shape)]
    sl = tuple(slice(a, a + s) for a, s in zip(start, (48, 48, 32)))
    canvas, label = np.zeros((64, 64, 32), np.uint8), np.zeros(label_shape, np.uint8)
    canvas[8:56, 8:56] = np.clip(np.round(z[sl] * S + M), 0, 255)
    label[8:56, 8:56] = np.where(lab[sl] > 0, label_values[1], label_values[0])
    _write_nrrd(root / cid / "lgemri.nrrd", canvas)
    _write_nrrd(root / cid / "laendo.nrrd", label)


@pytest.fixture
def challenge(sample_root: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "TrainingSet"
    cases = _sample(sample_root)
    for cid, (z, lab) in cases.items():
        _challenge_case(root, cid, z, lab)
    return root, sorted(cases)


def _evaluate(root: Path, bundle: Path, js: Path, *extra: str):
    return _cli("evaluate", "--model", bundle, "--data", root, "--overlap", "0", *CPU, "--json", js, *extra)


def test_an_unusable_label_fails_its_case_only(challenge, bundle_dir: Path, sample_root: Path, tmp_path: Path) -> None:
    root, (a, b, c) = challenge
    (root / b / "laendo.nrrd").write_bytes(b"NRRD0004\nnot a header\n")  # unreadable
    z, lab = _sample(sample_root)[c]
    _challenge_case(root, c, z, lab, label_values=(0, 7))  # neither 0/255 nor 0/1
    js = tmp_path / "e.json"
    r = _evaluate(root, bundle_dir, js)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    errs = _errors(r)
    assert len(errs) == 2, r.stderr
    assert f"{b}/laendo.nrrd: line 2 of the NRRD header" in errs[0], errs
    assert f"{c}/laendo.nrrd" in errs[1] and "neither 0/255 nor 0/1" in errs[1], errs
    rows = {row["case"]: row for row in json.loads(js.read_text())["cases"]}
    assert [rows[i]["status"] for i in (a, b, c)] == ["ok", "failed", "failed"]
    assert 0.0 <= rows[a]["dice"] <= 1.0


def test_a_label_on_another_grid_is_refused_for_its_case(challenge, bundle_dir: Path, sample_root: Path,
                                                         tmp_path: Path) -> None:
    """A label canvas larger than the image (atrium at the same indices) would crop to the same shape and be
    scored silently against voxels it does not describe."""
    root, (a, b, _) = challenge
    z, lab = _sample(sample_root)[b]
    _challenge_case(root, b, z, lab, label_shape=(80, 80, 32))
    js = tmp_path / "e.json"
    for extra in ((), ("--ignore-geometry",)):
        r = _evaluate(root, bundle_dir, js, *extra)
        err = _one_error(r, 1, f"{b}/laendo.nrrd", "not on its image's grid", "size 80x80x32 vs the image's 64x64x32")
        assert "lgemri.nrrd" in err
        rows = {row["case"]: row["status"] for row in json.loads(js.read_text())["cases"]}
        assert rows[a] == "ok" and rows[b] == "failed"


def test_a_case_folder_segments_its_scan_never_its_label(challenge, bundle_dir: Path, tmp_path: Path) -> None:
    root, (a, _, _) = challenge
    out = tmp_path / "out"
    r = _cli("segment", root / a, "-o", out, "--model", bundle_dir, "--overlap", "0", *CPU)
    assert r.exit_code == 0 and _errors(r) == [], r.output
    assert _files(out) == [f"{a}.nrrd"]
    assert f"note: {root / a / 'laendo.nrrd'}: the case's label, not segmented" in r.stderr


@pytest.mark.slow  # segment and evaluate on three cases: 10 s on the shared 2-core box
def test_stray_entries_of_a_challenge_root_are_named(challenge, bundle_dir: Path, tmp_path: Path) -> None:
    root, ids = challenge
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("x")
    (root / "Case9").mkdir()
    (root / "Case9" / "LGEMRI.nrrd").write_bytes((root / ids[0] / "lgemri.nrrd").read_bytes())  # wrong case
    (root / "list.txt").write_text("\n".join(ids))
    out = tmp_path / "out"
    r = _cli("segment", root, "-o", out, "--model", bundle_dir, "--overlap", "0", *CPU)
    assert r.exit_code == 0 and _errors(r) == [], r.output
    assert _files(out) == sorted(f"{i}.nrrd" for i in ids)
    for name, what in (("Case9", "a folder without lgemri.nrrd"), ("list.txt", "not a case folder"),
                       ("notes", "a folder without lgemri.nrrd")):
        assert f"note: {root / name}: {what}; skipped" in r.stderr, r.stderr
    r = _evaluate(root, bundle_dir, tmp_path / "e.json")
    assert r.exit_code == 0 and f"note: {root / 'Case9'}: a folder without lgemri.nrrd" in r.stderr, r.output


def test_a_case_name_in_another_script_draws_without_warnings(good: Path, bundle_dir: Path, tmp_path: Path) -> None:
    """matplotlib warns once per missing glyph, with its source line; the preview is drawn all the same."""
    pytest.importorskip("matplotlib", reason="the viz extra is not installed")
    src = tmp_path / "患者一号.nii.gz"
    src.write_bytes(good.read_bytes())
    r = _cli("segment", src, "-o", tmp_path / "out", "--model", bundle_dir, *CPU, "--preview")  # fails on a warning
    assert r.exit_code == 0, r.output
    assert _files(tmp_path / "out") == ["患者一号.nii.gz", "患者一号_preview.png"]
