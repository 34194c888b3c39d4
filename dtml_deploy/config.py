"""Typed configuration shared by training, export and inference.

A `ModelConfig` travels inside every bundle (config.json) and every exported artifact, so a model
describes itself: architecture, patch size, the SDM-to-mask sharpness k, intensity normalisation and
the voxel spacing the networks were trained at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Norm = Literal["batch", "instance", "group", "none"]
NORMS: tuple[str, ...] = ("batch", "instance", "group", "none")


@dataclass(frozen=True)
class NetConfig:
    """One V-Net (the UA-MT/DTC backbone)."""

    n_filters: int = 16  # channels of the first stage; stages use 1x, 2x, 4x, 8x, 16x
    norm: Norm = "batch"  # normalisation after every convolution
    in_channels: int = 1
    dropout: float = 0.5  # Dropout3d on the bottleneck and the last decoder features, training only

    def __post_init__(self) -> None:
        if self.n_filters < 1:
            raise ValueError(f"n_filters must be >= 1, got {self.n_filters}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.norm == "group" and self.n_filters % 4:
            raise ValueError("group norm needs n_filters divisible by 4")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class IntensityConfig:
    """How a raw scan is turned into network input: z-score over the whole scan (as LA2018 was made)."""

    mode: Literal["zscore", "none"] = "zscore"


@dataclass(frozen=True)
class ModelConfig:
    """Everything inference needs to know about a trained pair."""

    net: NetConfig = field(default_factory=NetConfig)
    patch_size: tuple[int, int, int] = (112, 112, 80)
    k: float = 1500.0  # p_dis = sigmoid(-k * sdm)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    spacing: tuple[float, float, float] = (0.625, 0.625, 0.625)  # mm, axis order of the arrays

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or any(int(p) < 16 or int(p) % 16 for p in self.patch_size):
            raise ValueError(f"patch_size must be 3 multiples of 16 (V-Net downsamples 4 times), "
                             f"got {self.patch_size}")
        if not self.k > 0:
            raise ValueError(f"k must be positive, got {self.k}")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be 3 positive numbers, got {self.spacing}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(
            net=NetConfig(**d.get("net", {})),
            patch_size=tuple(int(p) for p in d.get("patch_size", (112, 112, 80))),  # type: ignore[arg-type]
            k=float(d.get("k", 1500.0)),
            intensity=IntensityConfig(**d.get("intensity", {})),
            spacing=tuple(float(s) for s in d.get("spacing", (0.625,) * 3)),  # type: ignore[arg-type]
        )
