"""Whole-scan CPU speed of OpenVINO int8 beside torch fp32/bf16, OpenVINO fp32 and the paper's loop.

One real LA2018 scan (by default the smallest of the 64 unlabeled ones, 27 windows on the paper's grid,
so that every row fits a shared 2-core machine; --case picks another), the shipped model, both networks
per window (as `dtml segment`'s dtml protocol), on two grids: the paper's (stride 18, 18, 4, constant
blending) and dtml's default (overlap 0.5, Gaussian).
Every row runs once per round and the rounds are interleaved (row 1, row 2, ..., row 1, row 2, ...), so a
load change on the shared machine hits every row alike; each row's time is its median over the rounds.
The paper's loop (benchmarks/reference.py) runs in a fresh process each time, with glibc's malloc
defaults as the paper's code has them (dtml's torch backend changes them for its own process:
dtml_deploy/backends/host_memory.py). "vs paper loop" divides the paper's loop on the paper's grid by
the row's time; "agreement" is the Dice of the row's mask with torch fp32's on the same grid.
The IRs come from `dtml export --int8` (benchmarks/openvino_accuracy.py makes them):

    nice -n 5 python benchmarks/openvino_speed.py --export /tmp/ov-export --rounds 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import REPO, find_data, machine
from reference import reference_sliding_window
from segment_speed import PATCH, engine_fn

from dtml_deploy.backends.torch_backend import cpu_has_native_bf16
from dtml_deploy.bundle import Bundle
from dtml_deploy.engine.grid import PAPER_STRIDE, GridSpec, window_count
from dtml_deploy.metrics import agreement

MODEL = REPO / "dtml_deploy" / "default_model"
OUT = REPO / "benchmarks" / "results" / "openvino_speed_cpu.json"
GRIDS = {"paper": (GridSpec(stride=PAPER_STRIDE), "constant"), "default": (GridSpec(), "gaussian")}
BATCH = 4  # dtml's CPU default (BackendOptions.resolved)


def _paper_loop_seconds(volume: np.ndarray) -> float:
    """The paper's loop over `volume`, timed in this (fresh) process."""
    net = Bundle.load(MODEL).build()
    t = time.perf_counter()
    reference_sliding_window(net, volume, PATCH, PAPER_STRIDE, heads=("p_seg", "p_dis"))
    return time.perf_counter() - t


def paper_loop(volume: np.ndarray) -> float:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_paper_loop_seconds, (volume,))


def rows_for(export: Path, grid: str) -> list[tuple[str, dict[str, Any] | None]]:
    """(row name, engine options or None for a row that cannot run here, with the reason in its name).
    OpenVINO fp32 runs on the default grid only: it is there to rank it against torch fp32 (the CPU ranking
    of dtml_deploy/backend_choice.py), which one grid shows, and the paper's grid is the costly one."""
    bf16: tuple[str, dict[str, Any] | None] = ("torch bf16", dict(precision="bf16"))
    if not cpu_has_native_bf16():
        bf16 = ("torch bf16 (not timed: this CPU has no AVX512-BF16/AMX, bf16 is emulated)", None)
    ov32 = [("openvino fp32", dict(backend="openvino", precision="fp32", artifact=export / "model-fp32.xml"))]
    return [("torch fp32", dict(precision="fp32")), bf16, *(ov32 if grid == "default" else []),
            ("openvino int8", dict(backend="openvino", precision="fp32", artifact=export / "model-int8.xml"))]


def smallest_case(root: Path) -> str:
    import nibabel as nib

    ids = json.loads((root / "splits.json").read_text())["unlabeled_16"]
    return min(ids, key=lambda c: np.prod(nib.load(str(root / "images" / f"{c}.nii.gz")).shape))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, required=True, help="folder with model-fp32.xml and model-int8.xml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument("--case", default=None, help="LA2018 case id (default: the smallest unlabeled scan)")
    ap.add_argument("--made-by", default="", help="how the IRs were made (recorded in the JSON)")
    ap.add_argument("--load", default="", help="what else ran on the machine meanwhile (recorded in the JSON)")
    args = ap.parse_args()
    root = find_data()
    if root is None:
        sys.exit("error: LA2018 not found (set DTML_DATA)")
    import nibabel as nib

    cid = args.case or smallest_case(root)
    volume = np.asarray(nib.load(str(root / "images" / f"{cid}.nii.gz")).get_fdata(dtype=np.float32))
    bundle = Bundle.load(MODEL)
    runs: dict[str, list[float]] = {"paper loop": []}
    fns, masks = {}, {}
    for grid_name, (grid, blend) in GRIDS.items():
        for name, opts in rows_for(args.export, grid_name):
            if opts is not None:
                out: dict = {}
                fns[(grid_name, name)] = engine_fn(bundle, volume, grid, blend, out, keep_prob=False,
                                                   device="cpu", batch=BATCH, **opts)
                runs[f"{grid_name}|{name}"] = []
    for r in range(args.rounds):
        runs["paper loop"].append(paper_loop(volume))
        for (grid_name, name), fn in fns.items():
            t = time.perf_counter()
            masks[(grid_name, name)] = np.asarray(fn())
            runs[f"{grid_name}|{name}"].append(time.perf_counter() - t)
            print(f"round {r + 1} {grid_name} {name}: {runs[f'{grid_name}|{name}'][-1]:.2f} s", flush=True)
        write(args.json, {**report(volume, cid, runs, masks, args.export), "irs": args.made_by, "load": args.load})


def report(volume: np.ndarray, cid: str, runs: dict[str, list[float]], masks: dict, export: Path) -> dict[str, Any]:
    paper = statistics.median(runs["paper loop"])
    rows = [{"grid": "paper", "method": "paper loop (fp32, 1 window/forward, numpy accumulation, fresh process)",
             "windows": window_count(volume.shape, PATCH, GRIDS["paper"][0]), "seconds": paper,
             "runs": runs["paper loop"], "vs paper loop": 1.0}]
    for grid_name, (grid, _) in GRIDS.items():
        torch32 = statistics.median(runs[f"{grid_name}|torch fp32"])
        bf16 = runs.get(f"{grid_name}|torch bf16")
        for name, opts in rows_for(export, grid_name):
            row: dict[str, Any] = {"grid": grid_name, "method": f"dtml engine {name}, batch {BATCH}",
                                   "windows": window_count(volume.shape, PATCH, grid)}
            if opts is not None:
                s = statistics.median(runs[f"{grid_name}|{name}"])
                row.update(seconds=s, runs=runs[f"{grid_name}|{name}"], **{"vs paper loop": paper / s,
                           "vs torch fp32": torch32 / s,
                           "vs torch bf16": statistics.median(bf16) / s if bf16 else None,
                           "agreement": agreement(masks[(grid_name, name)], masks[(grid_name, "torch fp32")])})
            rows.append(row)
    return {"machine": machine(), "case": cid, "volume": "x".join(map(str, volume.shape)),
            "rounds": len(runs["paper loop"]), "rows": rows}


def write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
