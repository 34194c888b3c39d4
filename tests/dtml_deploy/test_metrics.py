"""dtml_deploy.metrics against medpy.metric.binary (dc, jc, hd95, asd).

Tolerance: exact equality (bit-identical floats) everywhere; the module is designed to reproduce medpy's
arithmetic, not to approximate it.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from dtml_deploy.metrics import asd, case_metrics, dice, hd95, jaccard, summarise, surface_metrics

medpy_binary = pytest.importorskip("medpy.metric.binary", reason="medpy (dev extra) is the reference")

REPO = Path(__file__).resolve().parents[2]


def medpy_metrics(pred: np.ndarray, gt: np.ndarray, spacing=None) -> dict[str, float]:
    return {
        "dice": medpy_binary.dc(pred, gt),
        "jaccard": medpy_binary.jc(pred, gt),
        "hd95": medpy_binary.hd95(pred, gt, voxelspacing=spacing),
        "asd": medpy_binary.asd(pred, gt, voxelspacing=spacing),
    }


def assert_same(ours: dict[str, float], ref: dict[str, float]) -> None:
    for key, value in ref.items():
        assert isinstance(ours[key], float), key
        assert ours[key] == float(value), (key, ours[key], float(value))


def check_against_medpy(pred: np.ndarray, gt: np.ndarray, spacing=None) -> None:
    ref = medpy_metrics(pred, gt, spacing)
    assert_same(case_metrics(pred, gt), medpy_metrics(pred, gt) if spacing is not None else ref)
    assert_same(surface_metrics(pred, gt, spacing), {"hd95": ref["hd95"], "asd": ref["asd"]})
    assert hd95(pred, gt, spacing) == ref["hd95"]
    assert asd(pred, gt, spacing) == ref["asd"]
    assert dice(pred, gt) == ref["dice"]
    assert jaccard(pred, gt) == ref["jaccard"]
    if spacing is not None:
        mm = case_metrics(pred, gt, spacing)
        assert mm["hd95_mm"] == ref["hd95"] and mm["asd_mm"] == ref["asd"]


def blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random smooth blobs (sometimes touching the array edge), sometimes with salt noise."""
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(1.0, 2.5))
    mask = field > np.quantile(field, rng.uniform(0.5, 0.9))
    if rng.random() < 0.3:
        mask |= rng.random(shape) < 0.01
    return mask


# ---------------------------------------------------------------- random blobs

SPACINGS = [None, (0.625, 0.625, 0.625), (0.7, 1.3, 2.9), (0.1, 0.3, 0.7), 0.7, (1.0, 1.0, 1.0)]


@pytest.mark.parametrize("seed", range(24))
def test_random_blobs_match_medpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(6, 28, size=3))
    pred, gt = blob(rng, shape), blob(rng, shape)
    if not pred.any() or not gt.any():
        pytest.skip("degenerate draw")
    check_against_medpy(pred.astype(np.uint8), gt, SPACINGS[seed % len(SPACINGS)])


