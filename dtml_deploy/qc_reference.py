"""The bundle's `qc` block (config.json): what a good case looks like, parsed strictly.

Both the QC score (dtml_deploy/qc.py) and the bundle's schema check (dtml_deploy/bundle_schema.py) read
it from here, so neither imports the other. Every field is checked for type and range and a failure
names it (`qc.threshold must be a finite number in [0, 1], got -0.5`): a bad value must stop the bundle
from loading, not quietly turn the flag off or fail every case later. A bundle without a `qc` key runs
without QC (the run says so once); a present but empty or partial block is refused, naming the field.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from dtml_deploy.checks import finite, finite_in, require

# Quantiles of the standardised intensity histogram that describe its shape (qc.intensity_quantiles).
QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
# Model-side features the agreement part may use: head agreements in [0, 1], higher for a better case,
# that every run measures (tta_spread exists only with --tta, so it cannot drive the score).
AGREEMENT_FEATURES: tuple[str, ...] = ("agreement", "band_agreement", "band_soft_agreement")
MAX_SOURCE_CHARS = 1000


@dataclass(frozen=True)
class QCReference:
    """What a good case looks like, stored in a bundle's config.json under `qc`."""

    volume_ml: tuple[float, float]  # smallest and largest training label volume
    intensity_quantiles: tuple[float, ...]  # median over training scans of the standardised QUANTILES
    intensity_distance: float  # largest distance of a training scan from that median
    point_mass: float  # largest point mass of a training scan (see qc.intensity_stats)
    smoothness: float  # smallest neighbour correlation of a training scan
    agreement_feature: str  # the model-side feature behind the `agreement` part (AGREEMENT_FEATURES)
    agreement_scale: tuple[float, float]  # that feature mapped linearly: (value -> 0, value -> 1), clipped
    threshold: float  # a score below it flags the case
    source: str = ""  # which cases the statistics and the threshold come from

    def __post_init__(self) -> None:
        lo, hi = _pair(self.volume_ml, "volume_ml")
        require(0 <= lo <= hi and hi > 0, "volume_ml", "[smallest, largest] with 0 <= smallest <= largest, "
                "largest > 0", list(self.volume_ml))
        q = self.intensity_quantiles
        require(isinstance(q, tuple) and len(q) == len(QUANTILES) and all(finite(v) for v in q)
                and all(a <= b for a, b in itertools.pairwise(q)), "intensity_quantiles",
                f"{len(QUANTILES)} finite numbers in increasing order (the quantiles {list(QUANTILES)})",
                _shown(q))
        finite_in("intensity_distance", self.intensity_distance, 0.0, low_open=True)
        finite_in("point_mass", self.point_mass, 0.0, 1.0, low_open=True)
        finite_in("smoothness", self.smoothness, -1.0, 1.0, high_open=True)
        require(self.agreement_feature in AGREEMENT_FEATURES, "agreement_feature",
                f"one of {list(AGREEMENT_FEATURES)}", self.agreement_feature)
        a, b = _pair(self.agreement_scale, "agreement_scale")
        require(0 <= a < b <= 1, "agreement_scale", "[value -> 0, value -> 1] with 0 <= first < second <= 1",
                _shown(self.agreement_scale))
        finite_in("threshold", self.threshold, 0.0, 1.0)
        require(isinstance(self.source, str) and len(self.source) <= MAX_SOURCE_CHARS, "source",
                f"a string of at most {MAX_SOURCE_CHARS} characters", _shown(self.source))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QCReference:
        """Parse the JSON form: known keys only, every field present (but `source`), each checked; a
        failure is a ValueError naming the field (`qc.volume_ml must be ...`)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"qc must be a JSON object, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"qc: unknown key(s) {unknown}; known: {known}")
        missing = [k for k in known if k != "source" and k not in d]
        if missing:
            raise ValueError(f"qc.{missing[0]} is missing (qc needs {known[:-1]}; remove the whole qc block "
                             "to run without QC)")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"qc.{e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pair(value: Any, name: str) -> tuple[float, float]:
    require(isinstance(value, tuple) and len(value) == 2 and all(finite(v) for v in value), name,
            "a list of 2 finite numbers", _shown(value))
    return value


class _Shown:
    """A value as an error message shows it: a long list or string by its length, not its contents."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        v = self.value
        if isinstance(v, list | tuple) and len(v) > 12:
            return f"a list of {len(v)} values"
        if isinstance(v, str) and len(v) > 80:
            return f"a string of {len(v)} characters"
        return repr(list(v) if isinstance(v, tuple) else v)


def _shown(value: Any) -> _Shown:
    return _Shown(value)


def reference_of(meta: Mapping[str, Any]) -> QCReference | None:
    """A bundle's calibrated QC reference (its config.json's `qc`), or None for a bundle without the key
    (a bundle that has the key was validated when it loaded; an invalid block never gets here)."""
    return QCReference.from_dict(meta["qc"]) if "qc" in meta else None


def no_qc_note(meta: Mapping[str, Any]) -> str | None:
    """The run's one line for a bundle without a `qc` block, None when it has one."""
    if "qc" in meta:
        return None
    return "note: this bundle has no `qc` block: cases get no QC score and none is flagged"
