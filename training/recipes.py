"""Named recipes, one per row of the paper's tables; every field can be overridden afterwards."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dtml_training.config import TrainConfig

# Labeled-only rows train on batches of 4 labeled patches (UA-MT's supervised baseline batch size).
RECIPES: dict[str, dict[str, Any]] = {
    "dtml": {},  # 16 labeled / 64 unlabeled, M_d supervised by `mask` (paper Table 3, 90.12 Dice)
    "dtml-dis": {"supervision": "dis"},
    "dtml-dis-mask": {"supervision": "dis+mask"},
    "dtml-labeled-only": {"unlabeled": 0, "labeled_bs": 4, "unlabeled_bs": 0},
    "seg-only": {"unlabeled": 0, "labeled_bs": 4, "unlabeled_bs": 0, "train_dis": False, "consistency": False},
    "sdm-only": {"unlabeled": 0, "labeled_bs": 4, "unlabeled_bs": 0, "train_seg": False, "consistency": False},
    "full": {"labeled": 80, "unlabeled": 0, "labeled_bs": 4, "unlabeled_bs": 0, "train_dis": False,
             "consistency": False},
}

DESCRIPTIONS = {
    "dtml": "DTML, 16 labeled + 64 unlabeled, M_d supervised by mask (paper: 90.12 Dice)",
    "dtml-dis": "DTML with M_d supervised by SDM regression (paper: 89.72)",
    "dtml-dis-mask": "DTML with M_d supervised by dis + mask (paper: 89.89)",
    "dtml-labeled-only": "both networks and L_con on the 16 labeled cases only (paper: 89.17)",
    "seg-only": "V-Net lower bound: M_s alone on 16 labeled cases (paper: 86.03)",
    "sdm-only": "M_d alone on 16 labeled cases (paper: 88.69)",
    "full": "V-Net upper bound: M_s on all 80 labeled cases (paper: 91.14)",
}


def recipe(name: str, **overrides: Any) -> TrainConfig:
    """The recipe's config with `overrides` (None values are ignored) applied."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    base = {**RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}}
    if base.get("unlabeled_bs", TrainConfig.unlabeled_bs) == 0 and base.get("unlabeled") is None:
        base["unlabeled"] = 0  # no unlabeled batch: record (and load) no unlabeled cases
    return replace(TrainConfig(), recipe=name, **base)
