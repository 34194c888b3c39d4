"""resample.py: spacing comparison, target shapes and trilinear resizing against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from dtml_deploy.resample import resize, spacing_differs, target_shape


def _trilinear_reference(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear interpolation in float64 with align_corners=False (half-pixel centres, edges clamped)."""
    out = a.astype(np.float64)
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        w = src - lo
        a_lo, a_hi = np.take(out, lo, axis=axis), np.take(out, hi, axis=axis)
        bshape = [1] * out.ndim
        bshape[axis] = n_out
        out = a_lo * (1 - w.reshape(bshape)) + a_hi * w.reshape(bshape)
    return out


@pytest.mark.parametrize("shape", [(14, 9, 5), (3, 20, 8), (7, 7, 7)])
def test_resize_matches_float64_trilinear(rng: np.random.Generator, shape: tuple[int, int, int]) -> None:
    a = rng.standard_normal((7, 11, 6)).astype(np.float32)
    out = resize(a, shape)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, _trilinear_reference(a, shape), atol=2e-6)  # float32 arithmetic


def test_resize_to_the_same_shape_is_the_identity(rng: np.random.Generator) -> None:
    a = rng.standard_normal((5, 6, 7)).astype(np.float64)
    out = resize(a, a.shape)
    assert out.dtype == np.float32 and np.array_equal(out, a.astype(np.float32))


def test_resize_keeps_a_linear_ramp_inside_the_volume() -> None:
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 4, 4)).copy()
    up = resize(ramp, (16, 4, 4))
    # interior samples at half-pixel centres lie on the same line; the ends are clamped to the edge values
    centres = (np.arange(16) + 0.5) / 2 - 0.5
    np.testing.assert_allclose(up[1:-1, 0, 0], centres[1:-1], atol=1e-6)
    assert up[0, 0, 0] == 0 and up[-1, 0, 0] == 7


def test_target_shape_covers_the_same_extent() -> None:
    assert target_shape((100, 80, 40), (1.25, 1.25, 2.5), (0.625, 0.625, 0.625)) == (200, 160, 160)
    assert target_shape((3, 3, 3), (0.1, 0.1, 0.1), (1.0, 1.0, 1.0)) == (1, 1, 1)  # never an empty axis


def test_spacing_differs_is_relative() -> None:
    assert not spacing_differs((0.625, 0.625, 0.625), (0.6252, 0.625, 0.625))  # 3e-4 relative
    assert spacing_differs((0.625, 0.625, 0.625), (0.63, 0.625, 0.625))
    assert spacing_differs((1.0, 1.0, 1.0), (1.0, 1.0, 2.0))
