"""intensity.py: the auto policy's z-score detection and whole-scan z-scoring."""

from __future__ import annotations

import numpy as np
import pytest

from dtml_deploy.config import IntensityConfig
from dtml_deploy.errors import InputError
from dtml_deploy.intensity import looks_zscored, normalise, prepare
from dtml_deploy.io.volume import read_volume


def test_real_la_crops_look_zscored(sample_root) -> None:
    for path in sorted((sample_root / "images").glob("*.nii.gz")):
        assert looks_zscored(read_volume(path).array), path.name


@pytest.mark.parametrize("make", [
    lambda r: r.uniform(0, 1, (20, 20, 10)),  # [0, 1]-scaled image
    lambda r: r.uniform(0, 2000, (20, 20, 10)),  # MRI magnitudes
    lambda r: r.uniform(-1000, 1500, (20, 20, 10)),  # CT in HU: negative, but std far from 1
    lambda r: r.standard_normal((20, 20, 10)) * 0.05,  # negative, mean 0, but almost no spread
], ids=["unit-range", "magnitudes", "ct-hu", "tiny-std"])
def test_raw_scans_do_not_look_zscored(rng: np.random.Generator, make) -> None:
    assert not looks_zscored(make(rng))


def test_normalise_is_a_float64_zscore(rng: np.random.Generator) -> None:
    x = rng.uniform(100, 900, (16, 12, 8)).astype(np.float32)
    out = normalise(x, IntensityConfig())
    ref = (x.astype(np.float64) - x.mean(dtype=np.float64)) / x.std(dtype=np.float64)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_prepare_applies_the_policy(rng: np.random.Generator) -> None:
    raw = rng.uniform(0, 500, (16, 12, 8)).astype(np.float32)
    z, how = prepare(raw, IntensityConfig(), "auto")
    assert how == "zscore" and abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-5
    again, how = prepare(z, IntensityConfig(), "auto")
    assert how == "as stored" and np.array_equal(again, z)
    forced, how = prepare(z + 5.0, IntensityConfig(), "zscore")  # forced even where auto would keep it
    assert how == "zscore" and np.allclose(forced, z, atol=1e-5)
    kept, how = prepare(raw, IntensityConfig(), "none")
    assert how == "as stored" and np.array_equal(kept, raw)


def test_constant_or_unknown_policy_is_refused() -> None:
    with pytest.raises(InputError, match="constant image"):
        prepare(np.full((8, 8, 8), 3.0, np.float32), IntensityConfig(), "auto", "c.nii.gz")
    with pytest.raises(ValueError, match="intensity policy"):
        prepare(np.zeros((8, 8, 8), np.float32), IntensityConfig(), "bogus")  # type: ignore[arg-type]
