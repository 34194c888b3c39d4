"""Score masks against labels in the paper's column order (Dice, Jaccard, ASD, 95HD).

Two ways in: masks already on disk (`score_folders`), or a bundle segmenting the cases of a data set
and scoring them in the same run (`score_model`). Metrics are medpy-exact (see metrics.py): voxels, as
the paper reports, and millimetres from each image's spacing.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.errors import InputError
from dtml_deploy.io.atomic import atomic_write_text
from dtml_deploy.io.datasets import LabeledCase
from dtml_deploy.io.volume import has_volume_suffix, read_volume
from dtml_deploy.metrics import case_metrics
from dtml_deploy.segment import Segmenter, case_name

COLUMNS = ("dice", "jaccard", "asd", "hd95", "asd_mm", "hd95_mm")
HEADERS = {"dice": "Dice %", "jaccard": "Jaccard %", "asd": "ASD vox", "hd95": "95HD vox",
           "asd_mm": "ASD mm", "hd95_mm": "95HD mm"}


def _binary(array: np.ndarray, path: Path) -> np.ndarray:
    values = np.unique(array)
    if not np.isin(values, (0.0, 1.0)).all():
        raise InputError(f"{path}: mask is not binary (values {values[:6].tolist()})")
    return array > 0.5


def _score(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], name: str) -> dict[str, Any]:
    if pred.shape != gt.shape:
        raise InputError(f"{name}: prediction shape {pred.shape} != label shape {gt.shape}")
    return {"case": name, **case_metrics(pred, gt, tuple(spacing))}


def score_folders(pred_dir: Path, gt_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Score every mask in `pred_dir` against the label of the same case name in `gt_dir`.

    Returns the rows and the labelled cases that have no prediction (not scored; callers say so)."""
    for d in (pred_dir, gt_dir):
        if not Path(d).is_dir():
            raise InputError(f"{d}: not a folder")
    gts = {case_name(p): p for p in sorted(Path(gt_dir).iterdir()) if has_volume_suffix(p)}
    preds = [p for p in sorted(Path(pred_dir).iterdir()) if has_volume_suffix(p)
             and not case_name(p).endswith(("_prob", "_sdm", "_uncertainty"))]
    if not preds:
        raise InputError(f"{pred_dir}: no masks found")
    missing = [case_name(p) for p in preds if case_name(p) not in gts]
    if missing:
        raise InputError(f"{gt_dir}: no label for {', '.join(missing[:5])}")
    unscored = sorted(set(gts) - {case_name(p) for p in preds})
    rows = []
    for p in preds:
        name = case_name(p)
        pv, gv = read_volume(p, dataset="label"), read_volume(gts[name], dataset="label")
        rows.append(_score(_binary(pv.array, p), _binary(gv.array, gts[name]), gv.spacing, name))
    return rows, unscored


def score_model(segmenter: Segmenter, cases: Sequence[LabeledCase],
                progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Segment each case's image with `segmenter` and score it against its label."""
    rows = []
    spacing = segmenter.bundle.model.spacing
    for case in cases:
        img = read_volume(case.image.path, default_spacing=spacing, dataset=case.image.dataset or "image")
        lab = read_volume(case.label.path, default_spacing=spacing, dataset=case.label.dataset or "label")
        t = time.perf_counter()
        seg = segmenter.segment_array(img.array, img.spacing if img.header is not None else None, case.case_id)
        seconds = time.perf_counter() - t
        row = _score(seg.mask.astype(bool), _binary(lab.array, case.label.path), img.spacing, case.case_id)
        row.update(seconds=round(seconds, 4), windows=seg.windows, agreement=seg.agreement)
        if seg.qc is not None:
            row.update(qc_score=seg.qc.score, qc_flagged=seg.qc.flagged,
                       **{f"qc_{k}": v for k, v in seg.qc.parts.items()})
        rows.append(row)
        if progress is not None:
            progress(case.case_id)
    return rows


def format_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """A plain-text table in the paper's order, Dice and Jaccard in percent, then mean ± std."""
    cols = [c for c in COLUMNS if rows and c in rows[0]]
    pct = {"dice", "jaccard"}

    def fmt(c: str, v: float) -> str:
        return f"{v * 100:.2f}" if c in pct else f"{v:.2f}"

    means = {c: f"{fmt(c, summary[c]['mean'])}±{fmt(c, summary[c]['std'])}" for c in cols}
    widths = [max(8, len(HEADERS[c]), len(means[c])) for c in cols]
    lines = ["case".ljust(24) + "  ".join(HEADERS[c].rjust(w) for c, w in zip(cols, widths))]
    for r in rows:
        lines.append(str(r["case"])[:24].ljust(24) + "  ".join(fmt(c, r[c]).rjust(w) for c, w in zip(cols, widths)))
    mean = "  ".join(means[c].rjust(w) for c, w in zip(cols, widths))
    lines.append(f"{'mean ± std (n=' + str(len(rows)) + ')':<24}" + mean)
    nan = {c: summary[c]["nan_count"] for c in cols if summary[c]["nan_count"]}
    if nan:
        lines.append(f"(cases with an empty mask, left out of the mean: {nan})")
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """NaN (an empty mask's distances) becomes null: strict JSON parsers reject bare NaN."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    """The paper's column order first (case, Dice, Jaccard, ASD, 95HD, mm variants), then the rest."""
    first = ["case", *[c for c in COLUMNS if c in row]]
    return {**{k: row[k] for k in first}, **{k: v for k, v in row.items() if k not in first}}


def write_reports(rows: list[dict[str, Any]], summary: dict[str, Any], json_path: Path | None,
                  csv_path: Path | None, extra: dict[str, Any] | None = None) -> None:
    """Write the per-case rows and the summary as JSON and/or CSV, atomically."""
    rows = [_ordered(r) for r in rows]
    order = [*[c for c in COLUMNS if c in summary], *[k for k in summary if k not in COLUMNS]]
    summary = {k: summary[k] for k in order}
    if json_path is not None:
        doc = _json_safe({**(extra or {}), "summary": summary, "cases": rows})
        atomic_write_text(json_path, json.dumps(doc, indent=2, default=float, allow_nan=False) + "\n")
    if csv_path is not None:
        buf = io.StringIO()
        keys = list(rows[0]) if rows else ["case"]
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(csv_path, buf.getvalue())
