"""Calibrate the per-case QC score and measure head x TTA x protocol on LA2018's 64 unlabeled cases.

Two phases, so a slow shared CPU can run the expensive one in the background and a partial run is usable:

  segment  runs the engine ONCE per case and configuration, keeping both heads' maps (p_seg, p_dis and,
           with TTA, the per-voxel spread between flips) in a cache folder, one file per case, written
           as soon as the case is done;
  analyse  reads the cache, derives all three heads (seg, sdm, mean) and every QC feature from the same
           maps, scores them against the labels with dtml_deploy/metrics.py, picks the QC threshold, and
           writes per-case rows plus the summary as JSON (benchmarks/results/qc_calibration_cpu.json).

The QC reference statistics (training label volumes, intensity quantiles) come from the 16 LABELED cases
only (`reference` phase, stored in the bundle's config.json under `qc`); the threshold is tuned on the 64
unlabeled cases, which are the developers' evaluation set.

    python benchmarks/qc_calibration.py segment --config dtml --precision bf16
    python benchmarks/qc_calibration.py segment --config dtml-tta --precision bf16
    python benchmarks/qc_calibration.py segment --config paper --precision bf16
    python benchmarks/qc_calibration.py analyse
    python benchmarks/qc_calibration.py threshold --write-bundle   # refit from the JSON's rows only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, find_data, machine
from benchmarks.qc_threshold import FAILURE_DICE, auroc, calibrate
from dtml_deploy.backends.base import BackendOptions, create_backend
from dtml_deploy.bundle import Bundle
from dtml_deploy.engine.grid import PAPER_STRIDE, GridSpec
from dtml_deploy.engine.sliding import EngineConfig, SlidingWindowEngine
from dtml_deploy.intensity import prepare
from dtml_deploy.io.volume import read_volume

MODEL = REPO / "dtml_deploy" / "default_model"
CACHE = REPO / "runs" / "qc_cache"
# Engine settings of each measured configuration; the head is chosen later from the same maps.
CONFIGS: dict[str, dict] = {
    "dtml": {"grid": GridSpec(overlap=0.5), "blend": "gaussian", "tta": False},
    "dtml-tta": {"grid": GridSpec(overlap=0.5), "blend": "gaussian", "tta": True},
    "paper": {"grid": GridSpec(stride=PAPER_STRIDE), "blend": "constant", "tta": False},
}


def engine_for(config: str, precision: str, batch: int) -> tuple[SlidingWindowEngine, Bundle, str]:
    spec = CONFIGS[config]
    bundle = Bundle.load(MODEL)
    extra = {"tta": True} if spec["tta"] else {}
    cfg = EngineConfig(grid=spec["grid"], blend=spec["blend"], head="mean", keep_heads=True, **extra)
    backend = create_backend("torch", bundle, BackendOptions(device="cpu", precision=precision, batch=batch),
                             cfg.channels)
    return SlidingWindowEngine(backend, bundle.model.patch_size, cfg), bundle, backend.describe()


def segment_phase(args: argparse.Namespace) -> None:
    data = find_data()
    if data is None:
        sys.exit("error: LA2018 not found (set DTML_DATA)")
    ids = json.loads((data / "splits.json").read_text())[args.cases][: args.limit]
    if args.reverse:  # a second worker from the other end; a case both reach is simply done twice
        ids = ids[::-1]
    out = args.cache / f"{args.config}-{args.precision}"
    out.mkdir(parents=True, exist_ok=True)
    engine, bundle, describe = engine_for(args.config, args.precision, args.batch)
    for i, cid in enumerate(ids):
        if (out / f"{cid}.json").exists():
            continue
        img = read_volume(data / "images" / f"{cid}.nii.gz", default_spacing=bundle.model.spacing)
        x, how = prepare(img.array, bundle.model.intensity, "auto", cid)
        t = time.perf_counter()
        res = engine.run(x)
        seconds = time.perf_counter() - t
        maps = {"p_seg": res.p_seg, "p_dis": res.p_dis}
        if res.tta_spread is not None:
            maps["tta_spread"] = res.tta_spread
        tmp = out / f".{cid}.npz"
        np.savez_compressed(tmp, **maps)
        os.replace(tmp, out / f"{cid}.npz")
        meta = {"case": cid, "seconds": seconds, "windows": res.n_windows, "forwards": res.n_forwards,
                "intensity": how, "precision": args.precision, "config": args.config, "backend": describe,
                "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (out / f"{cid}.json").write_text(json.dumps(meta) + "\n")
        print(f"[{i + 1}/{len(ids)}] {args.config} {cid}: {res.n_windows} windows, {seconds:.1f} s", flush=True)


def reference_phase(args: argparse.Namespace) -> dict:
    """QC reference statistics from the LABELED training cases only: their label volumes and the median
    shape of their intensity histograms (and how far the farthest of them lies from it)."""
    from dtml_deploy.qc import intensity_stats

    data = find_data()
    if data is None:
        sys.exit("error: LA2018 not found (set DTML_DATA)")
    ids = json.loads((data / "splits.json").read_text())[args.labeled]
    bundle = Bundle.load(MODEL)
    vols, stats = [], []
    for cid in ids:
        img = read_volume(data / "images" / f"{cid}.nii.gz", default_spacing=bundle.model.spacing)
        lab = read_volume(data / "labels" / f"{cid}.nii.gz", default_spacing=bundle.model.spacing)
        x, _ = prepare(img.array, bundle.model.intensity, "auto", cid)
        vols.append(float((lab.array > 0.5).sum()) * float(np.prod(lab.spacing)) / 1000.0)
        stats.append(intensity_stats(x))
    q = np.median(np.stack([s["quantiles"] for s in stats]), axis=0)
    dist = [float(np.abs(s["quantiles"] - q).mean()) for s in stats]
    ref = {"volume_ml": [round(min(vols), 3), round(max(vols), 3)],
           "intensity_quantiles": [round(float(v), 5) for v in q], "intensity_distance": round(max(dist), 5),
           "point_mass": round(max(s["point_mass"] for s in stats), 5),
           "smoothness": round(min(s["smoothness"] for s in stats), 5), "labeled_cases": args.labeled,
           "label_volumes_ml": [round(v, 3) for v in vols], "intensity_distances": [round(d, 5) for d in dist]}
    args.reference.parent.mkdir(parents=True, exist_ok=True)
    args.reference.write_text(json.dumps(ref, indent=2) + "\n")
    print(json.dumps(ref, indent=2))
    return ref


HEAD_NAMES = ("seg", "sdm", "mean")


def case_rows(cache_dir: Path, cid: str, data: Path, bundle: Bundle, ref) -> list[dict]:
    """All three heads of one cached case: final mask, metrics against the label, QC features."""
    from dtml_deploy.metrics import case_metrics
    from dtml_deploy.qc import case_features

    meta = json.loads((cache_dir / f"{cid}.json").read_text())
    maps = np.load(cache_dir / f"{cid}.npz")
    img = read_volume(data / "images" / f"{cid}.nii.gz", default_spacing=bundle.model.spacing)
    lab = read_volume(data / "labels" / f"{cid}.nii.gz", default_spacing=bundle.model.spacing)
    x, _ = prepare(img.array, bundle.model.intensity, "auto", cid)
    spread = maps.get("tta_spread", None)
    rows = []
    for head in HEAD_NAMES:
        t = time.perf_counter()
        mask, feats = case_features(x, maps["p_seg"], maps["p_dis"], head, spacing=bundle.model.spacing,
                                    tta_spread=spread, reference=ref)
        qc_s = time.perf_counter() - t
        m = case_metrics(mask, lab.array > 0.5, lab.spacing)
        rows.append({"config": meta["config"], "precision": meta["precision"], "head": head, "case": cid,
                     **m, "seconds": meta["seconds"], "windows": meta["windows"], "forwards": meta["forwards"],
                     "qc_seconds": qc_s, **feats})
    return rows


def _mean(rows: list[dict], key: str) -> float | None:
    v = [r[key] for r in rows if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
    return float(np.mean(v)) if v else None


def head_table(rows: list[dict], common: set[str]) -> list[dict]:
    """One row per configuration x head, on the cases every configuration covers (so rows compare)."""
    out = []
    for (config, precision) in sorted({(r["config"], r["precision"]) for r in rows}):
        for head in HEAD_NAMES:
            sel = [r for r in rows if r["config"] == config and r["head"] == head and r["case"] in common]
            if not sel:
                continue
            out.append({"config": config, "protocol": "paper" if config == "paper" else "dtml",
                        "tta": config.endswith("tta"), "head": head, "precision": precision, "cases": len(sel),
                        **{k: _mean(sel, k) for k in ("dice", "jaccard", "hd95", "asd", "seconds", "windows",
                                                       "forwards")},
                        "median_dice": float(np.median([r["dice"] for r in sel])),
                        "hd95_missing": sum(r["hd95"] is None or math.isnan(r["hd95"]) for r in sel)})
    return out


# Model-side candidates for the score's agreement part; +1: higher means a better case, -1: lower does.
CANDIDATES = {"agreement": 1, "band_agreement": 1, "band_soft_agreement": 1, "disagreement_ratio": -1,
              "lcc_removed": -1, "tta_spread": -1, "volume_ml": 1, "intensity_distance": -1}


def feature_aurocs(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    out = {}
    for name, sign in CANDIDATES.items():
        if not all(name in r for r in rows):
            continue
        vals = [sign * r[name] for r in rows]
        out[name] = {f"dice<{d}": auroc(vals, [r["dice"] < d for r in rows]) for d in FAILURE_DICE}
    return out


def collect_rows(cache: Path, bundle: Bundle, reference: dict) -> list[dict]:
    """Rows of every cached case, reusing rows already derived (rows.jsonl next to the maps)."""
    from dtml_deploy.qc import QCReference

    data = find_data()
    keep = ("volume_ml", "intensity_quantiles", "intensity_distance", "point_mass", "smoothness")
    ref = QCReference.from_dict({**{k: reference[k] for k in keep}, "agreement_feature": "band_agreement",
                                 "agreement_scale": [0.5, 1.0], "threshold": 0.0})
    rows = []
    for d in sorted(p for p in cache.iterdir() if p.is_dir()):
        done_file = d / "rows.jsonl"
        done = {}
        if done_file.exists():
            for line in done_file.read_text().splitlines():
                r = json.loads(line)
                done.setdefault(r["case"], []).append(r)
        for meta in sorted(d.glob("*.json")):
            cid = meta.stem
            if cid not in done:
                done[cid] = case_rows(d, cid, data, bundle, ref)  # type: ignore[arg-type]
                with done_file.open("a") as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in done[cid])
            rows.extend(done[cid])
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def analyse_phase(args: argparse.Namespace) -> None:
    reference = json.loads(args.reference.read_text())
    bundle = Bundle.load(MODEL)
    rows = collect_rows(args.cache, bundle, reference)
    default_cfg = args.default.rsplit("-", 1)[0]
    calib = [r for r in rows if r["config"] == default_cfg and r["head"] == args.head]
    by_cfg = {}
    for r in rows:
        by_cfg.setdefault(r["config"], set()).add(r["case"])
    common = set.intersection(*by_cfg.values())
    aurocs = feature_aurocs(calib)
    model_side = {k: v for k, v in aurocs.items() if k in ("agreement", "band_agreement", "band_soft_agreement")}
    feature = args.feature or max(model_side, key=lambda k: sum(x or 0 for x in model_side[k].values()))
    qc_result, qc_ref = calibrate(calib, reference, feature)
    doc = {
        "what": "head x TTA x protocol on LA2018 unlabeled_16 (64 cases) and the QC score's calibration",
        "machine": machine(), "precision_note": "bf16 on this CPU (AVX512-BF16) for every configuration run here",
        "calibrated_on": f"{args.default} head {args.head}: {len(calib)} cases (the developers' set; the "
                         "threshold is tuned on it)",
        "reference_from": reference.get("labeled_cases"),
        "cases_per_config": {k: len(v) for k, v in by_cfg.items()},
        "table_all_cases": head_table(rows, set.union(*by_cfg.values())),
        "table_common_cases": head_table(rows, common), "common_cases": len(common),
        "feature_auroc": aurocs,
        "feature_auroc_tta": feature_aurocs([r for r in rows if r["config"] == "dtml-tta" and r["head"] == args.head]),
        "qc": qc_result, "qc_reference": qc_ref, "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    print(json.dumps({k: doc[k] for k in ("cases_per_config", "feature_auroc", "qc")}, indent=1))
    for t in doc["table_common_cases"]:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()})
    if args.write_bundle:
        write_bundle_qc(qc_ref)


def threshold_phase(args: argparse.Namespace) -> None:
    """Refit the agreement scale and the threshold from the per-case rows an `analyse` run stored in the JSON
    (no segmentation, no cache needed), and rewrite its `qc` and `qc_reference`."""
    doc = json.loads(args.out.read_text())
    config, precision = args.default.rsplit("-", 1)
    calib = [r for r in doc["cases"] if r["config"] == config and r["precision"] == precision
             and r["head"] == args.head]
    if not calib:
        sys.exit(f"error: {args.out} has no rows of {args.default} head {args.head}")
    feature = args.feature or doc["qc"]["feature"]
    doc["qc"], doc["qc_reference"] = calibrate(calib, doc["qc_reference"], feature)
    doc["calibrated_on"] = (f"{args.default} head {args.head}: {len(calib)} cases (the developers' set; "
                            "threshold rule checked by leave-one-out)")
    args.out.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    print(json.dumps(doc["qc"], indent=1))
    if args.write_bundle:
        write_bundle_qc(doc["qc_reference"])


def write_bundle_qc(qc_ref: dict) -> None:
    """Store `qc` as a meta key of the shipped bundle's config.json (outside the hashed model/weights)."""
    path = MODEL / "config.json"
    cfg = json.loads(path.read_text())
    keep = ("volume_ml", "intensity_quantiles", "intensity_distance", "point_mass", "smoothness",
            "agreement_feature", "agreement_scale", "threshold")
    cfg["qc"] = {**{k: qc_ref[k] for k in keep},
                 "source": "volume and intensity: labeled_16 (LA2018); agreement scale and threshold: unlabeled_16, "
                           "threshold for recall >= 0.9 of Dice < 0.85 checked by leave-one-out "
                           "(benchmarks/qc_calibration.py)"}
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    seg = sub.add_parser("segment")
    seg.add_argument("--config", choices=sorted(CONFIGS), required=True)
    seg.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    seg.add_argument("--batch", type=int, default=4)
    seg.add_argument("--cases", default="unlabeled_16")
    seg.add_argument("--limit", type=int, default=None)
    seg.add_argument("--reverse", action="store_true", help="work through the cases from the last one")
    seg.add_argument("--cache", type=Path, default=CACHE)
    ref = sub.add_parser("reference")
    ref.add_argument("--labeled", default="labeled_16")
    ref.add_argument("--reference", type=Path, default=CACHE / "reference.json")
    ana = sub.add_parser("analyse")
    ana.add_argument("--cache", type=Path, default=CACHE)
    ana.add_argument("--reference", type=Path, default=CACHE / "reference.json")
    ana.add_argument("--default", default="dtml-bf16", help="cache folder of the configuration to calibrate on")
    ana.add_argument("--head", default="mean", help="head of that configuration to calibrate on")
    ana.add_argument("--feature", default=None, help="agreement feature (default: best AUROC)")
    ana.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "qc_calibration_cpu.json")
    ana.add_argument("--write-bundle", action="store_true", help="store the calibrated `qc` in the shipped bundle")
    thr = sub.add_parser("threshold", help="refit scale and threshold from the rows already in --out")
    thr.add_argument("--default", default="dtml-bf16")
    thr.add_argument("--head", default="mean")
    thr.add_argument("--feature", default=None)
    thr.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "qc_calibration_cpu.json")
    thr.add_argument("--write-bundle", action="store_true")
    args = ap.parse_args(argv)
    if args.phase == "segment":
        segment_phase(args)
    elif args.phase == "reference":
        reference_phase(args)
    elif args.phase == "threshold":
        threshold_phase(args)
    else:
        analyse_phase(args)


if __name__ == "__main__":
    main()
