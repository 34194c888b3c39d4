"""Whole-volume segmentation speed: the paper's loop, MONAI and dtml's engine on the same networks.

Two comparisons, each measured side by side in one run:
  A. the paper's window grid (stride 18, 18, 4) on an LA-sized volume: the paper's test loop
     (benchmarks/reference.py: one window per forward, fp32, host accumulation) vs dtml's engine;
  B. overlap 0.5 on a large volume (576 x 576 x 88 by default): MONAI's sliding_window_inference
     (fp16 autocast, sw_batch 8, both networks) vs dtml's engine (CUDA only by default: on the CPU
     MONAI's run alone takes minutes; pass --large to force it).
Every row runs BOTH networks (p_seg and p_dis). Times are wall seconds including stitching, median of
--repeats runs after a warm-up. Throughput = voxels of the volume / seconds. Every timed run starts from
the volume in host memory and ends with its result there: in A a probability map (the paper's loop
returns one), in B a mask (MONAI's row thresholds and downloads; dtml's probabilities for the max |dp|
column come from one more, untimed run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests/bundles.py
from common import find_data, machine, table
from reference import reference_sliding_window

from dtml_deploy.backends.base import BackendOptions, create_backend
from dtml_deploy.bundle import Bundle
from dtml_deploy.engine.grid import PAPER_STRIDE, GridSpec, window_starts
from dtml_deploy.engine.sliding import EngineConfig, SlidingWindowEngine
from dtml_deploy.nets.dual import DualTaskNet, sdm_to_mask
from tests.bundles import random_bundle


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):  # cudnn autotuning, graph capture, compilation
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def engine_fn(bundle: Bundle, volume: np.ndarray, grid: GridSpec, blend: str, out: dict, keep_prob: bool = True,
              **opts: object) -> Callable[[], object]:
    """A closure running dtml's engine: host volume in, host mask out, plus the probability map when
    `keep_prob` (into out['prob']). out['check']() fills out['prob'] (one more run if it was not kept)."""
    opts = {"precision": "fp32", "cuda_graphs": False, "cudnn_fusion": False, **opts}  # what each row names
    backend = create_backend(str(opts.pop("backend", "torch")), bundle, BackendOptions(**opts),  # type: ignore[arg-type]
                             ("p_seg", "p_dis"))

    def engine(keep: bool) -> SlidingWindowEngine:
        return SlidingWindowEngine(backend, bundle.model.patch_size,
                                   EngineConfig(grid=grid, blend=blend, head="seg", qc=True, keep_prob=keep))  # type: ignore[arg-type]

    timed_engine = engine(keep_prob)

    def check() -> None:
        if "prob" not in out:
            out["prob"] = engine(True).run(volume).prob

    out["check"] = check

    def run() -> object:
        res = timed_engine.run(volume)
        if keep_prob:
            out["prob"] = res.prob
        return res.mask

    return run


def monai_fn(net: DualTaskNet, volume: np.ndarray, device: torch.device, precision: str) -> Callable[[], object] | None:
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        return None
    net = net.to(device).eval()

    def predictor(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(net.seg(t).float()), sdm_to_mask(torch.tanh(net.dis(t).float()), net.k)

    def run() -> object:  # host volume in, host mask out: the same work as dtml's timed rows
        x = torch.from_numpy(volume)[None, None].to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16,
                                                    enabled=precision == "fp16" and device.type == "cuda"):
            p_seg, _ = sliding_window_inference(x, (112, 112, 80), 8, predictor, overlap=0.5)
        return (p_seg > 0.5).cpu()

    return run


PATCH = (112, 112, 80)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-filters", type=int, default=16)
    ap.add_argument("--small", type=int, nargs=3, default=(144, 128, 88), help="volume of comparison A")
    ap.add_argument("--large", type=int, nargs=3, default=None, help="volume of comparison B (CUDA default 576 576 88)")
    ap.add_argument("--real-case", action="store_true", help="use a real LA image for comparison A")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before each row (0: time the first run)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="engine batch sizes to try")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build)")
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args()


def small_volume(args: argparse.Namespace, rng: np.random.Generator) -> np.ndarray:
    """Comparison A's volume: random, or the first real LA image with --real-case."""
    data = find_data() if args.real_case else None
    if data is None:
        return rng.standard_normal(tuple(args.small)).astype(np.float32)
    import nibabel as nib

    img_path = sorted((data / "images").glob("*.nii.gz"))[0]
    return np.asarray(nib.load(str(img_path)).get_fdata(dtype=np.float32))


