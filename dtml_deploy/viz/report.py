"""`dtml evaluate --report report.html`: one self-contained HTML page (images inlined as base64 PNG,
a few lines of inline JavaScript to sort the table, no network) from the same rows and summary as the
JSON report: the summary in the paper's layout, a sortable per-case table with a preview thumbnail per
case, Dice against the QC score with the flag threshold, and each metric's distribution."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.io.reports import write_report_text
from dtml_deploy.viz.figure import figure_png
from dtml_deploy.viz.preview import THUMBNAIL, PreviewStyle, preview_png, preview_title
from dtml_deploy.viz.report_plots import distributions_figure, scatter_figure

# The heads' agreement under which a case counts as flagged: every case under it failed on the LA check.
AGREEMENT_FLAG = 0.8
PAPER = (("dice", "Dice (%)", 100.0), ("jaccard", "Jaccard (%)", 100.0), ("asd", "ASD (voxel)", 1.0),
         ("hd95", "95HD (voxel)", 1.0), ("asd_mm", "ASD (mm)", 1.0), ("hd95_mm", "95HD (mm)", 1.0))


@dataclass(frozen=True)
class ReportOptions:
    """What the report flags and how thumbnails look."""

    agreement_flag: float = AGREEMENT_FLAG
    qc_flag: float | None = None  # threshold for a `qc_score` column; None: none drawn
    thumbnail: PreviewStyle = THUMBNAIL


@dataclass
class Thumbnails:
    """Collects one thumbnail PNG per case while evaluation still holds its arrays (the `visit` hook of
    `score_model` and `score_folders`)."""

    style: PreviewStyle = THUMBNAIL
    png: dict[str, bytes] = field(default_factory=dict)

    def __call__(self, case: str, *, mask: np.ndarray, label: np.ndarray, spacing: Sequence[float],
                 affine: np.ndarray, image: np.ndarray | None = None,
                 uncertainty: np.ndarray | None = None) -> None:
        title = preview_title(case, None, mask, spacing, None).rsplit(" · ", 1)[0]  # case and volume only
        self.png[case] = preview_png(np.asarray(mask) > 0, affine, spacing, title, image=image,
                                     uncertainty=uncertainty, label=np.asarray(label) > 0.5, style=self.style)


def qc_column(rows: list[dict[str, Any]], options: ReportOptions) -> tuple[str | None, float | None]:
    """The score to plot Dice against and its flag threshold: `qc_score` when every row has one, else
    the heads' `agreement`; (None, None) when rows carry neither (scoring mask folders)."""
    # the QC threshold the rows were flagged with (the bundle's), unless the options set one
    recorded = {r.get("qc_threshold") for r in rows} - {None}
    qc_flag = options.qc_flag if options.qc_flag is not None or len(recorded) != 1 else recorded.pop()
    for key, threshold in (("qc_score", qc_flag), ("agreement", options.agreement_flag)):
        if rows and all(r.get(key) is not None for r in rows):
            return key, threshold
    return None, None