@pytest.mark.parametrize("seed", range(4))
def test_random_blobs_2d_and_4d(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    shape = (40, 33) if seed % 2 == 0 else (7, 8, 6, 5)
    pred, gt = blob(rng, shape), blob(rng, shape)
    check_against_medpy(pred, gt)
    check_against_medpy(pred, gt, tuple(rng.uniform(0.3, 2.0, size=len(shape))))


def test_non_contiguous_and_dtypes() -> None:
    rng = np.random.default_rng(7)
    pred, gt = blob(rng, (20, 18, 16)), blob(rng, (20, 18, 16))
    # transposed views keep medpy's C-order of surface voxels (it matters for asd's floating-point sum)
    check_against_medpy(pred.transpose(2, 0, 1), gt.transpose(2, 0, 1))
    check_against_medpy(pred[::2, ::-1], gt[::2, ::-1])
    # nonzero is foreground, whatever the dtype
    check_against_medpy(pred * 0.5, gt.astype(np.int32) * 7)


# ---------------------------------------------------------------- edge cases


def test_empty_pred_or_gt_gives_nan_where_medpy_raises() -> None:
    gt = np.zeros((10, 9, 8), np.uint8)
    gt[3:6, 2:7, 4:6] = 1
    empty = np.zeros_like(gt)
    for pred, ref in ((empty, gt), (gt, empty)):
        with pytest.raises(RuntimeError):
            medpy_binary.hd95(pred, ref)
        with pytest.raises(RuntimeError):
            medpy_binary.asd(pred, ref)
        out = case_metrics(pred, ref, spacing=(0.5, 1.0, 2.0))
        assert out["dice"] == medpy_binary.dc(pred, ref) == 0.0
        assert out["jaccard"] == medpy_binary.jc(pred, ref) == 0.0
        for key in ("hd95", "asd", "hd95_mm", "asd_mm"):
            assert math.isnan(out[key]), key
        assert math.isnan(hd95(pred, ref)) and math.isnan(asd(pred, ref))


def test_both_empty_follows_medpy() -> None:
    empty = np.zeros((5, 6, 7), bool)
    out = case_metrics(empty, empty)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref_dc = medpy_binary.dc(empty, empty)
    # medpy's dc: 0/0 on NumPy integers is nan with NumPy 2.x (its ZeroDivisionError branch, 1.0, is
    # reached only when count_nonzero returns a Python int).
    if int(np.__version__.split(".")[0]) >= 2:
        assert math.isnan(ref_dc)
    assert math.isnan(out["dice"]) and math.isnan(dice(empty, empty))
    assert out["jaccard"] == jaccard(empty, empty) == medpy_binary.jc(empty, empty) == 1.0
    assert math.isnan(out["hd95"]) and math.isnan(out["asd"])
    assert all(math.isnan(v) for v in surface_metrics(empty, empty).values())


def test_single_voxels() -> None:
    pred = np.zeros((8, 9, 10), bool)
    gt = np.zeros_like(pred)
    pred[1, 1, 1] = True
    gt[4, 5, 1] = True
    check_against_medpy(pred, gt)
    check_against_medpy(pred, gt, (0.5, 2.0, 1.5))
    assert hd95(pred, gt) == asd(pred, gt) == 5.0
    check_against_medpy(pred, pred)
    assert case_metrics(pred, pred) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    gt[2:7, 2:7, 2:7] = True
    check_against_medpy(pred, gt)


def test_masks_touching_the_array_border() -> None:
    shape = (12, 10, 9)
    full = np.ones(shape, bool)  # medpy: the whole outer shell is surface
    corner = np.zeros(shape, bool)
    corner[:5, :4, :3] = True
    face = np.zeros(shape, bool)
    face[:, :, -2:] = True
    slab = np.zeros(shape, bool)
    slab[3:9, :, :] = True
    for pred, gt in ((full, corner), (corner, full), (face, slab), (slab, corner), (full, full)):
        check_against_medpy(pred, gt)
        check_against_medpy(pred, gt, (0.7, 1.3, 2.9))


def test_anisotropic_spacing_and_forms() -> None:
    rng = np.random.default_rng(3)
    pred, gt = blob(rng, (16, 14, 12)), blob(rng, (16, 14, 12))
    check_against_medpy(pred, gt, (0.625, 0.625, 2.5))
    check_against_medpy(pred, gt, [3.1, 0.2, 1.7])
    check_against_medpy(pred, gt, np.array([0.9, 0.9, 0.45], dtype=np.float32))
    assert surface_metrics(pred, gt, 1.0) == surface_metrics(pred, gt)


def test_case_metrics_keys() -> None:
    rng = np.random.default_rng(5)
    pred, gt = blob(rng, (15, 15, 15)), blob(rng, (15, 15, 15))
    assert list(case_metrics(pred, gt)) == ["dice", "jaccard", "hd95", "asd"]
    out = case_metrics(pred, gt, spacing=0.625)
    assert list(out) == ["dice", "jaccard", "hd95", "asd", "hd95_mm", "asd_mm"]
    assert out["hd95_mm"] == hd95(pred, gt, 0.625) and out["asd_mm"] == asd(pred, gt, 0.625)


@pytest.mark.parametrize(
    ("pred", "gt", "spacing"),
    [
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), None),
        (np.zeros((4, 4, 4)), np.zeros((4, 4)), None),
        (np.zeros(()), np.zeros(()), None),
        (np.array([["a"]]), np.array([["b"]]), None),
        (np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1.0, 1.0)),
        (np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1.0, 0.0, 1.0)),
        (np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1.0, -1.0, 1.0)),
        (np.ones((4, 4, 4)), np.ones((4, 4, 4)), (1.0, np.nan, 1.0)),
        (np.ones((4, 4, 4)), np.ones((4, 4, 4)), "abc"),
    ],
)
def test_bad_input_raises_value_error(pred, gt, spacing) -> None:
    with pytest.raises(ValueError):
        case_metrics(pred, gt, spacing)
    with pytest.raises(ValueError):
        surface_metrics(pred, gt, spacing)
    if spacing is None:
        with pytest.raises(ValueError):
            dice(pred, gt)
        with pytest.raises(ValueError):
            jaccard(pred, gt)


