"""Load and check every training volume once, keeping them in RAM for the data loader.

Checks run before training starts: a missing or unreadable file, NaN/inf voxels, a constant image,
an image/label shape mismatch and a non-binary label are each a `DataError` naming the case.
Volumes smaller than the patch are accepted: the crop pads them (documented in augment.py).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dtml_deploy.config import IntensityConfig
from dtml_deploy.errors import DataError, InputError
from dtml_deploy.intensity import Policy, prepare
from dtml_deploy.io.datasets import ArrayRef, LabeledCase, Split, UnlabeledCase
from dtml_deploy.io.refs import read_ref


def read_array(ref: ArrayRef, check_finite: bool = True) -> np.ndarray:
    """Read one array as float32 (X, Y, Z); errors become `DataError`."""
    try:
        vol = read_ref(ref, check_finite=check_finite)
    except InputError as e:
        raise DataError(str(e)) from None
    return vol.array


def load_image(case: LabeledCase | UnlabeledCase, intensity: Policy = "auto") -> np.ndarray:
    """The image of a case, checked for finite, non-constant values, normalised as inference will
    normalise it (LA2018 is already z-scored and stays as stored; see dtml_deploy/intensity.py)."""
    img = read_array(case.image)
    try:
        img, _ = prepare(img, IntensityConfig(), intensity, str(case.image.path))
    except InputError as e:
        raise DataError(str(e)) from None
    return img


def load_label(case: LabeledCase, shape: tuple[int, ...]) -> np.ndarray:
    """The label of a labeled case as uint8 {0, 1}, checked against the image shape."""
    lab = read_array(case.label)
    if lab.shape != shape:
        raise DataError(f"case {case.case_id}: image shape {shape} != label shape {lab.shape}")
    values = np.unique(lab)
    if not np.isin(values, (0.0, 1.0)).all():
        raise DataError(f"{case.label.path}: label is not binary (values {values[:6].tolist()}...); "
                        "convert it to {0, 1}")
    return lab.astype(np.uint8)


@dataclass
class VolumeCache:
    """Images (float32) of all training cases; labels (uint8) of labeled cases only."""

    images: list[np.ndarray]
    labels: list[np.ndarray]  # one per labeled case; labeled cases come first in `images`
    case_ids: list[str]
    n_labeled: int


def load_training_volumes(split: Split, threads: int = 8, intensity: Policy = "auto") -> VolumeCache:
    """Read labeled then unlabeled images, and the labeled cases' labels, in parallel."""
    cases: list[LabeledCase | UnlabeledCase] = [*split.labeled, *split.unlabeled]

    def one(case: LabeledCase | UnlabeledCase) -> tuple[np.ndarray, np.ndarray | None]:
        img = load_image(case, intensity)
        lab = load_label(case, img.shape) if isinstance(case, LabeledCase) else None
        return img, lab

    with ThreadPoolExecutor(max(1, threads)) as pool:
        loaded = list(pool.map(one, cases))
    images = [img for img, _ in loaded]
    labels = [lab for _, lab in loaded[: len(split.labeled)]]
    return VolumeCache(images, labels, [c.case_id for c in cases], len(split.labeled))  # type: ignore[arg-type]


def fingerprint(split: Split) -> str:
    """SHA-256 over case ids and file bytes: images of all cases, labels of labeled cases only."""
    h = hashlib.sha256()
    for case in [*split.labeled, *split.unlabeled]:
        h.update(case.case_id.encode())
        h.update(case.image.path.read_bytes())
        if isinstance(case, LabeledCase):
            h.update(case.label.path.read_bytes())
    return h.hexdigest()[:16]
