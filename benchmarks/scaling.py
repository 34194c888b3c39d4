"""Cases per second of `dtml segment` for 1..N ranks under torchrun, on the CPU here or on GPUs.

Each rank count is one real launch: `python -m torch.distributed.run --nproc-per-node W -m dtml_deploy
segment CASES -o ... --json ...`, the same command a user runs. Rank 0's report gives the segmentation
time (from the first case started to the last one gathered, models already loaded); the wall time adds
torchrun's start and every rank's imports and model load. On the CPU the machine's cores are split among
the ranks (OMP_NUM_THREADS = cores // W), so the comparison is of the same machine, not of more of it;
on CUDA each rank takes one GPU. Every run's masks are checked to be identical to the 1-rank run's.

    python benchmarks/scaling.py --json benchmarks/results/scaling_cpu.json          # CPU, shipped sample
    python benchmarks/scaling.py --device cuda --data /path/LA2018 --cases 32 --ranks 1 2 4 8 --json ...

Default cases: the CPU repeats the shipped sample's three 80x72x56 scans to --cases (one window each,
so a run takes seconds); CUDA takes the first --cases LA2018 images (full size, dozens of windows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, find_data, machine, table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases(data: Path | None, n: int, device: str, folder: Path) -> list[Path]:
    """`n` scans copied (linked) into `folder` under distinct names."""
    if data is None:
        pool = sorted((REPO / "tests" / "data" / "la_sample" / "images").glob("*.nii.gz"))
    else:
        folder = data / "images" if (data / "images").is_dir() else data
        pool = sorted(folder.glob("*.nii.gz"))
    if not pool:
        raise SystemExit(f"no .nii.gz scans found for {data}")
    out = []
    for i in range(n):
        dst = folder / f"case{i:03d}.nii.gz"
        try:
            os.link(pool[i % len(pool)], dst)
        except OSError:
            shutil.copy(pool[i % len(pool)], dst)
        out.append(dst)
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    import nibabel as nib
    import numpy as np

    for p in sorted(folder.glob("*.nii.gz")):
        h.update(p.name.encode())
        h.update(np.ascontiguousarray(np.asarray(nib.load(p).dataobj)).tobytes())
    return h.hexdigest()


def run(world: int, cases: list[Path], work: Path, device: str, threads: int, extra: list[str]) -> dict:
    """One torchrun launch of `dtml segment` with `world` ranks."""
    out, report = work / f"out{world}", work / f"report{world}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "dtml_deploy", "segment", *map(str, cases),
           "-o", str(out), "--json", str(report), "--no-progress", "--device", device, *extra]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    if res.returncode != 0 or not report.is_file():
        tail = res.stderr.strip().splitlines()[-3:]
        return {"ranks": world, "error": f"exit {res.returncode}: {' | '.join(tail)}"}
    doc = json.loads(report.read_text())
    ok = sum(c["status"] == "ok" for c in doc["cases"])
    seconds = doc["total_seconds"]
    return {"ranks": world, "threads_per_rank": threads if device == "cpu" else None, "cases": len(cases),
            "ok": ok, "segment_seconds": round(seconds, 3), "wall_seconds": round(wall, 3),
            "cases_per_s": round(len(cases) / seconds, 4), "cases_per_s_wall": round(len(cases) / wall, 4),
            "windows": sum(c.get("windows") or 0 for c in doc["cases"]), "masks_sha256": _digest(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (each rank takes cuda:LOCAL_RANK)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None,
                    help="rank counts to run (default: 1 and 2 on the CPU, 1..GPU count on CUDA)")
    ap.add_argument("--cases", type=int, default=12, help="scans per run")
    ap.add_argument("--data", type=Path, default=None, help="LA2018 root or folder of .nii.gz (CUDA default: LA2018)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("segment_args", nargs="*", help="more `dtml segment` options, after --")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    cores = os.cpu_count() or 1
    ranks = args.ranks or (list(range(1, torch.cuda.device_count() + 1)) if cuda else [1, 2])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "in").mkdir()
        cases = _cases(args.data or (find_data() if cuda else None), args.cases, "cuda" if cuda else "cpu",
                       work / "in")
        rows = [run(w, cases, work, args.device, max(1, cores // w), args.segment_args) for w in ranks]
    base = next((r for r in rows if r["ranks"] == ranks[0] and "error" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["speedup"] = round(r["cases_per_s"] / base["cases_per_s"], 3)
            r["speedup_wall"] = round(r["cases_per_s_wall"] / base["cases_per_s_wall"], 3)
            r["masks_match_first"] = r["masks_sha256"] == base["masks_sha256"]
    doc = {"machine": machine(), "device": args.device, "cores": cores, "torch": torch.__version__,
           "command": "torchrun --nproc-per-node W -m dtml_deploy segment CASES -o OUT --json REPORT",
           "note": "segment_seconds: rank 0's report (first case to last gathered); wall: the whole launch",
           "rows": rows}
    cols = ["ranks", "threads_per_rank", "cases", "ok", "segment_seconds", "cases_per_s", "speedup", "wall_seconds",
            "cases_per_s_wall", "speedup_wall", "masks_match_first"]
    print(table([{**r, "ok": r.get("ok", r.get("error"))} for r in rows], cols))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if any("error" in r for r in rows) or any(not r.get("masks_match_first", True) for r in rows):
        raise SystemExit(1)  # a failed launch or different masks is not a result


if __name__ == "__main__":
    main()
