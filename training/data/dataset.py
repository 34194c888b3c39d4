"""Patches from the RAM cache for the DataLoader, and the collate that keeps labeled cases first."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from dtml_training.data.augment import random_patch
from dtml_training.data.cache import VolumeCache
from dtml_training.data.sampler import Key
from dtml_training.data.sdm import signed_distance_map


@dataclass
class Batch:
    image: torch.Tensor  # [B, 1, X, Y, Z] float32, labeled cases first
    label: torch.Tensor  # [B_labeled, 1, X, Y, Z] uint8
    sdm: torch.Tensor | None  # [B_labeled, 1, X, Y, Z] float32, ground-truth SDM (dis supervision only)

    def pin_memory(self) -> Batch:
        return Batch(self.image.pin_memory(), self.label.pin_memory(),
                     None if self.sdm is None else self.sdm.pin_memory())


class PatchDataset(Dataset):
    """Index i < n_labeled is a labeled case (image + label), otherwise an unlabeled image."""

    def __init__(self, cache: VolumeCache, patch: tuple[int, int, int], with_sdm: bool) -> None:
        self.cache = cache
        self.patch = tuple(patch)
        self.with_sdm = with_sdm

    def __len__(self) -> int:
        return len(self.cache.images)

    def __getitem__(self, key: Key) -> dict[str, np.ndarray]:
        index, seed = key
        rng = np.random.default_rng(seed)
        if index < self.cache.n_labeled:
            img, lab = random_patch([self.cache.images[index], self.cache.labels[index]], self.patch, rng)
            item = {"image": img, "label": lab}
            if self.with_sdm:
                item["sdm"] = signed_distance_map(lab)
            return item
        (img,) = random_patch([self.cache.images[index]], self.patch, rng)
        return {"image": img}


def collate(items: list[dict[str, np.ndarray]]) -> Batch:
    """Stack images; stack labels (and SDMs) of the items that have them (the labeled ones, first)."""
    image = torch.from_numpy(np.stack([it["image"] for it in items])[:, None].astype(np.float32))
    labeled = [it for it in items if "label" in it]
    label = torch.from_numpy(np.stack([it["label"] for it in labeled])[:, None])
    sdm = None
    if labeled and "sdm" in labeled[0]:
        sdm = torch.from_numpy(np.stack([it["sdm"] for it in labeled])[:, None].astype(np.float32))
    return Batch(image, label, sdm)
