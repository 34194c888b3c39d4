"""Per-window speed of the backends on the same pair: PyTorch vs onnxruntime, measured side by side.

Every row runs the full pair (M_s and M_d: outputs p_seg and p_dis) on a batch of `--batch` windows of
`--patch`, random weights (BatchNorm folded everywhere). Rows are timed in interleaved rounds (one call
of each row per round, after `--warmup` calls each), so load from other processes hits them alike;
the figure is the median over `--repeats` rounds, in ms per window. The torch backends switch on
dtml's process-wide host-memory setting (dtml_deploy/backends/host_memory.py), so every row, the plain
contiguous torch row included, runs with it; segment_speed.py measures the setting's own effect.

CPU rows: torch fp32 (contiguous, and channels_last_3d) vs onnxruntime fp32 through the real
backends; `--explore` adds onnxruntime session-option variants, `--bf16` a torch bf16 row and
`--fp16-onnx` the fp16 graph on the CPU EP (context only: neither is fp32). CUDA rows (when present): torch fp32
and fp16 (channels_last_3d), and onnxruntime's CUDA/TensorRT EPs if this onnxruntime has them.

    python benchmarks/backend_speed.py [--n-filters 16] [--patch 112 112 80] [--batch 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, table

from dtml_deploy.artifacts import FORMATS
from dtml_deploy.backends.base import BackendOptions, create_backend
from dtml_export.formats import artifact_path, missing_packages
from dtml_export.onnx_export import export_onnx_info
from tests.bundles import random_bundle

OUTPUTS = ("p_seg", "p_dis")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ort_session_variants(onnx_path: Path, threads: int) -> dict[str, Callable[[torch.Tensor], object]]:
    """Raw onnxruntime sessions with other settings (for --explore)."""
    import onnxruntime as ort

    def make(level: object, intra: int = 0, spin: str | None = None, sequential: bool = True,
             mem_pattern: bool = True) -> Callable[[torch.Tensor], object]:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.intra_op_num_threads = intra
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
        opts.enable_mem_pattern = mem_pattern
        if spin is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(list(OUTPUTS), {"image": x.numpy()})

    lv = ort.GraphOptimizationLevel
    return {
        f"onnxruntime fp32, intra-op threads = {threads}": make(lv.ORT_ENABLE_ALL, threads),
        "onnxruntime fp32, no spinning": make(lv.ORT_ENABLE_ALL, spin="0"),
        "onnxruntime fp32, ORT_ENABLE_EXTENDED": make(lv.ORT_ENABLE_EXTENDED),
        "onnxruntime fp32, ORT_ENABLE_BASIC": make(lv.ORT_ENABLE_BASIC),
        "onnxruntime fp32, parallel executor": make(lv.ORT_ENABLE_ALL, sequential=False),
    }


def _pair_gflop(n_filters: int, patch: tuple[int, ...]) -> float:
    """Convolution FLOPs (2 x MACs) of both networks for one window, counted with forward hooks."""
    from dtml_deploy.config import NetConfig
    from dtml_deploy.nets.vnet import VNet

    total = 0

    def hook(m: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * m.kernel_size[2]  # type: ignore[index]
        voxels = (inp[0] if isinstance(m, torch.nn.ConvTranspose3d) else out)[0, 0].numel()
        total += 2 * m.in_channels * m.out_channels * k * voxels  # type: ignore[operator]

    net = VNet(NetConfig(n_filters=n_filters))
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            m.register_forward_hook(hook)
    with torch.device("meta"):
        net = net.to("meta")
        net(torch.empty(1, 1, *patch))
    return 2 * total / 1e9


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-filters", type=int, default=16)
    ap.add_argument("--patch", type=int, nargs=3, default=(112, 112, 80), metavar=("D", "H", "W"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--explore", action="store_true", help="also time onnxruntime session-option variants")
    ap.add_argument("--fp16-onnx", action="store_true", help="also time the fp16 ONNX graph on the CPU")
    ap.add_argument("--bf16", action="store_true", help="also time torch bf16 on the CPU (not fp32: context only)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU rows (on a CUDA machine)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and the table as JSON")
    return ap.parse_args()


def _rows(args: argparse.Namespace, tmp: Path) -> dict[str, Callable[[], object]]:
    """Each row: a call that runs one batch of windows on one backend configuration."""
    patch = tuple(args.patch)
    bundle = random_bundle(args.n_filters, patch, centre_heads=False)  # type: ignore[arg-type]
    x = torch.randn(args.batch, 1, *patch, generator=torch.Generator().manual_seed(0))
    rows: dict[str, Callable[[], object]] = {}
    have_ort = not missing_packages(FORMATS["onnx"]) and not missing_packages(FORMATS["onnx"], run=True)

    def backend(name: str, device: str, **kw: object) -> Callable[[], object]:
        # fp32 without the CUDA extras unless a row names them (the rows compare plain layouts and runtimes)
        kw = {"precision": "fp32", "cuda_graphs": False, "cudnn_fusion": False, **kw}
        b = create_backend(name, bundle, BackendOptions(device=device, batch=args.batch, **kw), OUTPUTS)  # type: ignore[arg-type]
        xd = x.to(device)
        return lambda: b.predict(xd)

    onnx_fp32 = None
    if have_ort:
        exp = export_onnx_info(bundle, artifact_path(tmp, "onnx", "fp32"), "fp32")
        onnx_fp32 = exp.path
        print(f"exported {exp.summary()}", flush=True)
    if not args.no_cpu:
        rows["torch fp32 (contiguous)"] = backend("torch", "cpu", channels_last=False)
        rows["torch fp32 (channels_last_3d)"] = backend("torch", "cpu", channels_last=True)
        if args.bf16:
            rows["torch bf16 (channels_last_3d)"] = backend("torch", "cpu", precision="bf16")
        if onnx_fp32 is not None:
            rows["onnxruntime fp32 (CPU EP)"] = backend("onnx", "cpu", artifact=onnx_fp32)
            if args.fp16_onnx:
                p16 = export_onnx_info(bundle, artifact_path(tmp, "onnx", "fp16"), "fp16").path
                rows["onnxruntime fp16 graph (CPU EP)"] = backend("onnx", "cpu", artifact=p16, precision="fp16")
            if args.explore:
                variants = _ort_session_variants(onnx_fp32, torch.get_num_threads())
                rows.update({k: (lambda f=f: f(x)) for k, f in variants.items()})
    if torch.cuda.is_available():
        rows["torch fp32 CUDA (channels_last_3d)"] = backend("torch", "cuda")
        rows["torch fp16 CUDA (channels_last_3d)"] = backend("torch", "cuda", precision="fp16")
        if onnx_fp32 is not None:
            import onnxruntime as ort

            if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
                rows["onnxruntime fp32 (CUDA EPs)"] = backend("onnx", "cuda", artifact=onnx_fp32)
            else:
                print("onnxruntime here has no CUDA EP (install onnxruntime-gpu for those rows)")
    return rows


def _time(rows: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each row: warm-up first, then interleaved rounds (so drift hits every row)."""
    times: dict[str, list[float]] = {k: [] for k in rows}
    for name, fn in rows.items():
        for _ in range(warmup):
            fn()
        _sync()
        print(f"warmed up: {name}", flush=True)
    for r in range(repeats):
        for name, fn in rows.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{repeats} done", flush=True)
    return times


