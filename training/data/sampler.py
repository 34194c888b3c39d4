"""The two-stream batch sampler: `labeled_bs` labeled + `unlabeled_bs` unlabeled cases per batch.

Labeled cases are reshuffled every pass (a pass is len(labeled) // labeled_bs batches, as UA-MT's
TwoStreamBatchSampler); unlabeled cases cycle through their own permutations independently.
The batch of iteration t is a pure function of (seed, rank, t), and so is each sample's augmentation
seed: resuming at iteration t needs no sampler or worker state, and results do not depend on the
number of DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from dtml_deploy.errors import DataError

if TYPE_CHECKING:
    from dtml_deploy.io.datasets import Split
    from training.config import TrainConfig

Key = tuple[int, int]  # (dataset index, augmentation seed)


def _perm(seed: int, rank: int, stream: int, n_pass: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, rank, stream, n_pass]).permutation(n)


def check_batch_composition(split: Split, cfg: TrainConfig) -> None:
    """Refuse a split that cannot fill the configured batches, saying where the cases went."""
    n_l, n_u, n_v = len(split.labeled), len(split.unlabeled), len(split.validation)
    if cfg.labeled_bs > n_l:
        raise DataError(f"labeled_bs={cfg.labeled_bs} needs at least {cfg.labeled_bs} labeled cases, the split "
                        f"has {n_l}; lower --labeled-bs or raise --labeled")
    if cfg.unlabeled_bs and n_u == 0:
        raise DataError(f"unlabeled_bs={cfg.unlabeled_bs} needs unlabeled cases, but the {n_l + n_v} cases of "
                        f"the data set all went to the {n_l} labeled and {n_v} validation cases; lower "
                        "--labeled or --val-cases, add cases, or train labeled-only with --unlabeled-bs 0")


class TwoStreamSampler:
    """Yields, for iterations start..stop-1, a list of keys: labeled first, then unlabeled."""

    def __init__(self, n_labeled: int, n_unlabeled: int, labeled_bs: int, unlabeled_bs: int,
                 seed: int, start: int, stop: int, rank: int = 0) -> None:
        self.check(n_labeled, n_unlabeled, labeled_bs, unlabeled_bs)
        self.n_l, self.n_u = n_labeled, n_unlabeled
        self.l_bs, self.u_bs = labeled_bs, unlabeled_bs
        self.seed, self.rank = seed, rank
        self.start, self.stop = start, stop

    @staticmethod
    def check(n_labeled: int, n_unlabeled: int, labeled_bs: int, unlabeled_bs: int) -> None:
        """Refuse a batch composition the cases cannot fill."""
        if n_labeled < labeled_bs or labeled_bs < 1:
            raise ValueError(f"need at least labeled_bs={labeled_bs} >= 1 labeled cases, have {n_labeled}")
        if unlabeled_bs and n_unlabeled < 1:
            raise ValueError("unlabeled_bs > 0 but there are no unlabeled cases")

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def batch(self, t: int) -> list[Key]:
        per_pass = self.n_l // self.l_bs
        p, pos = divmod(t, per_pass)
        lab = _perm(self.seed, self.rank, 0, p, self.n_l)[pos * self.l_bs:(pos + 1) * self.l_bs]
        idx = [int(i) for i in lab]
        for j in range(self.u_bs):
            q, r = divmod(t * self.u_bs + j, self.n_u)
            idx.append(self.n_l + int(_perm(self.seed, self.rank, 1, q, self.n_u)[r]))
        seeds = np.random.SeedSequence([self.seed, self.rank, 2, t]).generate_state(len(idx))
        return [(i, int(s)) for i, s in zip(idx, seeds)]

    def __iter__(self) -> Iterator[list[Key]]:
        for t in range(self.start, self.stop):
            yield self.batch(t)