def engine_variants(cuda: bool, batches: list[int], compile_: bool) -> list[tuple[str, dict, int]]:
    """The engine settings timed on this device: (label, backend options, batch)."""
    b0 = batches[0]
    variants: list[tuple[str, dict, int]] = [("fp32", dict(precision="fp32"), b0)]
    if cuda:
        for b in batches:
            variants += [("fp16 + CUDA graphs", dict(precision="fp16", cuda_graphs=True), b),
                         ("fp16 + cuDNN conv+ReLU + CUDA graphs",
                          dict(precision="fp16", cuda_graphs=True, cudnn_fusion=True), b)]
        variants += [("fp16", dict(precision="fp16"), b0),
                     ("bf16 + CUDA graphs", dict(precision="bf16", cuda_graphs=True), b0)]
        if compile_:
            variants.append(("fp16 + compile", dict(precision="fp16", compile=True), b0))
        return variants
    # glibc's keep-freed-memory setting is one-way for the process (dtml_deploy/backends/host_memory.py):
    # the row without it runs first, right after the paper loop, which also ran without it.
    variants.insert(0, ("fp32, glibc malloc defaults", dict(precision="fp32", keep_host_memory=False), b0))
    # bf16 convolutions run on AVX512-BF16/AMX CPUs (e.g. AMD Zen 4, Intel Sapphire Rapids)
    variants.append(("bf16", dict(precision="bf16"), b0))
    try:
        import onnxruntime  # noqa: F401

        variants.append(("onnxruntime fp32", dict(precision="fp32", backend="onnx"), b0))
    except ImportError:
        pass
    return variants


class Rows:
    """The result table, printed to stderr as it fills."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, section: str, name: str, vol: np.ndarray, grid: GridSpec, seconds: float) -> dict:
        n = len(window_starts(vol.shape, PATCH, grid))
        r = {"section": section, "method": name, "volume": "x".join(map(str, vol.shape)), "windows": n,
             "seconds": seconds, "windows/s": n / seconds, "Mvox/s": vol.size / seconds / 1e6}
        self.rows.append(r)
        print(f"  {section} {name}: {seconds:.3f} s", file=sys.stderr, flush=True)
        return r

    def error(self, section: str, name: str, e: Exception) -> None:
        self.rows.append({"section": section, "method": name, "error": str(e)[:80]})


def section_a(rows: Rows, bundle: Bundle, small: np.ndarray, variants: list[tuple[str, dict, int]],
              dev: torch.device, repeats: int, warmup: int) -> None:
    """The paper's grid: the reference loop, then each engine variant (fp32 reference probabilities)."""
    paper = GridSpec(stride=PAPER_STRIDE)
    ref_net = bundle.build().to(dev)
    ref_out: dict = {}

    def ref() -> object:
        ref_out.update(reference_sliding_window(ref_net, small, PATCH, PAPER_STRIDE, heads=("p_seg", "p_dis")))
        return ref_out

    ref_s = rows.add("A", "paper loop (fp32, 1 window/forward, host accumulation)", small, paper,
                     timed(ref, repeats, warmup))
    for label, opts, b in variants:
        opts = dict(opts)
        if opts.get("backend") == "onnx":
            opts["artifact"] = _onnx_artifact(bundle)
        out: dict = {}
        name = f"dtml engine {label}, batch {b}"
        try:
            fn = engine_fn(bundle, small, paper, "constant", out, device=str(dev), batch=b, **opts)
            r = rows.add("A", name, small, paper, timed(fn, repeats, warmup))
        except Exception as e:  # a variant that fails on this machine becomes a row, not a crash
            rows.error("A", name, e)
            continue
        r["vs paper loop"] = ref_s["seconds"] / r["seconds"]
        out["check"]()
        r["max |dp|"] = float(np.abs(out["prob"] - ref_out["p_seg"]).max())
    if dev.type == "cpu":
        # How much of the gain is the allocator alone: the paper loop again, now in a process whose
        # malloc keeps freed memory (set by the engine rows above).
        r = rows.add("A", "paper loop again, with dtml's host-memory setting", small, paper,
                     timed(ref, repeats, warmup))
        r["vs paper loop"] = ref_s["seconds"] / r["seconds"]