def _report(args: argparse.Namespace, times: dict[str, list[float]]) -> None:
    patch = tuple(args.patch)

    def ms(name: str) -> float:
        return 1000 * statistics.median(times[name]) / args.batch

    base = "torch fp32 (contiguous)" if "torch fp32 (contiguous)" in times else next(iter(times))
    gflop = _pair_gflop(args.n_filters, patch)
    out = [{"backend": name, "ms / window": ms(name), "min ms / window": 1000 * min(times[name]) / args.batch,
            "GFLOP/s": gflop / ms(name) * 1000, "vs " + base: ms(base) / ms(name)} for name in times]
    print(f"\n{machine()}; torch threads {torch.get_num_threads()}")
    print(f"pair n_filters={args.n_filters}, patch {patch}, batch {args.batch}, outputs {OUTPUTS}, "
          f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up; "
          f"{gflop:.1f} GFLOP per window (convolutions of both networks)\n")
    md = table(out, ["backend", "ms / window", "min ms / window", "GFLOP/s", "vs " + base])
    print(md)
    if args.json:
        import json

        args.json.write_text(json.dumps({"machine": f"{machine()}; batch {args.batch}, n_filters {args.n_filters}",
                                         "markdown": md, "rows": out}, indent=2) + "\n")
    if "onnxruntime fp32 (CPU EP)" in times:
        best_torch = min(ms(n) for n in times if n.startswith("torch fp32 (") and "CUDA" not in n)
        ratio = best_torch / ms("onnxruntime fp32 (CPU EP)")
        print(f"\nonnxruntime fp32 vs the faster torch fp32 layout, same batch: {ratio:.2f}x "
              f"({'meets' if ratio >= 1.3 else 'misses'} the 1.3x target)")


def main() -> None:
    args = _args()
    with tempfile.TemporaryDirectory(prefix="dtml-bench-") as tmp:
        rows = _rows(args, Path(tmp))
        _report(args, _time(rows, args.warmup, args.repeats))


if __name__ == "__main__":
    main()
