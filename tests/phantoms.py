"""Scans that are not LA LGE-MRI, for the QC score's out-of-distribution checks: generated phantoms (CT,
cine-MRI frame, noise) and a real brain MRI that ships inside nibabel's test data (offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _ellipse(shape: tuple[int, ...], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    x, y = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    inside = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 < 1
    return np.repeat(inside[:, :, None], shape[2], axis=2)


def ct_phantom(seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """An abdominal CT slab in Hounsfield units at 1 mm (one network window once resampled): air around
    the body (-1000), fat (-100), soft tissue (40), two lung bases (-850), a vertebra and ribs (700),
    scanner noise (sd 15 HU)."""
    rng = np.random.default_rng(seed)
    shape = (70, 70, 50)
    ct = np.full(shape, -1000.0, np.float32)
    body = _ellipse(shape, (35, 35), (33, 27))
    ct[body] = -100.0
    ct[_ellipse(shape, (35, 35), (29, 23))] = 40.0
    for cx in (21, 49):
        ct[_ellipse(shape, (cx, 29), (8, 10)) & body] = -850.0
    ct[_ellipse(shape, (35, 52), (5, 5))] = 700.0
    for cx in (8, 62):
        ct[_ellipse(shape, (cx, 35), (2, 7)) & body] = 700.0
    ct += rng.normal(0.0, 15.0, shape).astype(np.float32)
    return ct, (1.0, 1.0, 1.0)


def cine_phantom(seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One frame of a short-axis bSSFP cine stack (one network window once resampled): 6 thick slices
    (8 mm) of 1.5 mm pixels, bright blood pools in both ventricles, a mid-grey myocardial ring, dark lungs,
    magnitude noise (Rician-like)."""
    rng = np.random.default_rng(seed)
    shape = (46, 46, 6)
    img = np.full(shape, 5.0, np.float32)
    img[_ellipse(shape, (23, 23), (22, 18))] = 60.0  # chest wall and body
    for cx in (11, 35):
        img[_ellipse(shape, (cx, 16), (8, 10))] = 15.0  # lungs
    img[_ellipse(shape, (25, 26), (9, 9))] = 90.0  # myocardium
    img[_ellipse(shape, (25, 26), (6, 6))] = 250.0  # LV blood pool
    img[_ellipse(shape, (15, 26), (4, 7))] = 240.0  # RV blood pool
    noisy = np.hypot(img + rng.normal(0, 6, shape), rng.normal(0, 6, shape))
    return noisy.astype(np.float32), (1.5, 1.5, 8.0)


def noise_volume(seed: int = 0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Pure Gaussian noise at the model's spacing."""
    return np.random.default_rng(seed).standard_normal((112, 112, 80)).astype(np.float32), (0.625, 0.625, 0.625)


def brain_mri() -> tuple[np.ndarray, tuple[float, float, float]] | None:
    """nibabel's bundled anatomical brain MRI (33 x 41 x 25 at 2 mm), or None when nibabel lacks it."""
    import nibabel as nib

    path = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    if not path.exists():
        return None
    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=np.float32)), tuple(float(z) for z in img.header.get_zooms()[:3])  # type: ignore[return-value]
