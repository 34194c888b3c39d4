"""The two-stream batch sampler: `labeled_bs` labeled + `unlabeled_bs` unlabeled cases per batch.

Labeled cases are reshuffled every pass (a pass is len(labeled) // (labeled_bs * world_size) batches,
as UA-MT's TwoStreamBatchSampler); unlabeled cases cycle through their own permutations independently.
The GLOBAL batch of iteration t (labeled_bs * W labeled + unlabeled_bs * W unlabeled cases, W ranks) is
a pure function of (seed, t), and so is each sample's augmentation seed, tied to its position in that
global batch; rank r takes the r-th slice of each stream. So W ranks with per-rank batch sizes
(labeled_bs, unlabeled_bs) see exactly the samples and patches of one process with (W * labeled_bs,
W * unlabeled_bs), resuming at iteration t needs no sampler or worker state, and results do not depend
on the number of DataLoader workers. With W = 1 the stream is the single-process stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from dtml_deploy.errors import DataError

if TYPE_CHECKING:
    from dtml_deploy.io.datasets import Split
    from dtml_training.config import TrainConfig

Key = tuple[int, int]  # (dataset index, augmentation seed)


def _perm(seed: int, stream: int, n_pass: int, n: int) -> np.ndarray:
    # the 0 is where the rank once went: it keeps the single-process stream of earlier versions
    return np.random.default_rng([seed, 0, stream, n_pass]).permutation(n)


def rank_rows(rank: int, world_size: int, labeled_bs: int, unlabeled_bs: int) -> list[int]:
    """Positions in the global batch (all labeled, then all unlabeled) of rank `rank`'s batch rows."""
    n_lab = labeled_bs * world_size
    return (list(range(rank * labeled_bs, (rank + 1) * labeled_bs))
            + list(range(n_lab + rank * unlabeled_bs, n_lab + (rank + 1) * unlabeled_bs)))


def check_batch_composition(split: Split, cfg: TrainConfig, world_size: int = 1) -> None:
    """Refuse a split that cannot fill the configured batches (of all `world_size` ranks together),
    saying where the cases went."""
    n_l, n_u, n_v = len(split.labeled), len(split.unlabeled), len(split.validation)
    need = cfg.labeled_bs * world_size
    if need > n_l:
        ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
        raise DataError(f"labeled_bs={cfg.labeled_bs}{ranks} needs at least {need} labeled cases, the split "
                        f"has {n_l}; lower --labeled-bs{' or the number of ranks' if world_size > 1 else ''} "
                        "or raise --labeled")
    if cfg.unlabeled_bs and n_u == 0:
        raise DataError(f"unlabeled_bs={cfg.unlabeled_bs} needs unlabeled cases, but the {n_l + n_v} cases of "
                        f"the data set all went to the {n_l} labeled and {n_v} validation cases; lower "
                        "--labeled or --val-cases, add cases, or train labeled-only with --unlabeled-bs 0")


class TwoStreamSampler:
    """Yields, for iterations start..stop-1, this rank's list of keys: labeled first, then unlabeled.

    `labeled_bs` and `unlabeled_bs` are per rank; the global batch is `world_size` times each."""

    def __init__(self, n_labeled: int, n_unlabeled: int, labeled_bs: int, unlabeled_bs: int,
                 seed: int, start: int, stop: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.check(n_labeled, n_unlabeled, labeled_bs * world_size, unlabeled_bs * world_size)
        self.n_l, self.n_u = n_labeled, n_unlabeled
        self.l_bs, self.u_bs = labeled_bs, unlabeled_bs
        self.seed, self.rank, self.world = seed, rank, world_size
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

    def global_batch(self, t: int) -> list[Key]:
        """The keys of all ranks at iteration t: every labeled key (rank order), then every unlabeled one."""
        l_bs, u_bs = self.l_bs * self.world, self.u_bs * self.world
        per_pass = self.n_l // l_bs
        p, pos = divmod(t, per_pass)
        lab = _perm(self.seed, 0, p, self.n_l)[pos * l_bs:(pos + 1) * l_bs]
        idx = [int(i) for i in lab]
        for j in range(u_bs):
            q, r = divmod(t * u_bs + j, self.n_u)
            idx.append(self.n_l + int(_perm(self.seed, 1, q, self.n_u)[r]))
        seeds = np.random.SeedSequence([self.seed, 0, 2, t]).generate_state(len(idx))
        return [(i, int(s)) for i, s in zip(idx, seeds)]

    def batch(self, t: int) -> list[Key]:
        """This rank's keys at iteration t: its slice of the global labeled keys, then of the unlabeled."""
        keys = self.global_batch(t)
        return [keys[i] for i in rank_rows(self.rank, self.world, self.l_bs, self.u_bs)]

    def __iter__(self) -> Iterator[list[Key]]:
        for t in range(self.start, self.stop):
            yield self.batch(t)
