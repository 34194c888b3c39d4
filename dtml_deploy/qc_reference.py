"""The QC reference a bundle carries in its config.json under `qc` (how the score of dtml_deploy/qc.py
is calibrated): plain data, below the bundle's schema check that validates it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class QCReference:
    """What a good case looks like, stored in a bundle's config.json under `qc`."""

    volume_ml: tuple[float, float]  # smallest and largest training label volume
    intensity_quantiles: tuple[float, ...]  # median over training scans of the standardised quantiles
    intensity_distance: float  # largest distance of a training scan from that median
    point_mass: float  # largest point mass of a training scan (see intensity_stats)
    smoothness: float  # smallest neighbour correlation of a training scan
    agreement_feature: str  # the model-side feature behind the `agreement` part (see head_features)
    agreement_scale: tuple[float, float]  # that feature mapped linearly: (value -> 0, value -> 1), clipped
    threshold: float  # a score below it flags the case
    source: str = ""  # which cases the statistics and the threshold come from

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QCReference:
        return cls(volume_ml=tuple(d["volume_ml"]), intensity_quantiles=tuple(d["intensity_quantiles"]),  # type: ignore[arg-type]
                   intensity_distance=float(d["intensity_distance"]), point_mass=float(d["point_mass"]),
                   smoothness=float(d["smoothness"]),
                   agreement_feature=str(d["agreement_feature"]),
                   agreement_scale=tuple(d["agreement_scale"]), threshold=float(d["threshold"]),  # type: ignore[arg-type]
                   source=str(d.get("source", "")))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
