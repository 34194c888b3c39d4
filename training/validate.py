"""Validation Dice on cases carved from the training list (never the test split)."""

from __future__ import annotations

import numpy as np
import torch

from dtml_deploy.bundle import Bundle
from dtml_deploy.config import ModelConfig
from dtml_deploy.io.datasets import LabeledCase
from dtml_deploy.metrics import dice
from dtml_deploy.nets.dual import DualTaskNet
from dtml_deploy.predictor import Predictor
from dtml_training.data.cache import load_image, load_label


def validate(net: DualTaskNet, model_cfg: ModelConfig, cases: tuple[LabeledCase, ...],
             device: torch.device) -> dict[str, float]:
    """Mean Dice of each head (overlap 0.5, Gaussian blending, largest component) over `cases`."""
    bundle = Bundle.from_net(net, model_cfg)
    # One segmenter per head, each running only its own network (no QC): every network runs once per case,
    # in fp32, without the CUDA inference extras (graph capture in the middle of training buys nothing).
    segmenters = {head: Predictor.load(bundle, backend="torch", device=str(device), precision="fp32", batch=2,
                                       head=head, qc=False, cuda_graphs=False, cudnn_fusion=False).segmenter
                  for head in ("seg", "sdm")}
    scores: dict[str, list[float]] = {head: [] for head in segmenters}
    for case in cases:
        img = load_image(case)
        lab = load_label(case, img.shape)
        for head, seg in segmenters.items():
            scores[head].append(dice(seg.segment_array(img).mask, lab))
    return {f"val_dice_{h}": float(np.mean(v)) for h, v in scores.items()}
