"""The evaluation report's charts, drawn from the per-case rows the JSON report holds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dtml_deploy.viz.figure import new_figure, tight_layout

# metric -> (axis label, factor): Dice and Jaccard in percent, as the paper reports them
METRICS: dict[str, tuple[str, float]] = {"dice": ("Dice %", 100.0), "jaccard": ("Jaccard %", 100.0),
                                         "asd": ("ASD vox", 1.0), "hd95": ("95HD vox", 1.0)}
POINT = "#1f77b4"
FLAGGED = "#d62728"


def finite(values: list[Any]) -> np.ndarray:
    """The real numbers among `values` (None and NaN, an empty mask's distances, left out)."""
    out = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return np.asarray(out, dtype=np.float64)


def scatter_figure(rows: list[dict[str, Any]], key: str, threshold: float | None, name: str) -> Any:
    """Dice (%) against the QC score `key`, flagged cases (score below `threshold`) in red."""
    fig = new_figure(6.2, 3.6, 100)
    ax = fig.add_subplot(1, 1, 1)
    pairs = [(float(r[key]), 100.0 * float(r["dice"])) for r in rows if r.get(key) is not None]
    x = np.asarray([p[0] for p in pairs])
    y = np.asarray([p[1] for p in pairs])
    low = x < threshold if threshold is not None else np.zeros(x.shape, bool)
    ax.scatter(x[~low], y[~low], s=22, color=POINT, label="kept", zorder=3)
    if low.any():
        ax.scatter(x[low], y[low], s=26, color=FLAGGED, marker="s", label="flagged", zorder=3)
    if threshold is not None:
        ax.axvline(threshold, color=FLAGGED, linestyle="--", linewidth=1.2, label=f"flag threshold {threshold:g}")
    r = np.corrcoef(x, y)[0, 1] if len(x) > 2 and x.std() > 0 and y.std() > 0 else float("nan")
    ax.set_xlabel(name)
    ax.set_ylabel("Dice %")
    ax.set_title(f"Dice against {name} ({len(x)} cases, Pearson r {r:.2f})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # never over a point
    tight_layout(fig)
    return fig


def distributions_figure(rows: list[dict[str, Any]]) -> Any:
    """One panel per metric: a box plot with every case as a point (NaN cases counted in the title)."""
    metrics = [m for m in METRICS if rows and m in rows[0]]
    fig = new_figure(2.4 * len(metrics), 3.2, 100)
    rng = np.random.default_rng(0)  # fixed jitter: the same rows draw the same picture
    for i, m in enumerate(metrics):
        label, factor = METRICS[m]
        vals = finite([r.get(m) for r in rows]) * factor
        ax = fig.add_subplot(1, len(metrics), i + 1)
        if vals.size:
            ax.boxplot(vals, widths=0.5, showfliers=False)
            ax.scatter(1 + rng.uniform(-0.12, 0.12, vals.size), vals, s=12, color=POINT, zorder=3)
        missing = len(rows) - vals.size
        ax.set_title(label + (f" ({missing} n/a)" if missing else ""), fontsize=10)
        ax.set_xticks([])
        ax.grid(axis="y", alpha=0.3)
    tight_layout(fig)
    return fig
