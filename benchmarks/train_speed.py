"""Iterations per second of the full paper recipe (two V-Nets, batch 2 + 2, 112x112x80) on this device.

Runs the real trainer (data loader, augmentation, both networks, the summed DTML loss, two SGD steps)
for `--warmup` + `--iterations` iterations per setting and reports the steady-state rate measured
over the timed iterations, the projected time of the paper's 6000 iterations, and peak memory.

    python benchmarks/train_speed.py                       # CPU: 2 + 3 iterations, fp32
    python benchmarks/train_speed.py --amp bf16 --amp none # CUDA: compare settings side by side
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import find_data, machine, table

from dtml_deploy.io.datasets import make_split, open_source
from dtml_training.recipes import recipe
from dtml_training.trainer import Trainer


def measure(data: Path, amp: str, warmup: int, timed: int, n_filters: int, patch: tuple[int, int, int],
            workers: int, device: str, unlabeled: int | None) -> dict:
    cfg = recipe("dtml", iterations=warmup + timed, n_filters=n_filters, patch=patch, amp=amp,
                 workers=workers, device=device, checkpoint_every=0, unlabeled=unlabeled)
    split = make_split(open_source(data), cfg.labeled, cfg.unlabeled)
    with tempfile.TemporaryDirectory() as tmp:
        # Losses are fetched at every `flush` iterations; the warm-up must end on such a boundary.
        flush = 25 if warmup % 25 == 0 and timed % 25 == 0 else 1
        result = Trainer(cfg, split, Path(tmp), show_progress=False, log_flush_every=flush).run()
        rows = [json.loads(ln) for ln in (Path(tmp) / "train_log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "iteration" in r and "elapsed_s" in r]
    t_warm = next(r["elapsed_s"] for r in rows if r["iteration"] == warmup - 1)
    t_end = rows[-1]["elapsed_s"]
    rate = timed / max(t_end - t_warm, 1e-9)
    s = result.summary
    return {"device": s["device"], "amp": s["amp"], "it/s": rate, "ms/it": 1000 / rate,
            "6000 it (min)": 6000 / rate / 60, "peak GB": s["peak_memory_gb"], "workers": workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action="append", default=None, help="auto|bf16|fp16|none; repeat to compare")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--n-filters", type=int, default=16)
    ap.add_argument("--patch", type=int, nargs=3, default=(112, 112, 80))
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--unlabeled", type=int, default=None, help="unlabeled cases (default: all others)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    data = args.data or find_data()
    if data is None:
        sys.exit("error: no data (set DTML_DATA or pass --data)")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    warmup = args.warmup if args.warmup is not None else (25 if cuda else 2)
    timed = args.iterations if args.iterations is not None else (125 if cuda else 3)
    rows = [measure(data, amp, warmup, timed, args.n_filters, tuple(args.patch), args.workers, args.device,
                    args.unlabeled)
            for amp in (args.amp or ["auto"])]
    print(f"# train_speed: paper recipe (n_filters {args.n_filters}, patch {tuple(args.patch)}, batch 2+2)")
    print(f"# machine: {machine()}; {warmup} warm-up + {timed} timed iterations per row")
    print(table(rows, ["device", "amp", "workers", "it/s", "ms/it", "6000 it (min)", "peak GB"]))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
