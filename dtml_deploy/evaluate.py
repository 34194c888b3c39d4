"""Score masks against labels in the paper's column order (Dice, Jaccard, ASD, 95HD).

Two ways in: masks already on disk (`score_folders`), or a bundle segmenting the cases of a data set
and scoring them in the same run (`score_model`). Metrics are medpy-exact (see metrics.py): voxels, as
the paper reports, and millimetres from each image's spacing.

Every case is checked and scored on its own: a prediction and label that are not on the same grid
(shape, and affine within `GridTolerance`; `ignore_geometry` skips the affine), a file that cannot be
read or a segmentation that fails gives a row with status 'failed' and one error line, and the other
cases are still scored.

Empty masks. A case whose prediction and label are both empty has no defined Dice (0/0) or surface
distance, so, as nnU-Net's evaluation does, it is left out of every mean (its metrics are NaN, written
as null) and the summary counts it (`both_empty`). When only one mask is empty, Dice and Jaccard are 0
and count in their means; the distances are undefined and left out of theirs (the summary's
`nan_count`). metrics.py keeps medpy's per-function values; this policy is applied to the rows here.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtml_deploy.errors import InputError
from dtml_deploy.io.datasets import LabeledCase
from dtml_deploy.io.extent import voxel_estimate
from dtml_deploy.io.geometry import GridTolerance
from dtml_deploy.io.refs import read_ref
from dtml_deploy.io.reports import write_report_text
from dtml_deploy.io.volume import Volume, has_volume_suffix, read_volume
from dtml_deploy.metrics import case_metrics, summarise
from dtml_deploy.ranks import Beat, ShardSettings, run_cases
from dtml_deploy.segment import Segmenter, case_error, case_name

if TYPE_CHECKING:
    from dtml_deploy.predictor import Predictor

COLUMNS = ("dice", "jaccard", "asd", "hd95", "asd_mm", "hd95_mm")
HEADERS = {"dice": "Dice %", "jaccard": "Jaccard %", "asd": "ASD vox", "hd95": "95HD vox",
           "asd_mm": "ASD mm", "hd95_mm": "95HD mm"}


def _binary(array: np.ndarray, path: Path) -> np.ndarray:
    values = np.unique(array)
    if not np.isin(values, (0.0, 1.0)).all():
        raise InputError(f"{path}: mask is not binary (values {values[:6].tolist()})")
    return array > 0.5


def grid_mismatch(pred: Volume, gt: Volume, tol: GridTolerance = GridTolerance(),
                  check_affine: bool = True) -> str | None:
    """Why `pred` and `gt` are not on the same grid, or None when they are (shape, then affine)."""
    if pred.shape != gt.shape:
        return f"shape {pred.shape} != label shape {gt.shape}"
    if not check_affine:
        return None
    a, b = np.asarray(pred.affine, np.float64), np.asarray(gt.affine, np.float64)
    shift = float(np.abs(a[:3, 3] - b[:3, 3]).max())
    if shift > tol.translation_mm:
        return (f"origin {shift:.4g} mm away from the label's (tolerance {tol.translation_mm:g} mm; "
                f"--ignore-geometry to score it anyway)")
    scale = max(float(np.abs(a[:3, :3]).max()), float(np.abs(b[:3, :3]).max()))
    axes = float(np.abs(a[:3, :3] - b[:3, :3]).max())
    if axes > tol.rtol * scale:
        sa, sb = (tuple(round(float(v), 4) for v in np.linalg.norm(m[:3, :3], axis=0)) for m in (a, b))
        return (f"voxel axes differ from the label's (spacing {sa} vs {sb} mm, or the orientation; relative "
                f"difference {axes / scale:.3g}, tolerance {tol.rtol:g}; --ignore-geometry to score it anyway)")
    return None


def _score(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], name: str) -> dict[str, Any]:
    if pred.shape != gt.shape:
        raise InputError(f"{name}: prediction shape {pred.shape} != label shape {gt.shape}")
    row = {"case": name, "status": "ok", **case_metrics(pred, gt, tuple(spacing))}
    if not pred.any() and not gt.any():  # the both-empty policy (module docstring): out of every mean
        row.update({k: math.nan for k in COLUMNS if k in row}, both_empty=True)
    return row


def _failed(name: str, error: str) -> dict[str, Any]:
    return {"case": name, "status": "failed", "error": error}


def _pred_files(pred_dir: Path, gt_dir: Path) -> tuple[list[Path], dict[str, Path]]:
    for d in (pred_dir, gt_dir):
        if not Path(d).is_dir():
            raise InputError(f"{d}: not a folder")
    gts: dict[str, Path] = {}
    for p in sorted(Path(gt_dir).iterdir()):
        if has_volume_suffix(p):
            if case_name(p) in gts:
                raise InputError(f"{gt_dir}: two labels for case '{case_name(p)}' ({gts[case_name(p)].name}, {p.name})")
            gts[case_name(p)] = p
    preds = [p for p in sorted(Path(pred_dir).iterdir()) if has_volume_suffix(p)
             and not case_name(p).endswith(("_prob", "_sdm", "_uncertainty"))]
    if not preds:
        raise InputError(f"{pred_dir}: no masks found")
    names = [case_name(p) for p in preds]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{pred_dir}: two predictions for case '{dupes[0]}'")
    missing = [n for n in names if n not in gts]
    if missing:
        raise InputError(f"{gt_dir}: no label for {', '.join(missing[:5])}")
    return preds, gts


def score_folders(pred_dir: Path, gt_dir: Path, ignore_geometry: bool = False,
                  spacing: tuple[float, float, float] | None = None,
                  visit: Callable[..., None] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Score every mask in `pred_dir` against the label of the same case name in `gt_dir`.

    Returns the rows (a case that cannot be scored is a 'failed' row) and the labelled cases that have
    no prediction (not scored; callers say so). `visit(case, mask=, label=, spacing=, affine=)` sees each
    scored case's arrays (report thumbnails)."""
    preds, gts = _pred_files(pred_dir, gt_dir)
    unscored = sorted(set(gts) - {case_name(p) for p in preds})
    rows = []
    for p in preds:
        name = case_name(p)
        try:
            pv = read_volume(p, dataset="label", spacing=spacing)
            gv = read_volume(gts[name], dataset="label", spacing=spacing)
            bad = grid_mismatch(pv, gv, check_affine=not ignore_geometry)
            if bad:
                raise InputError(f"{p}: not on the label's grid ({gts[name]}): {bad}")
            row = _score(_binary(pv.array, p), _binary(gv.array, gts[name]), gv.spacing, name)
            if gv.guessed:
                row["geometry_guessed"] = ",".join(gv.guessed)
            if visit is not None:
                visit(name, mask=pv.array, label=gv.array, spacing=gv.spacing, affine=gv.affine)
            rows.append(row)  # only now: a case whose thumbnail fails is one failed row, not two rows
        except Exception as e:  # one case never stops the others
            rows.append(_failed(name, case_error(p, e)))
    return rows, unscored


