"""The int8 accuracy gate: OpenVINO int8 against OpenVINO fp32 on LA2018's 64 unlabeled cases.

1. `dtml export --int8` (export/pipeline.py, the command's own code) of the shipped model, calibrated on the
   16 LABELED training cases (--calibration-cases, 4 windows each), which also checks int8 against fp32 on
   them; skipped when --export already holds both IRs.
2. Every unlabeled case segmented with both IRs through the `dtml segment` pipeline (dtml protocol: both
   heads, Gaussian blending, LCC, QC): Dice and 95HD of each against the label, mask Dice of int8 against
   fp32, and both QC scores.

Rows are appended to the JSON after every case (a restarted run skips the cases already there), so a
slow shared CPU can run it in the background and a partial file is usable. Further processes can score
the cases from the other end into their own files once the IRs exist; `--merge` joins the files:

    nice -n 5 python benchmarks/openvino_accuracy.py --export /tmp/ov-export
    nice -n 5 python benchmarks/openvino_accuracy.py --export /tmp/ov-export --reverse --json /tmp/b.json
    python benchmarks/openvino_accuracy.py --export /tmp/ov-export --merge /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, find_data, machine
from dtml_deploy.bundle import Bundle
from dtml_deploy.io.atomic import atomic_write_text
from dtml_deploy.io.volume import read_volume
from dtml_deploy.metrics import agreement, case_metrics
from dtml_deploy.predictor import Predictor
from dtml_export.pipeline import ExportRequest, run_export

MODEL = REPO / "dtml_deploy" / "default_model"
OUT = REPO / "benchmarks" / "results" / "openvino_accuracy_cpu.json"


def make_export(folder: Path, root: Path, calibration: list[str], cases: int) -> dict[str, Any]:
    """The int8 export exactly as `dtml export --int8 --calibration ...` makes it, timed."""
    xml = folder / "model-int8.xml"
    if xml.is_file() and (folder / "model-fp32.xml").is_file():
        return {"reused": str(folder)}
    scans = tuple(root / "images" / f"{c}.nii.gz" for c in calibration)
    lines: list[str] = []
    t = time.perf_counter()
    run_export(ExportRequest(bundle=MODEL, out_dir=folder, int8=True, calibration=scans, calibration_cases=cases),
               lambda s: (lines.append(s), print(s, flush=True)))
    checks = [ln.strip() for ln in lines if "int8 vs fp32 on" in ln]
    return {"seconds": round(time.perf_counter() - t, 1), "calibration_cases": list(calibration[:cases]),
            "calibration_windows": ExportRequest.calibration_windows, "check": checks}


def score_case(segmenters: dict[str, Any], root: Path, cid: str) -> dict[str, Any]:
    """Both IRs on one case: metrics against the label, their mask agreement, their QC scores."""
    img = read_volume(root / "images" / f"{cid}.nii.gz")
    lab = read_volume(root / "labels" / f"{cid}.nii.gz").array > 0
    row: dict[str, Any] = {"case": cid, "shape": list(img.array.shape)}
    masks = {}
    for name, seg in segmenters.items():
        t = time.perf_counter()
        out = seg.segment_array(img.array, img.spacing, cid)
        row[f"{name}_seconds"] = round(time.perf_counter() - t, 2)
        masks[name] = out.mask
        m = case_metrics(out.mask, lab, img.spacing)
        row[f"{name}_dice"], row[f"{name}_hd95_mm"] = m["dice"], m["hd95_mm"]
        row[f"{name}_qc"] = out.qc.score if out.qc is not None else None
        row[f"{name}_flagged"] = out.qc.flagged if out.qc is not None else None
        row["windows"] = out.windows
    row["mask_dice_int8_vs_fp32"] = agreement(masks["int8"], masks["fp32"])
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def finite(v: Any) -> bool:
        return v is not None and not math.isnan(v)

    # 95HD exists only where a mask is non-empty: both IRs are averaged over the cases where both have one.
    both = [r for r in rows if finite(r["fp32_hd95_mm"]) and finite(r["int8_hd95_mm"])]

    def mean(key: str) -> float:
        vals = [r[key] for r in (both if "hd95" in key else rows) if finite(r.get(key))]
        return statistics.fmean(vals) if vals else math.nan

    worst = min(rows, key=lambda r: r["mask_dice_int8_vs_fp32"])
    # The cases a user would take without review: fp32's QC score does not flag them (no label involved).
    passed = [r for r in rows if r["fp32_flagged"] is False] or rows
    worst_passed = min(passed, key=lambda r: r["mask_dice_int8_vs_fp32"])
    qc = [abs(r["int8_qc"] - r["fp32_qc"]) for r in rows if r["int8_qc"] is not None and r["fp32_qc"] is not None]
    return {
        "cases": len(rows), "hd95_cases": len(both),
        **{f"{p}_{m}": mean(f"{p}_{m}") for p in ("fp32", "int8") for m in ("dice", "hd95_mm", "seconds")},
        "mask_dice_int8_vs_fp32_mean": mean("mask_dice_int8_vs_fp32"),
        "mask_dice_int8_vs_fp32_min": worst["mask_dice_int8_vs_fp32"], "worst_case": worst["case"],
        "min_int8_agreement": ExportRequest.min_int8_agreement,
        "cases_below_min_agreement": sum(bool(r["mask_dice_int8_vs_fp32"] < ExportRequest.min_int8_agreement)
                                         for r in rows),
        "worst_case_fp32_dice": worst["fp32_dice"], "qc_passed_cases": len(passed),
        "mask_dice_int8_vs_fp32_min_qc_passed": worst_passed["mask_dice_int8_vs_fp32"],
        "worst_qc_passed_case": worst_passed["case"],
        "qc_abs_diff_mean": statistics.fmean(qc) if qc else None, "qc_abs_diff_max": max(qc) if qc else None,
        "qc_flag_disagreements": sum(r["int8_flagged"] != r["fp32_flagged"] for r in rows),
    }


def dumps(report: dict[str, Any]) -> str:
    """The report as JSON; numpy scalars (metrics, QC flags) as their Python values."""
    def plain(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"{type(o).__name__} in the report")

    return json.dumps(report, indent=1, default=plain) + "\n"


def merge(target: Path, parts: list[Path]) -> None:
    """Add the rows of `parts` (by case, first one kept) to `target` and recompute its summary."""
    report = json.loads(target.read_text())
    rows = {r["case"]: r for r in report["cases"]}
    for part in parts:
        for r in json.loads(part.read_text())["cases"]:
            rows.setdefault(r["case"], r)
    root = find_data()
    order = json.loads((root / "splits.json").read_text())["unlabeled_16"] if root else sorted(rows)
    report["cases"] = [rows[c] for c in order if c in rows]
    report["summary"] = summary(report["cases"])
    atomic_write_text(target, dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, required=True, help="folder for (or holding) model-fp32/int8.xml")
    ap.add_argument("--calibration-cases", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None, help="score only the first N unlabeled cases")
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument("--reverse", action="store_true", help="score the cases from the last one backwards")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="add these files' rows to --json and stop")
    ap.add_argument("--load", default="", help="what else ran on the machine meanwhile (recorded in the JSON)")
    args = ap.parse_args()
    if args.merge:
        merge(args.json, args.merge)
        return
    root = find_data()
    if root is None:
        sys.exit("error: LA2018 not found (set DTML_DATA)")
    splits = json.loads((root / "splits.json").read_text())
    report: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    report.update(machine=machine(), note=args.load or report.get("note", ""),
                  export=report.get("export") or make_export(args.export, root, splits["labeled_16"],
                                                             args.calibration_cases))
    bundle = Bundle.load(MODEL)
    segmenters = {p: Predictor.load(bundle, backend="openvino", device="cpu",
                                    artifact=args.export / f"model-{p}.xml").segmenter
                  for p in ("fp32", "int8")}
    report["settings"] = {p: s.backend.describe() for p, s in segmenters.items()}
    rows = report.setdefault("cases", [])
    done = {r["case"] for r in rows}
    ids = splits["unlabeled_16"][: args.limit]
    for cid in reversed(ids) if args.reverse else ids:
        if cid in done:
            continue
        rows.append(score_case(segmenters, root, cid))
        report["summary"] = summary(rows)
        atomic_write_text(args.json, dumps(report))
        r = rows[-1]
        print(f"{len(rows)}/{args.limit or len(splits['unlabeled_16'])} {cid}: int8 vs fp32 "
              f"{r['mask_dice_int8_vs_fp32']:.4f}, dice {r['fp32_dice']:.4f}/{r['int8_dice']:.4f}", flush=True)


if __name__ == "__main__":
    main()
