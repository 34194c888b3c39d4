"""What `dtml segment` shows while a Predictor works: progress bars, one line per case, warnings.

The core reports through `SegmentEvents`; only this module prints. Rank 0 of a torchrun launch speaks
for every rank.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from dtml_deploy.io.geometry import guessed_geometry_note
from dtml_deploy.predictor import Predictor, SegmentEvents
from dtml_deploy.qc import warning_line
from dtml_deploy.segment import CaseReport


def opening_lines(predictor: Predictor, what: str, precision_chosen: bool, qc: bool) -> list[str]:
    """What a run does and where it runs (`what` with ' with BACKEND' or ' on N ranks ...'), then the CPU's
    bf16 tip or warning, and (when `qc` was asked for) that the bundle has no QC block: how `segment` and
    `evaluate --model` open."""
    from dtml_deploy.backends.torch_backend import cpu_precision_note
    from dtml_deploy.qc_reference import no_qc_note

    backend = predictor.segmenter.backend
    notes = (predictor.chosen or None,
             cpu_precision_note(backend.name, backend.device, str(backend.options.precision), precision_chosen),
             no_qc_note(predictor.bundle.meta) if qc else None)
    return [f"{what}{predictor.ranks.running(predictor.describe())}", *(n for n in notes if n)]


def case_lines(rep: CaseReport, name: str, model_spacing: tuple[float, float, float]) -> list[str]:
    """The console lines of one finished case (its result, a resampling note, a QC warning)."""
    if rep.status != "ok":
        return [f"error: {rep.error}"]
    lines = []
    if rep.resampled:
        lines.append(f"  warning: {name}: spacing {tuple(round(x, 4) for x in rep.spacing or ())} differs from "
                     f"the model's {model_spacing}; resampled to it and back (--no-resample to skip)")
    s = sum(rep.seconds.values())
    agree = f", head agreement {rep.agreement:.3f}" if rep.agreement is not None else ""
    windows = f"{rep.windows} window{'' if rep.windows == 1 else 's'}"
    score = f", QC score {rep.qc['score']:.2f}" if rep.qc else ""
    lines.append(f"  {name}: {rep.output} ({windows}, {s:.2f} s{agree}{score})")
    lines.extend(f"  warning: {name}: {w}" for w in rep.warnings or ())
    if rep.removed:
        lines.append(f"  note: {name}: removed {', '.join(rep.removed)}: left by an earlier run, not written by "
                     "this one (--overwrite replaces a case's whole output set)")
    flagged = warning_line(name, rep.qc)
    if flagged:
        lines.append(f"  {flagged}")
    return lines


class ConsoleEvents(SegmentEvents):
    """Rich progress bars (one per running case, windows done) and the case lines, on stderr; a context
    manager around `Predictor.segment_files`."""

    def __init__(self, predictor: Predictor, progress: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.main = predictor.ranks.is_main
        self.spacing = predictor.bundle.model.spacing
        self.err = Console(stderr=True, soft_wrap=True)  # one line per message in logs, however narrow
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("windows"), TimeElapsedColumn(), console=self.err,
                            disable=not (progress and self.main), transient=True)
        self.tasks: dict[int, Any] = {}
        self.guessed = False
        self.stopped: str | None = None
        self.ranks, self.unfinished = 1, 0
        self.t0 = time.perf_counter()

    def say(self, line: str) -> None:
        if self.main:
            self.err.print(line, highlight=False, markup=False)

    def __enter__(self) -> ConsoleEvents:
        self.bar.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.bar.__exit__(kind, exc, tb)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def case_started(self, index: int, name: str) -> None:
        self.tasks[index] = self.bar.add_task(name, total=None)

    def windows(self, index: int, done: int, total: int) -> None:
        self.bar.update(self.tasks[index], completed=done, total=total)

    def case_finished(self, index: int, name: str, report: CaseReport) -> None:
        task = self.tasks.pop(index, None)
        if task is not None:
            self.bar.remove_task(task)
        if report.geometry_guessed and not self.guessed:  # once per run: every h5 input gets the same guess
            self.guessed = True
            self.say(guessed_geometry_note(report.input, report.geometry_guessed, self.spacing))
        for line in case_lines(report, name, self.spacing):
            self.say(line)

    def batch_finished(self, stopped: str | None, ranks: int, unfinished: int) -> None:
        self.stopped, self.ranks, self.unfinished = stopped, ranks, unfinished
