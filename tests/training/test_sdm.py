"""training.data.sdm against a brute-force DTC compute_sdf on small volumes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage as ndi

from dtml_training.data.sdm import inner_boundary, signed_distance_batch, signed_distance_map


def brute_distance_to(mask_from: np.ndarray, mask_to: np.ndarray) -> np.ndarray:
    """For each voxel of `mask_from`, Euclidean distance to the nearest voxel of `mask_to`; 0 elsewhere."""
    out = np.zeros(mask_from.shape)
    src = np.argwhere(mask_from)
    dst = np.argwhere(mask_to)
    d2 = ((src[:, None, :] - dst[None, :, :]) ** 2).sum(-1)
    out[tuple(src.T)] = np.sqrt(d2.min(axis=1))
    return out


def brute_inner_boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face neighbour inside the array (explicit neighbour loop)."""
    out = np.zeros(mask.shape, bool)
    for idx in itertools.product(*(range(n) for n in mask.shape)):
        if not mask[idx]:
            continue
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            nb = list(idx)
            nb[axis] += step
            if 0 <= nb[axis] < mask.shape[axis] and not mask[tuple(nb)]:
                out[idx] = True
                break
    return out


def skimage_inner_boundary(mask: np.ndarray) -> np.ndarray:
    """skimage.segmentation.find_boundaries(mask, mode='inner') as skimage computes it (ndimage grey
    dilation != grey erosion with the connectivity-1 footprint, mode 'reflect', & label != 0)."""
    lab = mask.astype(np.uint8)
    fp = ndi.generate_binary_structure(mask.ndim, 1)
    return (ndi.grey_dilation(lab, footprint=fp) != ndi.grey_erosion(lab, footprint=fp)) & (lab != 0)


def brute_sdf(mask: np.ndarray) -> np.ndarray:
    """DTC's compute_sdf for one non-degenerate mask, with brute-force distances (float64 -> float32)."""
    pos = mask.astype(bool)
    neg = ~pos
    posdis = brute_distance_to(pos, neg)
    negdis = brute_distance_to(neg, pos)
    sdf = (negdis - np.min(negdis)) / (np.max(negdis) - np.min(negdis)) - (posdis - np.min(posdis)) / (
        np.max(posdis) - np.min(posdis)
    )
    sdf[brute_inner_boundary(pos)] = 0
    return sdf.astype(np.float32)


def random_blob(seed: int, shape: tuple[int, ...] = (12, 10, 8)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(0.8, 2.0))
    mask = field > np.quantile(field, rng.uniform(0.4, 0.9))
    if seed % 3 == 0:
        mask |= rng.random(shape) < 0.03  # isolated voxels
    return mask.astype(np.uint8)


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_dtc(seed: int) -> None:
    mask = random_blob(seed)
    assert 0 < mask.sum() < mask.size
    ours = signed_distance_map(mask)
    assert ours.dtype == np.float32 and ours.shape == mask.shape
    np.testing.assert_array_equal(ours, brute_sdf(mask))


@pytest.mark.parametrize("seed", range(6))
def test_inner_boundary_matches_neighbour_check_and_skimage_algorithm(seed: int) -> None:
    mask = random_blob(seed, (9, 8, 7)).astype(bool)
    expected = brute_inner_boundary(mask)
    np.testing.assert_array_equal(inner_boundary(mask), expected)
    np.testing.assert_array_equal(skimage_inner_boundary(mask), expected)


def test_array_edge_is_not_a_boundary() -> None:
    mask = np.zeros((6, 5, 4), np.uint8)
    mask[:3] = 1  # fills the x < 3 half, touching five array faces
    b = inner_boundary(mask)
    assert b[2].all() and not b[:2].any()  # only the face next to the background
    np.testing.assert_array_equal(b, skimage_inner_boundary(mask.astype(bool)))
    np.testing.assert_array_equal(signed_distance_map(mask), brute_sdf(mask))


def test_sign_convention_and_range() -> None:
    mask = np.zeros((16, 14, 12), np.uint8)
    mask[3:11, 4:10, 3:9] = 1
    sdf = signed_distance_map(mask)
    boundary = inner_boundary(mask)
    inside = mask.astype(bool) & ~boundary
    assert (sdf[inside] < 0).all()
    assert (sdf[~mask.astype(bool)] > 0).all()
    assert (sdf[boundary] == 0).all()
    assert sdf.min() == -1.0 and sdf.max() == 1.0


def test_single_voxel() -> None:
    mask = np.zeros((7, 6, 5), bool)
    mask[3, 2, 2] = True
    sdf = signed_distance_map(mask)
    assert sdf[3, 2, 2] == 0 and (sdf[~mask] > 0).all()
    np.testing.assert_array_equal(sdf, brute_sdf(mask))


def test_empty_and_full_masks_give_zeros() -> None:
    for mask in (np.zeros((5, 4, 3), np.uint8), np.ones((5, 4, 3), np.uint8)):
        sdf = signed_distance_map(mask)
        assert sdf.dtype == np.float32 and sdf.shape == mask.shape
        assert not sdf.any() and np.isfinite(sdf).all()


def test_dtypes_agree_and_non_binary_rejected() -> None:
    mask = random_blob(1)
    ref = signed_distance_map(mask)
    for m in (mask.astype(bool), mask.astype(np.float32), mask.astype(np.int64)):
        np.testing.assert_array_equal(signed_distance_map(m), ref)
    with pytest.raises(ValueError):
        signed_distance_map(mask * 2)
    with pytest.raises(ValueError):
        signed_distance_map(mask * 0.5)
    with pytest.raises(ValueError):
        signed_distance_map(np.array(1))
    with pytest.raises(ValueError):
        signed_distance_map(np.array([["a"]]))


def test_batch() -> None:
    masks = np.stack([random_blob(s) for s in range(3)] + [np.zeros((12, 10, 8), np.uint8)])
    out = signed_distance_batch(masks)
    assert out.shape == masks.shape and out.dtype == np.float32
    for m, o in zip(masks, out, strict=True):
        np.testing.assert_array_equal(o, signed_distance_map(m))
    with pytest.raises(ValueError):
        signed_distance_batch(np.zeros(5))
