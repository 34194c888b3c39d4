"""Training curves from the rows of a run's `train_log.jsonl`: every loss term, the consistency weight
lambda and the learning rate, iterations per second, and validation Dice. The lines carry the logged
values themselves (a smoothed loss is drawn on top, never instead)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.viz.figure import new_figure, save_png, tight_layout, verbatim

CURVES_PNG = "training_curves.png"


def _series(rows: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["iteration"], float(r[key])) for r in rows
           if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)]
    return np.asarray([p[0] for p in pts], dtype=np.float64), np.asarray([p[1] for p in pts], dtype=np.float64)


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def split_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(iteration rows, validation rows) of a log."""
    steps = [r for r in rows if "event" not in r and isinstance(r.get("iteration"), int)]
    vals = [r for r in rows if r.get("event") == "validation" and isinstance(r.get("iteration"), int)]
    return steps, vals


def _losses(ax: Any, steps: list[dict[str, Any]]) -> None:
    keys = [k for k in dict.fromkeys(k for r in steps for k in r) if k == "loss" or k.startswith("loss_")]
    window = max(1, len(steps) // 50)
    for key in keys:
        x, y = _series(steps, key)
        finite = np.isfinite(y)
        line = ax.plot(x, y, linewidth=0.6, alpha=0.35, label=None, gid=key)[0]
        if finite.any() and window > 1:
            ax.plot(x[finite], smooth(y[finite], window), linewidth=1.4, color=line.get_color(),
                    label=verbatim(f"{key} (mean of {window})"), gid=key + ":smooth")
        else:
            line.set_alpha(1.0)
            line.set_label(verbatim(key))
    positive = [r[k] for r in steps for k in keys if isinstance(r.get(k), int | float) and r[k] > 0]
    if positive and max(positive) / max(min(positive), 1e-12) > 50:
        ax.set_yscale("log")
    ax.set_title("losses", fontsize=10)
    ax.legend(fontsize=7)


def _schedule(ax: Any, steps: list[dict[str, Any]]) -> None:
    x, lam = _series(steps, "lambda")
    ax.plot(x, lam, color="tab:purple", label="lambda", gid="lambda")
    ax.set_ylabel("lambda", color="tab:purple")
    x, lr = _series(steps, "lr")
    ax2 = ax.twinx()
    ax2.plot(x, lr, color="tab:green", linestyle="--", label="lr", gid="lr")
    ax2.set_ylabel("lr", color="tab:green")
    ax2.legend(ax.get_lines() + ax2.get_lines(), ["lambda", "lr"], fontsize=7)
    if lr.size and lr.min() > 0 and lr.max() / lr.min() > 5:
        ax2.set_yscale("log")
    ax.set_title("consistency weight and learning rate", fontsize=10)


def _speed(ax: Any, steps: list[dict[str, Any]]) -> None:
    x, y = _series(steps, "it_per_s")
    ax.plot(x, y, color="tab:gray", gid="it_per_s")
    ax.set_title("iterations per second", fontsize=10)


def _validation(ax: Any, vals: list[dict[str, Any]]) -> None:
    keys = [k for k in dict.fromkeys(k for r in vals for k in r) if k.startswith("val_")]
    for key in keys:
        x, y = _series(vals, key)
        ax.plot(x, y, marker="o", markersize=3, label=verbatim(key), gid=key)
    if keys:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no validation rows\n(train with --val-cases N)", ha="center", va="center",
                transform=ax.transAxes, color="#666")
    ax.set_title("validation Dice", fontsize=10)


def curves_figure(rows: list[dict[str, Any]], title: str = "") -> Any:
    """A 2x2 figure: losses, lambda and lr, it/s, validation Dice; x is the iteration."""
    steps, vals = split_rows(rows)
    fig = new_figure(11.0, 7.0, 100)
    axes = [fig.add_subplot(2, 2, i + 1) for i in range(4)]
    _losses(axes[0], steps)
    _schedule(axes[1], steps)
    _speed(axes[2], steps)
    _validation(axes[3], vals)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    last = steps[-1]["iteration"] + 1 if steps else 0
    fig.suptitle(verbatim(f"{title}{' · ' if title else ''}{last} iterations logged"), fontsize=11)
    tight_layout(fig)
    return fig


def write_curves(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Draw `rows` into a PNG at `path` (atomically); a log with no iteration rows is an error."""
    if not split_rows(rows)[0]:
        raise ValueError("the log has no complete iteration rows yet")
    if any(not math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float)):
        title = f"{title} (non-finite values left out)".strip()
    return save_png(curves_figure(rows, title), path)
