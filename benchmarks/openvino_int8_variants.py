"""Which int8 quantisation keeps the masks closest to fp32: NNCF variants scored window by window.

The shipped model's fp32 IR is quantised with NNCF several ways, each calibrated as `dtml export --int8` does
(windows spread over each of the 16 LABELED training scans), and every window of a fixed set of unlabeled scans
is run through the fp32 IR and each int8 IR: both networks, mask = mean probability > 0.5, Dice of the int8 mask
with the fp32 mask per scan (its windows together, before blending) and the mean absolute probability
difference; `infer_seconds` is the time of all those windows through the variant (compilation included, one
process, variants one after the other: a rough speed check, not the speed benchmark). The scans: the five on
which the first int8 IR (NNCF's defaults) disagreed most with fp32 in the 64-case gate
(benchmarks/openvino_accuracy.py) and three ordinary ones; a variant is chosen on all eight, and the 64-case
gate then measures the chosen one on every case.

    nice -n 5 python benchmarks/openvino_int8_variants.py --fp32 /tmp/ov-export/model-fp32.xml
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, find_data, machine
from dtml_deploy.artifacts import ONNX_INPUT
from dtml_deploy.bundle import Bundle
from dtml_deploy.io.atomic import atomic_write_text
from dtml_deploy.metrics import agreement
from dtml_export.openvino_export import edge_convolutions, quantize_int8, scan_windows

MODEL = REPO / "dtml_deploy" / "default_model"
OUT = REPO / "benchmarks" / "results" / "openvino_int8_variants_cpu.json"
SCANS = ("Q0MEX9ZIKAGJORSPLQ3Y", "A4R1S23KR0KU2WSYHK2X", "DQ5UYBGR5QP6L692QSG6", "OIRDLE32TXZX942FVZMM",
         "5QFK2PMHNX7UALK52NNA", "5FKQL4K14KCB72Y8YMC2", "8M99G0JLAXG9GLPV0O8G", "TDDI6L3Y0L9VVFP9MNFS")
BATCH = 4
SHIPPED = "full bias correction, edge fp32"
VARIANTS = {  # name -> (what it is, windows per calibration scan)
    "default": ("nncf.quantize defaults: symmetric int8, fast bias correction", 4),
    "mixed": ("preset MIXED (asymmetric activations)", 4),
    "16 windows": ("defaults, 16 calibration windows per scan", 16),
    "edge fp32": ("defaults, first and output convolutions kept fp32 (edge_convolutions)", 4),
    "full bias correction": ("fast_bias_correction=False: each layer's bias corrected on the int8 model's own "
                             "activations", 4),
    SHIPPED: ("both: what `dtml export --int8` does (export/openvino_export.py quantize_int8)", 4),
}


def quantize(fp32: Any, variant: str, windows: list[np.ndarray]) -> Any:
    import nncf

    if variant == SHIPPED:
        return quantize_int8(fp32, windows)
    kw: dict[str, Any] = {}
    if variant == "mixed":
        kw["preset"] = nncf.QuantizationPreset.MIXED
    if "edge" in variant:
        kw["ignored_scope"] = nncf.IgnoredScope(names=edge_convolutions(fp32))
    if "full bias" in variant:
        kw["fast_bias_correction"] = False
    return nncf.quantize(fp32, nncf.Dataset(windows, lambda w: {ONNX_INPUT: w}), subset_size=len(windows), **kw)


def mean_probability(model: Any, windows: np.ndarray, patch: tuple[int, ...]) -> np.ndarray:
    """Mean of p_seg and p_dis for every window, `BATCH` windows per forward (a short last batch padded)."""
    import openvino as ov

    m = ov.Model([model.output("p_seg"), model.output("p_dis")], model.get_parameters(), "pair")
    m.reshape({ONNX_INPUT: [BATCH, 1, *patch]})
    request = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    out = []
    for i in range(0, len(windows), BATCH):
        b = windows[i:i + BATCH]
        x = np.concatenate([b, np.repeat(b[-1:], BATCH - len(b), 0)])
        r = request.infer({ONNX_INPUT: x})
        out.append(((np.asarray(r["p_seg"]) + np.asarray(r["p_dis"])) / 2)[:len(b)])
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", type=Path, required=True, help="model-fp32.xml of the shipped model")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", type=Path, default=OUT)
    args = ap.parse_args()
    root = find_data()
    if root is None:
        sys.exit("error: LA2018 not found (set DTML_DATA)")
    import openvino as ov

    bundle = Bundle.load(MODEL)
    patch = bundle.model.patch_size
    labeled = json.loads((root / "splits.json").read_text())["labeled_16"]
    scans = {c: np.concatenate(scan_windows(root / "images" / f"{c}.nii.gz", bundle, 10_000)) for c in SCANS}
    fp32 = ov.Core().read_model(str(args.fp32))
    ref = {c: mean_probability(fp32, w, patch) for c, w in scans.items()}
    report: dict[str, Any] = {"machine": machine(), "scans": {c: len(w) for c, w in scans.items()}, "rows": []}
    for name in args.variants:
        what, per_scan = VARIANTS[name]
        calib = [w for c in labeled for w in scan_windows(root / "images" / f"{c}.nii.gz", bundle, per_scan)]
        t = time.perf_counter()
        q = quantize(ov.Core().read_model(str(args.fp32)), name, calib)
        seconds = time.perf_counter() - t
        per = {}
        t = time.perf_counter()
        probs = {c: mean_probability(q, w, patch) for c, w in scans.items()}
        infer_seconds = time.perf_counter() - t
        for c, p in probs.items():
            per[c] = {"mask_dice": agreement(p > 0.5, ref[c] > 0.5), "mean_abs_diff": float(np.abs(p - ref[c]).mean())}
        dice = [v["mask_dice"] for v in per.values()]
        report["rows"].append({"variant": name, "what": what, "calibration_windows": len(calib),
                               "quantise_seconds": round(seconds, 1), "infer_seconds": round(infer_seconds, 1),
                               "mean_mask_dice": statistics.fmean(dice),
                               "min_mask_dice": min(dice), "scans": per})
        print(f"{name}: mean {statistics.fmean(dice):.4f}, min {min(dice):.4f}", flush=True)
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
