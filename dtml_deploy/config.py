"""Typed configuration shared by training, export and inference.

A `ModelConfig` travels inside every bundle (config.json) and every exported artifact, so a model
describes itself: architecture, patch size, the SDM-to-mask sharpness k, intensity normalisation and
the voxel spacing the networks were trained at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from dtml_deploy.checks import finite, finite_in, int_at_least, is_int, require

Norm = Literal["batch", "instance", "group", "none"]
NORMS: tuple[str, ...] = ("batch", "instance", "group", "none")
INTENSITY_MODES: tuple[str, ...] = ("zscore", "none")


@dataclass(frozen=True)
class NetConfig:
    """One V-Net (the UA-MT/DTC backbone)."""

    n_filters: int = 16  # channels of the first stage; stages use 1x, 2x, 4x, 8x, 16x
    norm: Norm = "batch"  # normalisation after every convolution
    in_channels: int = 1
    dropout: float = 0.5  # Dropout3d on the bottleneck and the last decoder features, training only

    def __post_init__(self) -> None:
        if not (is_int(self.n_filters) and self.n_filters >= 1):
            raise ValueError(f"n_filters must be an integer >= 1, got {self.n_filters!r}")
        int_at_least("in_channels", self.in_channels, 1)
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.norm == "group" and self.n_filters % 4:
            raise ValueError("group norm needs n_filters divisible by 4")
        finite_in("dropout", self.dropout, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class IntensityConfig:
    """How a raw scan is turned into network input: z-score over the whole scan (as LA2018 was made)."""

    mode: Literal["zscore", "none"] = "zscore"

    def __post_init__(self) -> None:
        if self.mode not in INTENSITY_MODES:
            raise ValueError(f"mode must be one of {INTENSITY_MODES}, got {self.mode!r}")


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
        if not (finite(self.k) and self.k > 0):
            raise ValueError(f"k must be a finite number > 0, got {self.k!r}")
        if len(self.spacing) != 3 or not all(finite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"spacing must be 3 finite numbers > 0, got {self.spacing}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Parse the JSON form strictly: every value is checked for type and range, unknown keys are
        refused, and a failure names the field (`model.net.norm must be ...`)."""
        _keys(d, {f.name for f in fields(cls)}, "model")
        net = d.get("net", {})
        _keys(net, {f.name for f in fields(NetConfig)}, "model.net")
        intensity = d.get("intensity", {})
        _keys(intensity, {f.name for f in fields(IntensityConfig)}, "model.intensity")
        patch = d.get("patch_size", [112, 112, 80])
        require(isinstance(patch, list | tuple) and len(patch) == 3 and all(is_int(p) for p in patch),
                "model.patch_size", "a list of 3 integers", patch)
        spacing = d.get("spacing", [0.625] * 3)
        require(isinstance(spacing, list | tuple) and len(spacing) == 3
                and all(finite(s) and s > 0 for s in spacing), "model.spacing", "3 finite numbers > 0", spacing)
        k = d.get("k", 1500.0)
        require(finite(k) and k > 0, "model.k", "a finite number > 0", k)
        net_cfg = _named("model.net.", NetConfig, net)
        intensity_cfg = _named("model.intensity.", IntensityConfig, intensity)
        return _named("model.", cls, {"net": net_cfg, "patch_size": tuple(patch), "k": float(k),
                                      "intensity": intensity_cfg, "spacing": tuple(float(s) for s in spacing)})


def _named(prefix: str, cls: type, values: dict[str, Any]) -> Any:
    """`cls(**values)` with the field's full JSON path in a validation error."""
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{prefix}{e}") from None


def _keys(d: Any, known: set[str], where: str) -> None:
    """`d` is a JSON object with no keys outside `known`."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object, got {type(d).__name__}")
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")

