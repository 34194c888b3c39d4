"""TensorBoard scalars for `dtml train` (optional: used when `torch.utils.tensorboard` imports, that is
when the tensorboard package is installed).

A background thread follows the run's JSONL log and writes each row it finds, so TensorBoard shows
exactly the numbers the log holds, and the trainer needs no knowledge of it.
"""

from __future__ import annotations

import numbers
import threading
from pathlib import Path
from typing import Any

from dtml_training.log_reader import LogTail

SKIP = {"iteration", "event"}


def tag_of(key: str) -> str:
    """Group log keys into TensorBoard sections: loss/*, schedule/*, speed/*, validation/*."""
    if key == "loss":
        return "loss/total"
    if key.startswith("loss_"):
        return "loss/" + key[len("loss_"):]
    if key in ("lambda", "lr"):
        return "schedule/" + key
    if key.startswith("val_"):
        return "validation/" + key[len("val_"):]
    if key in ("it_per_s", "elapsed_s"):
        return "speed/" + key
    return "other/" + key


def write_rows(writer: Any, rows: list[dict[str, Any]]) -> int:
    """Write every numeric value of `rows` at its row's iteration; returns the number of scalars."""
    n = 0
    for row in rows:
        step = row.get("iteration")
        if not isinstance(step, int):
            continue
        for key, value in row.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            writer.add_scalar(tag_of(key), float(value), step)
            n += 1
    return n


def summary_writer(log_dir: Path) -> Any | None:
    """A `SummaryWriter`, or None when TensorBoard is not installed (an optional integration)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard missing: training runs the same without it
        return None
    return SummaryWriter(log_dir=str(log_dir))


def tensorboard_installed() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class TensorBoardTail:
    """Follows `log` in a thread and mirrors its rows into TensorBoard under `log_dir`."""

    def __init__(self, log: Path, log_dir: Path, poll_s: float = 1.0) -> None:
        self.tail = LogTail(log)
        self.log = log
        self.log_dir = log_dir
        # Nothing is written until the log changes: a run the trainer refuses (a folder holding another run,
        # bad options) must leave its folder exactly as it was.
        self._initial = _stat(log)
        self.writer: Any = None
        self.poll_s = poll_s
        self.scalars = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="dtml-tensorboard", daemon=True)

    @classmethod
    def start(cls, log: Path, log_dir: Path, poll_s: float = 1.0) -> TensorBoardTail | None:
        """A running tail, or None when TensorBoard is not installed."""
        if not tensorboard_installed():
            return None
        tail = cls(log, log_dir, poll_s)
        tail._thread.start()
        return tail

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self) -> None:
        if self.writer is None:
            now = _stat(self.log)
            if now is None or now == self._initial:
                return
            self.writer = summary_writer(self.log_dir)
        rows = self.tail.read_new()
        if rows:
            self.scalars += write_rows(self.writer, rows)
            self.writer.flush()

    def stop(self) -> None:
        """Write what is left in the log and close the event file."""
        self._stop.set()
        self._thread.join()
        self._drain()
        if self.writer is not None:
            self.writer.close()
