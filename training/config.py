"""Training configuration: one typed dataclass, filled from a named recipe and CLI overrides."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from dtml_deploy.checks import finite_in, int_at_least, is_int, require
from dtml_deploy.config import ModelConfig, NetConfig
from dtml_deploy.intensity import POLICIES
from dtml_training.losses import SUPERVISIONS, ConsistencyConfig, Supervision

Amp = Literal["auto", "bf16", "fp16", "none"]
AMPS: tuple[str, ...] = get_args(Amp)


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a run (defaults: the paper's DTML recipe)."""

    recipe: str = "dtml"
    # data
    labeled: int = 16  # number of labeled cases (splits.json's labeled_<n>, else the first n)
    unlabeled: int | None = None  # None: all remaining cases; 0: labeled only
    val_cases: int = 0  # carved from the end of the non-labeled list, excluded from training
    labeled_bs: int = 2  # per rank; W torchrun ranks train on a global batch of W * labeled_bs
    unlabeled_bs: int = 2  # per rank, as labeled_bs
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
        self._check_counts()
        if self.supervision not in SUPERVISIONS:
            raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {self.supervision!r}")
        if not (self.train_seg or self.train_dis):
            raise ValueError("at least one of the two networks must be trained")
        if self.consistency and not (self.train_seg and self.train_dis):
            raise ValueError("the consistency loss needs both networks")
        if self.unlabeled_bs and self.unlabeled == 0:
            raise ValueError("unlabeled_bs > 0 needs unlabeled cases (set --unlabeled-bs 0)")
        if self.unlabeled_bs == 0 and self.unlabeled:
            raise ValueError(f"unlabeled={self.unlabeled} cases would never be drawn with unlabeled_bs 0")
        if self.amp not in AMPS:
            raise ValueError(f"amp must be auto, bf16, fp16 or none, got {self.amp!r}")
        if self.intensity not in POLICIES:
            raise ValueError(f"intensity must be one of {POLICIES}, got {self.intensity!r}")
        self._check_optimisation()
        self.model_config()  # validates patch, n_filters, norm, dropout, k

    def _check_counts(self) -> None:
        """Case counts, batch sizes and intervals: whole numbers in range."""
        if not (is_int(self.labeled) and self.labeled >= 1):
            raise ValueError(f"labeled must be an integer >= 1 (every recipe needs labeled cases), "
                             f"got {self.labeled!r}")
        require(len(self.patch) == 3 and all(is_int(p) and p >= 16 and p % 16 == 0 for p in self.patch), "patch",
                "3 multiples of 16 (the V-Net halves each axis 4 times)", self.patch)
        if self.unlabeled is not None:
            int_at_least("unlabeled", self.unlabeled, 0)
        int_at_least("val_cases", self.val_cases, 0)
        int_at_least("labeled_bs", self.labeled_bs, 1)
        int_at_least("unlabeled_bs", self.unlabeled_bs, 0)
        int_at_least("iterations", self.iterations, 1)
        int_at_least("workers", self.workers, -1)
        int_at_least("checkpoint_every", self.checkpoint_every, 0)
        int_at_least("val_every", self.val_every, 1)
        require(is_int(self.seed) and 0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)", self.seed)

    def _check_optimisation(self) -> None:
        """SGD and schedule values: finite and in the range where they mean something."""
        finite_in("lr", self.lr, 0.0, low_open=True)
        finite_in("momentum", self.momentum, 0.0, 1.0, high_open=True)
        finite_in("weight_decay", self.weight_decay, 0.0)
        int_at_least("lr_step", self.lr_step, 1)
        finite_in("lr_gamma", self.lr_gamma, 0.0, 1.0, low_open=True)
        finite_in("k", self.k, 0.0, low_open=True)
        finite_in("dropout", self.dropout, 0.0, 1.0, high_open=True)

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


# The help of each `dtml train` option, in the order `--help` lists them; the CLI builds one option per key
# (type, choices and default from the field it names in TrainConfig or ConsistencyConfig).
OPTION_HELP: dict[str, str] = {
    "labeled": "Number of labeled cases (16 or 8 in the paper)",
    "unlabeled": "Number of unlabeled cases (default: all others)",
    "val_cases": "Validation cases carved from the non-labeled list",
    "iterations": "Training iterations",
    "labeled_bs": "Labeled patches per batch (per rank under torchrun: the global batch is ranks x this)",
    "unlabeled_bs": "Unlabeled patches per batch (per rank under torchrun: the global batch is ranks x this)",
    "patch": "Patch size X Y Z",
    "n_filters": "V-Net width",
    "norm": "Normalisation layers",
    "supervision": "M_d supervision",
    "k": "Sharpness of sigmoid(-k*sdm)",
    "schedule": "Consistency ramp-up: released code or paper text",
    "lambda_max": "Consistency weight maximum (default: the schedule's, 1.0 code, 0.1 paper)",
    "lr": "Base learning rate",
    "lr_step": "Iterations between learning-rate steps",
    "lr_gamma": "Learning-rate factor at each step",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "dropout": "Dropout3d probability in training",
    "rampup_period": "code schedule: iterations per ramp-up step",
    "rampup_length": "code schedule: ramp-up length in steps",
    "consistency": "Use the cross-task consistency loss",
    "seed": "Random seed",
    "deterministic": "Deterministic algorithms (slower on GPU)",
    "device": "auto | cpu | cuda | cuda:N",
    "amp": "Mixed precision on CUDA",
    "workers": "DataLoader workers (-1: auto)",
    "checkpoint_every": "Checkpoint interval in iterations",
    "val_every": "Validation interval in iterations",
}
# Fields set by the recipe alone (or, for consistency_cfg, through its own fields above).
NOT_OPTIONS: tuple[str, ...] = ("recipe", "intensity", "train_seg", "train_dis", "channels_last", "consistency_cfg")


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