def score_model(predictor: Predictor, cases: Sequence[LabeledCase],
                progress: Callable[[str], None] | None = None,
                ignore_geometry: bool = False, visit: Callable[..., None] | None = None,
                shard: ShardSettings = ShardSettings()) -> list[dict[str, Any]] | None:
    """Segment each case's image with `predictor` and score it against its label; a case that fails
    (unreadable image or label, grids that differ, limits, ...) is a 'failed' row. `visit(case, mask=,
    label=, spacing=, affine=, image=, uncertainty=)` sees each scored case's arrays (report thumbnails).
    Under torchrun the cases are shared among the ranks (dtml_deploy/ranks.py): rank 0 returns every row
    in case order (a case the job stopped before is a failed row), the other ranks None. Only results
    travel between ranks: a case's row and, when `visit` is given, its mask and uncertainty (packed);
    rank 0 reads the image and label again from their paths and calls `visit` for every case.
    `progress(case)` runs on rank 0 as each case arrives."""
    segmenter, ranks = predictor.segmenter, predictor.ranks
    carry = ranks.distributed and visit is not None

    def work(i: int, beat: Beat) -> dict[str, Any]:
        kept: dict[str, Any] = {}
        row = _score_case(segmenter, cases[i], ignore_geometry, _packer(kept) if carry else visit, beat)
        return {"row": row, **kept}

    def on_result(i: int, result: dict[str, Any]) -> None:  # rank 0 only
        if carry and "mask" in result:
            try:
                _visit_from_result(segmenter, cases[i], result, visit)  # type: ignore[arg-type]
            except Exception as e:  # a case whose thumbnail fails is one failed row, as in one process
                result["row"] = _failed(cases[i].case_id, case_error(cases[i].image.path, e))
        if progress is not None:
            progress(cases[i].case_id)

    def weight(i: int) -> int:
        return voxel_estimate(cases[i].image.path, cases[i].image.dataset)

    outcome = run_cases([c.case_id for c in cases], weight, work, on_result, ranks, shard, "evaluate")
    if outcome is None:
        return None
    return [r["row"] if r is not None else _failed(c.case_id, f"{c.image.path}: not scored: {outcome.stopped}")
            for c, r in zip(cases, outcome.results)]


