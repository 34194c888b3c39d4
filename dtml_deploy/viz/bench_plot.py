"""`dtml benchmark --plot`: the backend x precision table as two bar charts (ms per window, at batch 1
and at the best batch; Mvox/s), drawn from the report's rows (`BenchmarkReport.to_dict()["rows"]`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.viz.figure import new_figure, save_png, tight_layout, verbatim


def timed_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that were timed (passed, or exported but failed parity)."""
    return [r for r in rows if r.get("ms_per_window_best") is not None]


def benchmark_figure(rows: list[dict[str, Any]], title: str = "") -> Any:
    """Horizontal bars per timed row; rows that did not run are named below the charts."""
    timed = timed_rows(rows)
    names = [verbatim(r["name"]) + ("" if r["status"] == "passed" else " (failed parity)") for r in timed]
    y = np.arange(len(timed))
    fig = new_figure(11.0, 1.6 + 0.45 * max(len(timed), 1), 100)
    ax_ms, ax_mv = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    b1 = [r.get("ms_per_window_b1") or np.nan for r in timed]
    best = [r["ms_per_window_best"] for r in timed]
    ax_ms.barh(y - 0.2, b1, height=0.4, color="#9ecae1", label="batch 1", gid="ms_b1")
    ax_ms.barh(y + 0.2, best, height=0.4, color="#3182bd", label="best batch", gid="ms_best")
    for yi, v, r in zip(y, best, timed):
        ax_ms.text(v, yi + 0.2, f" {v:.0f} (b{r.get('best_batch')})", va="center", fontsize=7)
    ax_ms.set_xlabel("ms per window (lower is faster)")
    ax_ms.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    mv = [r.get("mvox_per_s") or np.nan for r in timed]
    ax_mv.barh(y, mv, height=0.6, color="#31a354", gid="mvox")
    for yi, v in zip(y, mv):
        ax_mv.text(v, yi, f" {v:.3g}", va="center", fontsize=7)
    ax_mv.set_xlabel("Mvox/s at the best batch (higher is faster)")
    for ax in (ax_ms, ax_mv):
        ax.set_yticks(y, names if ax is ax_ms else [""] * len(y), fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.18)
    other = [f"{r['name']} ({r['status'].split(':')[0]})" for r in rows if r not in timed]
    if other:  # the reasons are in the table and the JSON; the chart only names the rows
        fig.text(0.01, 0.01, verbatim("not timed: " + ", ".join(other)), fontsize=7, color="#555")
    fig.suptitle(verbatim(title or "dtml benchmark"), fontsize=10)
    tight_layout(fig, rect=(0, 0.05 if other else 0, 1, 1))
    return fig


def write_benchmark_plot(report: dict[str, Any], path: Path) -> Path:
    """Draw a benchmark report (its `to_dict()`) into a PNG at `path`, atomically."""
    if not timed_rows(report.get("rows", [])):
        raise ValueError("--plot: no row of the benchmark was timed, nothing to draw")
    title = f"{report.get('machine', '')} · cases: {', '.join(report.get('cases', []))}"
    return save_png(benchmark_figure(report["rows"], title), path)
