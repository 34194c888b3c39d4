"""The LA challenge layout (`<ID>/lgemri.nrrd` + `laendo.nrrd`) read directly, preprocessed as UA-MT did.

The trees are built from the shipped real sample: each z-scored LA crop is turned back into a uint8
scan (raw = round(z * S + M)) and embedded in a larger x-y canvas whose background is filled so that
the whole canvas has mean M and standard deviation S. Z-scoring that canvas, as the challenge pipeline
does, must then give back the LA2018 values up to the uint8 quantisation (half a grey level, 0.5 / S),
and the label-guided crop must follow the released rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

from dtml_deploy.cli import app
from dtml_deploy.io.datasets import make_split, open_source
from dtml_training.data.cache import load_training_volumes

sitk = pytest.importorskip("SimpleITK", reason="the itk extra (SimpleITK) is not installed")

M, S = 35.0, 30.0  # grey level of z = 0 and grey levels per standard deviation (LA crops: z in [-1, 6.3])
CPU = ["--device", "cpu", "--no-progress"]


def _sample(sample_root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ids = json.loads((sample_root / "splits.json").read_text())["train"]
    return {cid: (nib.load(str(sample_root / "images" / f"{cid}.nii.gz")).get_fdata(dtype=np.float32),
                  np.asarray(nib.load(str(sample_root / "labels" / f"{cid}.nii.gz")).dataobj).astype(np.uint8))
            for cid in ids}


def _write_nrrd(path: Path, array: np.ndarray) -> None:
    """uint8, gzip, LPS, 0.625 mm space directions, zero origin: the challenge files' header fields."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing((0.625, 0.625, 0.625))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def _background_counts(n: int, n_bg: int, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two grey levels and their voxel counts (the rest of the background is 0) that give the canvas
    mean M and variance S^2: two linear equations in the counts, for the first feasible pair of levels."""
    rhs = np.array([n * M - crop.sum(), n * (S**2 + M**2) - (crop**2).sum()])
    for low in range(5, 100, 5):
        for high in range(low + 10, 256, 10):
            levels = np.array([low, high], dtype=np.float64)
            counts = np.round(np.linalg.solve(np.stack([levels, levels**2]), rhs)).astype(int)
            if counts.min() >= 0 and counts.sum() <= n_bg:
                return levels, counts
    raise AssertionError("canvas too small to match the statistics")


def _matched_canvas(z: np.ndarray, shape: tuple[int, int, int], offset: tuple[int, int],
                    rng: np.random.Generator) -> np.ndarray:
    """uint8 canvas holding round(z * S + M) at `offset`, with a background that makes the whole canvas's
    mean M and standard deviation S (up to one voxel's worth of rounding)."""
    crop = np.clip(np.round(z * S + M), 0, 255)
    n = int(np.prod(shape))
    levels, counts = _background_counts(n, n - crop.size, crop)
    background = np.zeros(n - crop.size)
    background[: counts[0]], background[counts[0]: counts.sum()] = levels
    canvas = np.zeros(shape)
    inside = np.zeros(shape, dtype=bool)
    sl = (slice(offset[0], offset[0] + z.shape[0]), slice(offset[1], offset[1] + z.shape[1]), slice(None))
    inside[sl] = True
    canvas[~inside] = rng.permutation(background)
    canvas[sl] = crop
    assert abs(canvas.mean() - M) < 1e-3 and abs(canvas.std() - S) < 1e-3
    return canvas.astype(np.uint8)


@pytest.fixture(scope="module")
def challenge_root(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, tuple]:
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("challenge")
    offset, shape = (37, 45), (176, 176, 56)
    cases = _sample(sample_root)
    for cid, (z, lab) in cases.items():
        _write_nrrd(root / cid / "lgemri.nrrd", _matched_canvas(z, shape, offset, rng))
        label = np.zeros(shape, dtype=np.uint8)
        label[offset[0]: offset[0] + z.shape[0], offset[1]: offset[1] + z.shape[1]] = lab * 255
        _write_nrrd(root / cid / "laendo.nrrd", label)
    return root, cases, offset


def test_challenge_crop_matches_the_la2018_pipeline(challenge_root):
    root, cases, offset = challenge_root
    source = open_source(root)
    assert source.layout == "la2018-challenge" and sorted(source.case_ids) == sorted(cases)
    split = make_split(source, 1, None)
    cache = load_training_volumes(split, threads=1)
    labels = dict(zip([c.case_id for c in split.labeled], cache.labels))
    for cid, image in zip(cache.case_ids, cache.images):
        z, lab = cases[cid]
        ref = source.image_ref(cid)
        x0, x1, y0, y1 = ref.crop
        # the released rule: atrium box + a 10..19 voxel margin + half the shortfall to 112, clipped
        fg = np.nonzero(lab)
        for lo, hi, a, b, off in ((fg[0].min(), fg[0].max(), x0, x1, offset[0]),
                                  (fg[1].min(), fg[1].max(), y0, y1, offset[1])):
            pad = max(112 - int(hi - lo), 0) // 2
            assert max(off + lo - 19 - pad, 0) <= a <= max(off + lo - 10 - pad, 0)
            assert min(off + hi + 10 + pad, 176) <= b <= min(off + hi + 19 + pad, 176)
        assert image.shape == (x1 - x0, y1 - y0, 56)
        # plain float64 reference of the same preprocessing on the canvas
        canvas = sitk.GetArrayFromImage(sitk.ReadImage(str(ref.path))).transpose(2, 1, 0).astype(np.float64)
        np.testing.assert_allclose(image, ((canvas - canvas.mean()) / canvas.std())[x0:x1, y0:y1], atol=1e-5)
        # ... and the LA2018 values where the challenge crop and the LA2018 crop overlap
        ax0, ay0 = max(x0, offset[0]), max(y0, offset[1])
        ax1, ay1 = min(x1, offset[0] + z.shape[0]), min(y1, offset[1] + z.shape[1])
        ours = image[ax0 - x0: ax1 - x0, ay0 - y0: ay1 - y0]
        theirs = z[ax0 - offset[0]: ax1 - offset[0], ay0 - offset[1]: ay1 - offset[1]]
        assert ours.size > 0.8 * z.size
        assert np.abs(ours - theirs).max() <= 0.5 / S + 1e-3
        if cid in labels:  # 255 -> 1, the whole atrium inside the crop
            assert set(np.unique(labels[cid])) == {0, 1}
            assert int(labels[cid].sum()) == int(lab.sum())


def test_crop_is_the_same_every_run_and_needs_no_label_voxels_for_unlabeled_cases(challenge_root):
    root, _, _ = challenge_root
    split = make_split(open_source(root), 1, None)
    again = make_split(open_source(root), 1, None)
    assert [c.image.crop for c in split.unlabeled] == [c.image.crop for c in again.unlabeled]
    assert all(not hasattr(c, "label") and c.image.path.name == "lgemri.nrrd" for c in split.unlabeled)


@pytest.fixture(scope="module")
def small_root(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two cases, 48x48x32 real sub-volumes around the atrium in a 64x64x32 canvas (fast to segment)."""
    root = tmp_path_factory.mktemp("challenge_small")
    for cid, (z, lab) in list(_sample(sample_root).items())[:2]:
        centre = ndi.center_of_mass(lab)
        start = [int(np.clip(round(c - s / 2), 0, n - s)) for c, s, n in zip(centre, (48, 48, 32), z.shape)]
        sl = tuple(slice(a, a + s) for a, s in zip(start, (48, 48, 32)))
        canvas, label = np.zeros((64, 64, 32), np.uint8), np.zeros((64, 64, 32), np.uint8)
        canvas[8:56, 8:56] = np.clip(np.round(z[sl] * S + M), 0, 255)
        label[8:56, 8:56] = lab[sl] * 255
        _write_nrrd(root / cid / "lgemri.nrrd", canvas)
        _write_nrrd(root / cid / "laendo.nrrd", label)
    return root


@pytest.mark.slow  # three CLI runs (train 2 iterations, evaluate, segment): 20 s on the shared 2-core box
def test_train_evaluate_and_segment_run_on_the_challenge_layout(small_root, tmp_path):
    r = CliRunner().invoke(app, ["train", "--data", str(small_root), "--out", str(tmp_path / "run"), "--labeled", "1",
                                 "--labeled-bs", "1", "--unlabeled-bs", "1", "--iterations", "2", "--n-filters", "4",
                                 "--patch", "32", "32", "32", "--workers", "0", "--checkpoint-every", "0", *CPU])
    assert r.exit_code == 0, r.output
    bundle = tmp_path / "run" / "bundle"
    r = CliRunner().invoke(app, ["evaluate", "--model", str(bundle), "--data", str(small_root), "--overlap", "0",
                                 "--backend", "torch", "--json", str(tmp_path / "eval.json"), *CPU])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "eval.json").read_text())["cases"]
    assert sorted(row["case"] for row in rows) == sorted(p.name for p in small_root.iterdir())
    assert all(0.0 <= row["dice"] <= 1.0 for row in rows)
    r = CliRunner().invoke(app, ["segment", str(small_root), "-o", str(tmp_path / "masks"), "--model", str(bundle),
                                 "--overlap", "0", "--backend", "torch", *CPU])
    assert r.exit_code == 0, r.output
    for case in small_root.iterdir():  # the input's format, on the whole scan's grid
        out = sitk.ReadImage(str(tmp_path / "masks" / f"{case.name}.nrrd"))
        ref = sitk.ReadImage(str(case / "lgemri.nrrd"))
        assert (out.GetSize(), out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == \
            (ref.GetSize(), ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection())
    names = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert names == sorted(f"{c.name}.nrrd" for c in small_root.iterdir())
