"""What `dtml benchmark` reports: its rows, the machine they ran on, the Markdown table and the JSON."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtml_deploy.errors import DtmlError
from dtml_deploy.io.atomic import atomic_write_text
from dtml_deploy.speed_record import cpu_name
from dtml_export.bench_rows import PARITY, PASSED

OUTLIER_FACTOR = 1.5  # a timed run longer than this times the median is an outlier
NO_REAL_CASE = "no real case: agreement not measured"


@dataclass
class BenchmarkRow:
    """One backend/precision: what ran, whether it agrees with torch fp32, and how fast it was."""

    key: str
    name: str
    backend: str
    precision: str
    status: str  # passed | exported but failed parity | failed: <reason> | skipped: <reason>
    detail: str | None = None
    runs_on: str | None = None  # the backend's own description (device, flags, execution providers)
    artifact: str | None = None
    artifact_mb: float | None = None
    agreement: float | None = None  # Dice of the final mask with torch fp32's, first real case
    agreement_note: str | None = None
    windows: int | None = None  # windows per pass over the cases
    ms_per_window: dict[str, float] = field(default_factory=dict)  # batch -> median engine ms per window
    ms_per_window_b1: float | None = None
    best_batch: int | None = None
    ms_per_window_best: float | None = None
    seconds_per_case: float | None = None  # median over the timed passes, at the best batch
    seconds_min: float | None = None
    seconds_max: float | None = None
    outliers: int | None = None  # timed passes longer than OUTLIER_FACTOR x the median
    runs: list[float] = field(default_factory=list)
    mvox_per_s: float | None = None
    peak_memory_mb: float | None = None
    memory_growth_mb: float | None = None

    @property
    def timed(self) -> bool:
        return self.status in (PASSED, PARITY)


@dataclass
class BenchmarkReport:
    machine: str
    memory: str  # what peak_memory_mb measures on this device
    request: dict[str, Any]
    cases: list[str]
    rows: list[BenchmarkRow]

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "memory": self.memory, "request": self.request, "cases": self.cases,
                "rows": [asdict(r) for r in self.rows]}


def machine(device: torch.device) -> str:
    """One line naming the hardware and runtimes the numbers come from."""
    if device.type == "cuda":
        hw = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        hw = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} (CPU)"
    with contextlib.suppress(ImportError):
        import onnxruntime

        hw += f", onnxruntime {onnxruntime.__version__}"
    with contextlib.suppress(ImportError):
        import openvino

        hw += f", openvino {openvino.get_version().split('-')[0]}"
    return hw


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of `rows` restricted to `columns` (None prints as empty)."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v).replace("|", "/")

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak MB: torch.cuda.max_memory_allocated per row (torch's allocator only)"
    return ("peak MB: process ru_maxrss after the row, a high-water mark of the whole process (torch's CPU "
            "allocations are not traceable per row); +N: its growth during the row")


def _fmt(v: float | None, digits: int = 2) -> str | None:
    return None if v is None else f"{v:.{digits}f}"


def _table_row(row: BenchmarkRow) -> dict[str, Any]:
    spread = None
    if row.seconds_per_case is not None:
        spread = f"{row.seconds_min:.3g}–{row.seconds_max:.3g} s, {row.outliers} outlier(s)"
    memory = _fmt(row.peak_memory_mb, 0) if row.timed else None
    if memory is not None and row.memory_growth_mb is not None:
        memory += f" (+{row.memory_growth_mb:.0f})"
    agreement = _fmt(row.agreement, 4) if row.agreement is not None else ("n/a" if row.timed else None)
    status = row.status if row.detail is None or not row.timed else f"{row.status} ({row.detail})"
    return {
        "row": row.name, "precision": row.precision, "status": status,
        "artifact MB": _fmt(row.artifact_mb, 1), "agreement": agreement,
        "ms/window b1": _fmt(row.ms_per_window_b1),
        "ms/window best": None if row.best_batch is None else f"{row.ms_per_window_best:.2f} (b{row.best_batch})",
        "s/case": _fmt(row.seconds_per_case, 3), "Mvox/s": _fmt(row.mvox_per_s),
        "peak MB": memory, "spread": spread,
    }


TABLE_COLUMNS = ["row", "precision", "status", "artifact MB", "agreement", "ms/window b1", "ms/window best",
                 "s/case", "Mvox/s", "peak MB", "spread"]


def format_report(report: BenchmarkReport) -> str:
    """The Markdown table with a header naming the machine and the cases, and notes below it."""
    req = report.request
    head = [f"machine: {report.machine}",
            f"cases: {', '.join(report.cases)}; batches {req['batches']}; median of {req['repeats']} timed "
            f"run(s) after {req['warmup']} warm-up(s)"]
    agreement = (f"agreement: Dice of the final mask with torch fp32's on {report.cases[0]}; parity failed "
                 f"below {req['status_threshold']}" if req["data"] else f"agreement: {NO_REAL_CASE} (pass --data)")
    notes = [report.memory, agreement,
             f"spread: min–max seconds per case at the best batch; outliers: runs > {OUTLIER_FACTOR}x the median"]
    if req["workdir"] is None:
        notes.append("artifacts were written to a temporary folder and removed; pass -o DIR to keep them")
    table = markdown_table([_table_row(r) for r in report.rows], TABLE_COLUMNS)
    return "\n".join([*head, "", table, "", *notes])


def write_json(report: BenchmarkReport, path: Path) -> None:
    try:
        atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
    except OSError as e:
        raise DtmlError(f"{path}: cannot write the JSON report ({e.strerror or e})") from None


def nothing_timed(report: BenchmarkReport) -> str | None:
    """One line when no row of the report was timed (all skipped or failed); None when one was."""
    if any(r.timed for r in report.rows):
        return None
    return "no benchmark row ran: " + "; ".join(f"{r.key} {r.status}" for r in report.rows)


def below_min_dice(report: BenchmarkReport, min_dice: float) -> list[str]:
    """'key (why)' for every row that does not show agreement >= `min_dice`: below it, failed, or run
    without a torch fp32 reference. Rows skipped because this machine lacks their runtime do not count."""
    low = []
    for r in report.rows:
        if r.status.startswith("failed"):
            low.append(f"{r.key} (failed)")
        elif r.timed and r.agreement is None:
            low.append(f"{r.key} (not measured)")
        elif r.timed and r.agreement < min_dice:
            low.append(f"{r.key} ({r.agreement:.4f})")
    return low
