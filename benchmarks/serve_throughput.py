"""Throughput of `dtml serve` on 8 small real scans sent at once, against 8 sequential `dtml segment` runs.

Three ways to segment the same 8 scans (crops of the shipped sample's real LA cases, one window each):
  cli_sequential  `python -m dtml_deploy segment SCAN` eight times, one after the other (each loads the
                  model: what a script calling the CLI per scan gets);
  serve_1_worker  one warm `dtml serve --workers 1`, all 8 jobs posted at once (one job at a time);
  serve_N_workers one warm `dtml serve --workers 8`, all 8 posted at once: their windows share batches.
A job's latency is from its POST to the poll that sees it done (polled every 20 ms); a CLI run's is its
process's wall time. Every mask is compared with the CLI's. The servers are warmed with one job first.

    python benchmarks/serve_throughput.py --json benchmarks/results/serve_throughput_cpu.json
    python benchmarks/serve_throughput.py --device cuda --json benchmarks/results/serve_throughput_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine

CROP = (64, 64, 48)


def _scans(folder: Path, n: int) -> list[Path]:
    """`n` crops of the sample's cases, at different offsets so no two scans are the same."""
    pool = sorted((REPO / "tests" / "data" / "la_sample" / "images").glob("*.nii.gz"))
    out = []
    for i in range(n):
        img = nib.load(str(pool[i % len(pool)]))
        off = [(i // len(pool)) * 4 % max(s - c, 1) for s, c in zip(img.shape, CROP)]
        path = folder / f"scan{i}.nii.gz"
        nib.save(img.slicer[tuple(slice(o, o + c) for o, c in zip(off, CROP))], str(path))
        out.append(path)
    return out


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cli(scans: list[Path], out: Path, device: str) -> dict:
    latencies = []
    t0 = time.perf_counter()
    for scan in scans:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dtml_deploy", "segment", str(scan), "-o", str(out), "--device", device,
                        "--no-progress"], check=True, env=_env(), capture_output=True)
        latencies.append(time.perf_counter() - t)
    return {"total_s": time.perf_counter() - t0, "latencies": latencies}


@contextlib.contextmanager
def _server(workers: int, device: str, store: Path):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dtml_deploy", "serve", "--port", str(port), "--device", device,
                             "--workers", str(workers), "--queue", "32", "--store", str(store)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def _counter(base: str, name: str) -> float:
    import httpx

    text = httpx.get(f"{base}/metrics").text
    return next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " "))


def _run_job(base: str, scan: Path, out: Path, latencies: list, i: int) -> None:
    import httpx

    t = time.perf_counter()
    with httpx.Client(timeout=600) as client:
        job = client.post(f"{base}/v1/jobs", files={"file": (scan.name, scan.read_bytes())}).json()["id"]
        while client.get(f"{base}/v1/jobs/{job}").json()["status"] not in ("done", "failed"):
            time.sleep(0.02)
        latencies[i] = time.perf_counter() - t
        (out / scan.name).write_bytes(client.get(f"{base}/v1/jobs/{job}/mask").content)


def _serve(scans: list[Path], out: Path, workers: int, device: str, store: Path) -> dict:
    with _server(workers, device, store) as base:
        _run_job(base, scans[0], store, [0.0], 0)  # warm-up, not counted
        before = {k: _counter(base, k) for k in ("dtml_forwards_total", "dtml_windows_total")}
        latencies = [0.0] * len(scans)
        threads = [threading.Thread(target=_run_job, args=(base, s, out, latencies, i)) for i, s in enumerate(scans)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = time.perf_counter() - t0
        used = {k: _counter(base, k) - v for k, v in before.items()}
    return {"total_s": total, "latencies": latencies, "forwards": used["dtml_forwards_total"],
            "windows": used["dtml_windows_total"]}


def _same(a: Path, b: Path) -> bool:
    return bool(np.array_equal(np.asarray(nib.load(str(a)).dataobj), np.asarray(nib.load(str(b)).dataobj)))


def _summary(r: dict, same: list[bool]) -> dict:
    lat = np.array(r["latencies"])
    extra = {k: v for k, v in r.items() if k not in ("latencies", "total_s")}
    return {"total_s": round(r["total_s"], 3), "scans_per_s": round(len(lat) / r["total_s"], 3),
            "latency_p50_s": round(float(np.percentile(lat, 50)), 3),
            "latency_p95_s": round(float(np.percentile(lat, 95)), 3), **extra, "masks_equal_cli": all(same)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scans", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "scans").mkdir()
        scans = _scans(root / "scans", args.scans)
        results = {"cli_sequential": _cli(scans, root / "cli_sequential", args.device)}
        for workers in (1, args.scans):
            mode = f"serve_{workers}_worker{'s' if workers > 1 else ''}"
            (root / mode).mkdir()
            results[mode] = _serve(scans, root / mode, workers, args.device, root / f"store{workers}")
        modes = {mode: _summary(r, [_same(root / "cli_sequential" / s.name, root / mode / s.name) for s in scans])
                 for mode, r in results.items()}
    report = {"machine": machine(), "device": args.device, "scans": len(scans), "crop": list(CROP),
              "model": "shipped (dtml_deploy/default_model)", "modes": modes}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