# ---------------------------------------------------------------- summarise


def test_summarise() -> None:
    rows = [
        {"case": "a", "dice": 0.9, "hd95": 2.0},
        {"case": "b", "dice": 0.8, "hd95": float("nan")},
        {"case": "c", "dice": 0.7, "hd95": 4.0},
    ]
    out = summarise(rows)
    assert set(out) == {"dice", "hd95"}
    assert out["dice"]["mean"] == pytest.approx(0.8) and out["dice"]["std"] == float(np.std([0.9, 0.8, 0.7]))
    assert out["dice"]["count"] == 3 and out["dice"]["nan_count"] == 0
    assert out["hd95"] == {"mean": 3.0, "std": 1.0, "count": 2, "nan_count": 1}
    all_nan = summarise([{"asd": float("nan")}])["asd"]
    assert math.isnan(all_nan["mean"]) and math.isnan(all_nan["std"]) and all_nan["nan_count"] == 1
    assert summarise([]) == {}
    with pytest.raises(ValueError):
        summarise([{"dice": 0.9}, {"hd95": 1.0}])
    with pytest.raises(ValueError):
        summarise("not rows")  # type: ignore[arg-type]


# ---------------------------------------------------------------- real LA labels


def _shift(mask: np.ndarray, offset: tuple[int, ...]) -> np.ndarray:
    out = np.zeros_like(mask)
    src = tuple(slice(max(0, -o), mask.shape[i] - max(0, o)) for i, o in enumerate(offset))
    dst = tuple(slice(max(0, o), mask.shape[i] - max(0, -o)) for i, o in enumerate(offset))
    out[dst] = mask[src]
    return out


def _perturbations(gt: np.ndarray) -> dict[str, np.ndarray]:
    g = gt.astype(bool)
    coords = np.argwhere(g ^ ndi.binary_erosion(g))
    grid = np.indices(g.shape)
    centre = coords[len(coords) // 3]
    ball = sum((grid[i] - centre[i]) ** 2 for i in range(3)) <= 9**2
    far = np.array([5, 5, 5])
    blob_fp = sum((grid[i] - far[i]) ** 2 for i in range(3)) <= 3**2
    half = grid[0] < g.shape[0] // 2
    grown, shrunk = ndi.binary_dilation(g, iterations=2), ndi.binary_erosion(g)
    return {
        "eroded": ndi.binary_erosion(g, iterations=2),
        "shifted": _shift(g, (2, -1, 1)),
        "blob_removed_fp_added": (g & ~ball) | blob_fp,
        "dilated_half_eroded_half": np.where(half, grown, shrunk),
    }


@pytest.mark.slow
def test_real_la_labels_match_medpy(la2018: Path) -> None:
    labels = la2018 / "labels"
    nib = pytest.importorskip("nibabel")
    files = sorted(labels.glob("*.nii.gz"))[:2]
    for i, path in enumerate(files):
        gt = np.asarray(nib.load(path).dataobj)
        perturbed = _perturbations(gt)
        names = list(perturbed) if i == 0 else ["dilated_half_eroded_half"]
        for name in names:
            check_against_medpy(perturbed[name], gt, spacing=0.625 if i == 1 else None)


def test_agreement_between_predictions() -> None:
    from dtml_deploy.metrics import agreement

    a = np.zeros((6, 6, 6), bool)
    b = np.zeros((6, 6, 6), bool)
    assert agreement(a, b) == 1.0  # two empty predictions agree; medpy's dc would be nan here
    a[1:3, 1:3, 1:3] = True  # 8 voxels
    b[2:4, 1:3, 1:3] = True  # 8 voxels, 4 shared
    assert agreement(a, b) == pytest.approx(2 * 4 / 16)
    with pytest.raises(ValueError, match="shapes differ"):
        agreement(a, b[:5])
