"""Random crop with padding, rot90 in the x-y plane and a flip, as the paper's code (UA-MT's
RandomRotFlip + RandomCrop).

The code rotates/flips the whole volume and then crops. We crop first and rotate the small patch:
for uniformly drawn crop corners this gives the same distribution of patches (when k is odd the crop
is taken with x and y swapped, so the rotated patch has the requested shape) at a fraction of the cost.
Volumes smaller than the patch are zero-padded as the code does: (patch - size) // 2 + 3 on each side.
"""

from __future__ import annotations

import numpy as np


def pad_to(arrays: list[np.ndarray], patch: tuple[int, int, int]) -> list[np.ndarray]:
    """Pad every array on axes where the volume is not larger than the patch (the code's rule)."""
    shape = arrays[0].shape
    pads = []
    for s, p in zip(shape, patch):
        if s <= p:
            w = max((p - s) // 2 + 3, 0)
            pads.append((w, w))
        else:
            pads.append((0, 0))
    if not any(a or b for a, b in pads):
        return arrays
    return [np.pad(a, pads, mode="constant", constant_values=0) for a in arrays]


def random_patch(arrays: list[np.ndarray], patch: tuple[int, int, int],
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Crop the same random window from every array, then the same rot90 (k in 0..3) and flip
    (axis 0 or 1). Returns contiguous arrays of shape `patch`."""
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))
    crop = (patch[1], patch[0], patch[2]) if k % 2 else patch
    arrays = pad_to(arrays, crop)
    shape = arrays[0].shape
    corner = [int(rng.integers(0, shape[a] - crop[a] + 1)) for a in range(3)]
    sl = tuple(slice(c, c + n) for c, n in zip(corner, crop))
    out = []
    for a in arrays:
        p = np.rot90(a[sl], k, axes=(0, 1))
        out.append(np.ascontiguousarray(np.flip(p, axis=axis)))
    return out
