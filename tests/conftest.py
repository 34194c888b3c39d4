"""Shared fixtures: the shipped real-data sample, the full LA2018 set when present, tiny bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dtml_deploy.bundle import Bundle
from dtml_deploy.io.datasets import find_la2018
from tests.bundles import random_bundle

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data" / "la_sample"  # 3 real LA cases, cropped to 80x72x56, shipped in git


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The small real sample the project ships (always present)."""
    return SAMPLE


@pytest.fixture(scope="session")
def la2018() -> Path:
    """The full LA2018 training set; tests that need it skip when it is absent."""
    root = find_la2018()
    if root is None:
        pytest.skip("LA2018 not found: set DTML_DATA or place it at ../shared/data/LA2018")
    return root


def make_bundle(n_filters: int = 4, patch: tuple[int, int, int] = (32, 32, 32), k: float = 1500.0,
                seed: int = 0, centre_on: np.ndarray | None = None) -> Bundle:
    """The project's random bundle (tests/bundles.py), its heads centred on `centre_on` when
    given (so that mask checks can fail) and left as initialised otherwise."""
    return random_bundle(n_filters, patch, seed=seed, k=k, centre_heads=centre_on is not None, centre_on=centre_on)


@pytest.fixture
def tiny_bundle() -> Bundle:
    return make_bundle()


@pytest.fixture
def tiny_bundle_dir(tmp_path: Path, tiny_bundle: Bundle) -> Path:
    return tiny_bundle.save(tmp_path / "bundle")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def sample_ids(sample_root: Path) -> list[str]:
    """The case ids of a sample folder (its images/<ID>.nii.gz)."""
    return sorted(p.name[: -len(".nii.gz")] for p in (sample_root / "images").glob("*.nii.gz"))


def crop_real_case(sample_root: Path, cid: str, size: tuple[int, int, int], folder: str = "images"):  # -> Nifti1Image
    """A real sub-volume centred on the atrium; nibabel's slicer keeps the world geometry."""
    import nibabel as nib
    from scipy import ndimage as ndi

    img = nib.load(str(sample_root / folder / f"{cid}.nii.gz"))
    lab = np.asarray(nib.load(str(sample_root / "labels" / f"{cid}.nii.gz")).dataobj) > 0
    centre = ndi.center_of_mass(lab)
    start = [int(np.clip(round(c - s / 2), 0, n - s)) for c, s, n in zip(centre, size, img.shape)]
    return img.slicer[tuple(slice(a, a + s) for a, s in zip(start, size))]


def centred_bundle_dir(sample_root: Path, folder: Path, patch: int = 32) -> Path:
    """A saved random bundle (n_filters 4, patch^3) whose heads are centred on a real crop: its masks are
    partly foreground, partly not."""
    crop = crop_real_case(sample_root, sample_ids(sample_root)[0], (patch,) * 3).get_fdata(dtype=np.float32)
    return make_bundle(patch=(patch,) * 3, centre_on=crop).save(folder / "bundle")