def _img(png: bytes, alt: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(v: Any) -> float | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def _cell(v: Any, factor: float = 1.0, digits: int = 2) -> str:
    """A numeric cell: the raw value in data-v (for sorting and checking), the shown value rounded."""
    x = _num(v)
    if x is None:
        return '<td data-v="">n/a</td>'
    return f'<td data-v="{x!r}">{x * factor:.{digits}f}</td>'


def summary_table(summary: dict[str, Any], n: int, method: str) -> str:
    """The paper's layout: one row, mean ± std of Dice, Jaccard (percent), ASD and 95HD (voxels, then mm)."""
    cols = [(k, h, f) for k, h, f in PAPER if k in summary]
    head = "".join(f"<th>{h}</th>" for _, h, _ in cols)
    cells = []
    for k, _, f in cols:
        s = summary[k]
        mean, std = _num(s.get("mean")), _num(s.get("std"))
        text = "n/a" if mean is None else f"{mean * f:.2f} ± {(std or 0.0) * f:.2f}"
        cells.append(f'<td data-mean="{mean!r}" data-std="{std!r}">{text}</td>')
    nan = ", ".join(f"{h} {summary[k]['nan_count']}" for k, h, _ in cols if summary[k].get("nan_count"))
    note = (f'<p class="note">Cases with an empty mask, left out of the surface means: {html.escape(nan)}</p>'
            if nan else "")
    return (f'<table id="summary"><thead><tr><th>method</th><th>cases</th>{head}</tr></thead>'
            f"<tbody><tr><td>{html.escape(method)}</td><td>{n}</td>{''.join(cells)}</tr></tbody></table>{note}")


def case_table(rows: list[dict[str, Any]], thumbs: dict[str, bytes], qc: str | None,
               threshold: float | None) -> str:
    """One row per case, sortable by clicking a header (numbers sort by their raw value)."""
    metrics = [(k, h, f) for k, h, f in PAPER if rows and k in rows[0]]
    head = ["preview", "case", *[h for _, h, _ in metrics]]
    head += [qc or "", "flagged"] if qc else []
    head += ["seconds"] if rows and "seconds" in rows[0] else []
    body = []
    for r in rows:
        case = str(r["case"])
        thumb = _img(thumbs[case], f"preview of {case}", "thumb") if case in thumbs else "n/a"
        cells = [f"<td>{thumb}</td>", f"<td>{html.escape(case)}</td>"]
        cells += [_cell(r.get(k), f) for k, _, f in metrics]
        if qc:
            score = _num(r.get(qc))
            flagged = threshold is not None and score is not None and score < threshold
            cells += [_cell(score, 1.0, 3), f'<td data-v="{int(flagged)}">{"yes" if flagged else ""}</td>']
        if rows and "seconds" in rows[0]:
            cells.append(_cell(r.get("seconds"), 1.0, 2))
        body.append(f"<tr>{''.join(cells)}</tr>")
    ths = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f'<table id="cases" class="sortable"><thead><tr>{ths}</tr></thead><tbody>{"".join(body)}</tbody></table>'


STYLE = """body{font-family:sans-serif;margin:24px;color:#222;background:#fff}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}
th{background:#dde6f0;cursor:pointer}td:nth-child(2),th:nth-child(2){text-align:left}
img.thumb{height:120px;display:block}.note{color:#555;font-size:90%}.plots img{max-width:100%;margin-right:12px}"""

# Click a header to sort by it (again to reverse); "#sort=<header>" in the address sorts on load.
SCRIPT = """function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),
asc=th.dataset.dir!=='asc';th.dataset.dir=asc?'asc':'desc';const key=r=>{const c=r.cells[i];
return c.dataset.v===undefined?c.textContent:(c.dataset.v===''?NaN:parseFloat(c.dataset.v));};
[...t.tBodies[0].rows].sort((a,b)=>{const x=key(a),y=key(b);if(typeof x==='number'){
if(isNaN(x))return 1;if(isNaN(y))return -1;return asc?x-y:y-x;}return asc?x.localeCompare(y):y.localeCompare(x);})
.forEach(r=>t.tBodies[0].appendChild(r));}
document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
const want=decodeURIComponent((location.hash.match(/sort=([^&]+)/)||[])[1]||'');
document.querySelectorAll('table.sortable th').forEach(th=>{if(th.textContent===want)sortBy(th);});"""


def _method(extra: dict[str, Any]) -> str:
    if "model" in extra:
        engine = extra.get("engine") or {}
        parts = [f"head {engine['head']}" if engine.get("head") else "", str(extra.get("bundle_hash") or "")]
        details = ", ".join(p for p in parts if p)
        return f"{Path(str(extra['model'])).name}" + (f" ({details})" if details else "")
    return str(extra.get("predictions", "masks"))


def build_html(rows: list[dict[str, Any]], summary: dict[str, Any], extra: dict[str, Any] | None = None,
               thumbs: dict[str, bytes] | None = None, options: ReportOptions = ReportOptions()) -> str:
    """The whole page as one string."""
    extra, thumbs = extra or {}, thumbs or {}
    qc, threshold = qc_column(rows, options)
    plots = [_img(figure_png(distributions_figure(rows)), "distribution of each metric", "dist")]
    if qc:
        plots.insert(0, _img(figure_png(scatter_figure(rows, qc, threshold, qc)), f"Dice against {qc}", "scatter"))
        flagged = sum(1 for r in rows if threshold is not None and _num(r.get(qc)) is not None and r[qc] < threshold)
        qc_note = (f"<p>{flagged} of {len(rows)} cases flagged ({qc} below {threshold:g}).</p>"
                   if threshold is not None else f"<p>No flag threshold is known for {qc}.</p>")
    else:
        qc_note = '<p class="note">No QC score in these rows (masks scored from folders): no scatter.</p>'
    meta = {k: extra[k] for k in ("model", "bundle_hash", "backend", "cases_from", "unscored_labels") if k in extra}
    meta_html = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in meta.items())
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>dtml evaluation</title>'
            f"<style>{STYLE}</style></head><body><h1>dtml evaluation</h1><ul>{meta_html}"
            f"<li><b>written</b>: {when}</li></ul><h2>Summary</h2>"
            f"{summary_table(summary, len(rows), _method(extra))}{qc_note}"
            f'<h2>Charts</h2><div class="plots">{"".join(plots)}</div>'
            f"<h2>Cases</h2><p class=\"note\">Click a header to sort.</p>{case_table(rows, thumbs, qc, threshold)}"
            f"<script>{SCRIPT}</script></body></html>\n")


def write_html_report(path: Path, rows: list[dict[str, Any]], summary: dict[str, Any],
                      extra: dict[str, Any] | None = None, thumbs: dict[str, bytes] | None = None,
                      options: ReportOptions = ReportOptions()) -> Path:
    """Write the page atomically."""
    write_report_text(Path(path), build_html(rows, summary, extra, thumbs, options), "the HTML report")
    return Path(path)
