"""Per-iteration JSONL log and a progress bar with ETA.

Loss values stay on the device and are fetched every `flush_every` iterations in one transfer, so
logging every iteration costs no per-iteration synchronisation on a GPU. The fetched values are also
where divergence is noticed: `diverged` holds the first iteration with a non-finite term.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainLogger:
    def __init__(self, path: Path | None, start: int, total: int, show_progress: bool = True,
                 flush_every: int = 25) -> None:
        self.path = path
        self.flush_every = flush_every
        self._pending: list[tuple[int, dict[str, torch.Tensor], dict[str, float]]] = []
        self._t0 = self._t_last = time.perf_counter()
        self._it_last = start
        self.last: dict[str, Any] = {}
        self.diverged: tuple[int, list[str]] | None = None  # (iteration, terms) of the first non-finite loss
        self.rate = 0.0
        self._progress = None
        if show_progress:
            self._progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self._task = self._progress.add_task("train", total=total, completed=start, info="")
            self._progress.start()

    def log(self, iteration: int, losses: dict[str, torch.Tensor], scalars: dict[str, float]) -> bool:
        """Queue one iteration's losses; returns True when this call flushed (fetched) the queue."""
        self._pending.append((iteration, {k: v.detach() for k, v in losses.items()}, scalars))
        if self._progress is not None:
            self._progress.update(self._task, completed=iteration + 1)
        if len(self._pending) >= self.flush_every:
            self.flush()
            return True
        return False

    def event(self, row: dict[str, Any]) -> None:
        """A non-iteration row (validation, checkpoint)."""
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        if not self._pending:
            return
        keys = list(self._pending[0][1])
        values = torch.stack([torch.stack([p[1][k].float() for k in keys]) for p in self._pending]).cpu().tolist()
        now = time.perf_counter()
        last_it = self._pending[-1][0]
        self.rate = (last_it + 1 - self._it_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._it_last = now, last_it + 1
        lines = []
        for (it, _, scalars), vals in zip(self._pending, values):
            bad = [k for k, v in zip(keys, vals) if not math.isfinite(v)]
            if bad and self.diverged is None:
                self.diverged = (it, bad)
            row = {"iteration": it, **{f"loss_{k}" if k != "total" else "loss": v for k, v in zip(keys, vals)},
                   **scalars, "it_per_s": round(self.rate, 3), "elapsed_s": round(now - self._t0, 3)}
            lines.append(json.dumps(row))
            self.last = row
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write("\n".join(lines) + "\n")
        if self._progress is not None:
            self._progress.update(self._task, info=f"loss {self.last['loss']:.4f}  {self.rate:.2f} it/s")
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        if self._progress is not None:
            self._progress.stop()
