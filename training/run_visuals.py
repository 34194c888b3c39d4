"""What `dtml train` adds around a run: TensorBoard scalars while it trains (when tensorboard is
installed) and `training_curves.png` in the run folder when it ends (when matplotlib is installed)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from dtml_training.config import RunPaths
from dtml_training.log_reader import read_log
from dtml_training.tensorboard_sink import TensorBoardTail

TENSORBOARD_DIR = "tensorboard"


def is_main_process() -> bool:
    """Only rank 0 of a torchrun launch draws (the others write no log)."""
    return os.environ.get("RANK", "0") == "0"


def draw_curves(run_dir: Path, out: Path | None = None) -> Path:
    """Redraw RUN_DIR/train_log.jsonl into `out` (default RUN_DIR/training_curves.png); `out` must be a PNG
    name and may replace only an earlier picture of dtml's (io/reports.py), never the log or a checkpoint."""
    from dtml_deploy.errors import InputError
    from dtml_deploy.io.reports import PICTURE, check_report_target
    from dtml_deploy.viz.figure import require_matplotlib

    require_matplotlib("training_curves.png")
    from dtml_deploy.viz.curves import CURVES_PNG, write_curves

    log = RunPaths(Path(run_dir)).log
    if not log.is_file():
        raise InputError(f"{log}: no training log (is {run_dir} a `dtml train` run folder?)")
    out = out or Path(run_dir) / CURVES_PNG
    check_report_target(out, PICTURE, what="the training curves")
    try:
        return write_curves(read_log(log), out, title=Path(run_dir).name)
    except ValueError as e:
        raise InputError(f"{log}: {e}") from None


@contextlib.contextmanager
def run_visuals(out: Path, tensorboard: bool, note: Callable[[str], None]) -> Iterator[None]:
    """Mirror the log into OUT/tensorboard during the block; draw the curves after it (also after an
    interruption, not after an error)."""
    main = is_main_process()
    paths = RunPaths(Path(out))
    tail = TensorBoardTail.start(paths.log, paths.out / TENSORBOARD_DIR) if tensorboard and main else None
    try:
        yield
    finally:
        if tail is not None:
            tail.stop()
    if not main or not paths.log.is_file():
        return
    from dtml_deploy.errors import DtmlError

    try:
        note(f"training curves: {draw_curves(paths.out)}")
    except DtmlError as e:  # matplotlib missing: the run itself is fine
        note(f"note: {e}")
