"""training/logs.py: one JSONL row per iteration with every loss term, written in batched flushes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dtml_training.logs import TrainLogger


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_hold_every_term_and_scalar_in_iteration_order(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    logger = TrainLogger(log, start=0, total=10, show_progress=False, flush_every=4)
    for it in range(10):
        parts = {"seg": torch.tensor(1.0 / (it + 1)), "dis": torch.tensor(0.5), "total": torch.tensor(2.0 + it)}
        logger.log(it, parts, {"lambda": it * 0.1, "lr": 0.01})
        if it == 5:  # two flushes of 4 have happened, 2 rows are still pending
            assert len(_rows(log)) == 4 * (6 // 4)
    logger.close()
    rows = _rows(log)
    assert [r["iteration"] for r in rows] == list(range(10))
    assert rows[3]["loss_seg"] == 0.25 and rows[3]["loss_dis"] == 0.5 and rows[3]["loss"] == 5.0
    assert rows[9]["lambda"] == 0.9 and rows[9]["lr"] == 0.01
    assert all(r["it_per_s"] > 0 and r["elapsed_s"] >= 0 for r in rows)
    assert logger.last == rows[-1]


def test_events_are_appended_and_no_path_writes_nothing(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    logger = TrainLogger(log, start=5, total=10, show_progress=False, flush_every=100)
    logger.log(5, {"total": torch.tensor(1.0)}, {})
    logger.event({"event": "validation", "iteration": 5, "val_dice_seg": 0.8})
    logger.close()
    assert [r.get("event") for r in _rows(log)] == ["validation", None]  # the event is written at once

    quiet = TrainLogger(None, start=0, total=2, show_progress=False)
    quiet.log(0, {"total": torch.tensor(3.0)}, {})
    quiet.close()
    assert quiet.last["loss"] == 3.0 and list(tmp_path.iterdir()) == [log]
