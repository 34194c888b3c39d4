"""Training configuration: one typed dataclass, filled from a named recipe and CLI overrides."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dtml_deploy.config import ModelConfig, NetConfig
from training.losses import SUPERVISIONS, ConsistencyConfig, Supervision

Amp = Literal["auto", "bf16", "fp16", "none"]


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a run (defaults: the paper's DTML recipe)."""

    recipe: str = "dtml"
    # data
    labeled: int = 16  # number of labeled cases (splits.json's labeled_<n>, else the first n)
    unlabeled: int | None = None  # None: all remaining cases; 0: labeled only
    val_cases: int = 0  # carved from the end of the non-labeled list, excluded from training
    labeled_bs: int = 2
    unlabeled_bs: int = 2
    patch: tuple[int, int, int] = (112, 112, 80)
    intensity: str = "auto"  # z-score volumes unless already z-scored, exactly as inference does
    # networks
    n_filters: int = 16
    norm: str = "batch"
    dropout: float = 0.5
    train_seg: bool = True
    train_dis: bool = True
    # losses
    supervision: Supervision = "mask"
    k: float = 1500.0
    consistency: bool = True
    consistency_cfg: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    # optimisation
    iterations: int = 6000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 2500
    lr_gamma: float = 0.1
    seed: int = 1337
    deterministic: bool = False
    # execution
    device: str = "auto"
    amp: Amp = "auto"  # auto: bf16 on CUDA, none (fp32) on CPU
    channels_last: bool = True  # channels_last_3d (CUDA and CPU)
    workers: int = -1  # DataLoader workers; -1: auto (min(8, cores - 1) on CUDA, 0 on CPU)
    checkpoint_every: int = 1000
    val_every: int = 1000

    def __post_init__(self) -> None:
        if self.supervision not in SUPERVISIONS:
            raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {self.supervision!r}")
        if not (self.train_seg or self.train_dis):
            raise ValueError("at least one of the two networks must be trained")
        if self.consistency and not (self.train_seg and self.train_dis):
            raise ValueError("the consistency loss needs both networks")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.labeled < 1:
            raise ValueError("labeled must be >= 1: every recipe needs labeled cases")
        if self.unlabeled_bs and self.unlabeled == 0:
            raise ValueError("unlabeled_bs > 0 needs unlabeled cases (set --unlabeled-bs 0)")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"amp must be auto, bf16, fp16 or none, got {self.amp!r}")
        self.model_config()  # validates patch, n_filters, norm, k

    @property
    def semi_supervised(self) -> bool:
        return self.unlabeled_bs > 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(net=NetConfig(n_filters=self.n_filters, norm=self.norm,  # type: ignore[arg-type]
                                         dropout=self.dropout),
                           patch_size=tuple(self.patch), k=self.k)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["consistency_cfg"] = ConsistencyConfig(**d.get("consistency_cfg", {}))
        d["patch"] = tuple(d["patch"])
        return cls(**d)


@dataclass(frozen=True)
class RunPaths:
    """Files a run writes under its output folder."""

    out: Path

    @property
    def bundle(self) -> Path:
        return self.out / "bundle"

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint"

    @property
    def log(self) -> Path:
        return self.out / "train_log.jsonl"