def _packer(kept: dict[str, Any]) -> Callable[..., None]:
    """A `visit` that keeps a case's results as JSON-able text: the mask as bits, the uncertainty (in
    [0, 1]) in 1/255 steps, each zlib-compressed (a few tens of kB for an LA scan)."""
    def keep(case: str, *, mask: np.ndarray, uncertainty: np.ndarray | None = None, **_: Any) -> None:
        kept["shape"] = list(mask.shape)
        kept["mask"] = _pack(np.packbits(np.asarray(mask, dtype=bool)))
        if uncertainty is not None:
            kept["uncertainty"] = _pack(np.rint(np.clip(uncertainty, 0.0, 1.0) * 255).astype(np.uint8))
    return keep


def _pack(a: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(a.tobytes(), 6)).decode("ascii")


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)


def _visit_from_result(segmenter: Segmenter, case: LabeledCase, result: dict[str, Any],
                       visit: Callable[..., None]) -> None:
    """Rank 0: `visit` a case another rank scored, from its carried results and its files."""
    shape = tuple(result["shape"])
    mask = np.unpackbits(_unpack(result["mask"]), count=int(np.prod(shape))).reshape(shape)
    unc = (_unpack(result["uncertainty"]).reshape(shape).astype(np.float32) / 255
           if "uncertainty" in result else None)
    spacing, opts = segmenter.bundle.model.spacing, segmenter.options
    img = read_ref(case.image, spacing, spacing=opts.spacing, max_voxels=opts.limits.max_voxels)
    lab = read_ref(case.label, spacing, role="label", spacing=opts.spacing, max_voxels=opts.limits.max_voxels)
    visit(case.case_id, mask=mask, label=lab.array, spacing=img.spacing, affine=img.affine, image=img.array,
          uncertainty=unc)


def _score_case(segmenter: Segmenter, case: LabeledCase, ignore_geometry: bool,
                visit: Callable[..., None] | None, beat: Beat) -> dict[str, Any]:
    spacing, opts = segmenter.bundle.model.spacing, segmenter.options
    try:
        # challenge cases are preprocessed as for training (io/challenge.py)
        img = read_ref(case.image, spacing, spacing=opts.spacing, max_voxels=opts.limits.max_voxels)
        lab = read_ref(case.label, spacing, role="label", spacing=opts.spacing, max_voxels=opts.limits.max_voxels)
        bad = grid_mismatch(img, lab, check_affine=not ignore_geometry)
        if bad:
            raise InputError(f"{case.label.path}: not on the image's grid ({case.image.path}): {bad}")
        t = time.perf_counter()
        seg = segmenter.segment_array(img.array, None if "spacing" in img.guessed else img.spacing,
                                      str(case.image.path), lambda done, total: beat())
        seconds = time.perf_counter() - t
        row = _score(seg.mask.astype(bool), _binary(lab.array, case.label.path), img.spacing, case.case_id)
        row.update(seconds=round(seconds, 4), windows=seg.windows, agreement=seg.agreement)
        if img.guessed:
            row["geometry_guessed"] = ",".join(img.guessed)
        if seg.warnings:  # a cropped raw scan (dtml_deploy/fov.py)
            row["warnings"] = "; ".join(seg.warnings)
        if seg.qc is not None:
            row.update(qc_score=seg.qc.score, qc_threshold=seg.qc.threshold, qc_flagged=seg.qc.flagged,
                       **{f"qc_{k}": v for k, v in seg.qc.parts.items()})
        if visit is not None:
            visit(case.case_id, mask=seg.mask, label=lab.array, spacing=img.spacing, affine=img.affine,
                  image=img.array, uncertainty=seg.uncertainty)
    except Exception as e:  # one case never stops the others
        row = _failed(case.case_id, case_error(case.image.path, e))
    return row


def summarise_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`metrics.summarise` over the scored rows, plus how many cases were scored, failed and both-empty."""
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    out: dict[str, Any] = summarise([{k: v for k, v in r.items() if k != "both_empty"} for r in ok])
    out["cases"] = {"scored": len(ok), "failed": len(rows) - len(ok),
                    "both_empty": sum(bool(r.get("both_empty")) for r in ok)}
    return out


def format_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """A plain-text table in the paper's order, Dice and Jaccard in percent, then mean ± std (failed
    cases are listed on stderr by the caller, not here)."""
    rows = [r for r in rows if r.get("status", "ok") == "ok"]
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
    both = summary.get("cases", {}).get("both_empty", 0)
    if both:
        lines.append(f"({both} case(s) with both masks empty: no defined score, left out of every mean)")
    nan = {c: summary[c]["nan_count"] - both for c in cols if summary[c]["nan_count"] > both}
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
        write_report_text(json_path, json.dumps(doc, indent=2, default=float, allow_nan=False) + "\n",
                          "the JSON report")
    if csv_path is not None:
        buf = io.StringIO()
        keys = list(dict.fromkeys(k for r in rows for k in r)) or ["case"]  # failed rows have fewer columns
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        write_report_text(csv_path, buf.getvalue(), "the CSV report")