def section_b(rows: Rows, bundle: Bundle, vol: np.ndarray, variants: list[tuple[str, dict, int]],
              dev: torch.device, repeats: int, warmup: int) -> None:
    """Overlap 0.5 on a large volume: MONAI (when installed), then each torch engine variant."""
    half = GridSpec(overlap=0.5)
    cuda = dev.type == "cuda"
    mfn = monai_fn(bundle.build(), vol, dev, "fp16" if cuda else "fp32")
    mon_s = None
    if mfn is not None:
        mon_s = rows.add("B", f"MONAI sliding_window_inference ({'fp16 autocast' if cuda else 'fp32'}, sw_batch 8)",
                         vol, half, timed(mfn, repeats, warmup))["seconds"]
    base_prob = None
    for label, opts, b in variants:
        if opts.get("backend") == "onnx":
            continue
        out: dict = {}
        name = f"dtml engine {label}, batch {b}"
        try:
            fn = engine_fn(bundle, vol, half, "constant", out, keep_prob=False, device=str(dev), batch=b,
                           **dict(opts))
            r = rows.add("B", name, vol, half, timed(fn, repeats, warmup))
        except Exception as e:
            rows.error("B", name, e)
            continue
        out["check"]()
        if base_prob is None:
            base_prob = out["prob"]  # the fp32 row comes first
        r["max |dp|"] = float(np.abs(out["prob"] - base_prob).max())
        if mon_s:
            r["vs MONAI"] = mon_s / r["seconds"]


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    repeats = args.repeats or (5 if cuda else 1)
    # random weights, BatchNorm statistics randomised so folding does real work
    bundle = random_bundle(args.n_filters, PATCH, centre_heads=False)
    rng = np.random.default_rng(0)
    small = small_volume(args, rng)
    variants = engine_variants(cuda, args.batch or ([8, 16] if cuda else [2]), args.compile)
    rows = Rows()
    section_a(rows, bundle, small, variants, dev, repeats, args.warmup)
    large = tuple(args.large) if args.large else ((576, 576, 88) if cuda else None)
    if large is not None:
        section_b(rows, bundle, rng.standard_normal(large).astype(np.float32), variants, dev, repeats, args.warmup)
    print(f"# segment_speed: both networks (n_filters {args.n_filters}, patch 112x112x80), median of {repeats}")
    print(f"# machine: {machine()}")
    print(table(rows.rows, ["section", "method", "volume", "windows", "seconds", "windows/s", "Mvox/s",
                            "vs paper loop", "vs MONAI", "max |dp|", "error"]))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows.rows}, indent=2) + "\n")


def _onnx_artifact(bundle: Bundle) -> Path:
    import tempfile

    from dtml_export.onnx_export import export_onnx

    path = Path(tempfile.mkdtemp()) / "dtml-fp32.onnx"
    export_onnx(bundle, path, precision="fp32")
    return path


if __name__ == "__main__":
    main()
