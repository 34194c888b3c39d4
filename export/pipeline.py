"""`dtml export`: ONNX (fp32/fp16) with built-in verification, and optionally a TensorRT engine.

Each ONNX artifact is exported to a temporary name, verified against the PyTorch fp32 pair, and only
then moved into place; a failed verification leaves nothing behind and fails the command. A TensorRT
engine is built from that verified ONNX (atomically, with its sidecar); its own agreement with torch
fp32 on a real case is what `dtml benchmark`'s TensorRT row measures.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dtml_deploy import __version__
from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import DtmlError
from dtml_deploy.intensity import prepare
from dtml_deploy.io.volume import read_volume
from dtml_deploy.resample import resize, spacing_differs, target_shape
from export.formats import artifact_path
from export.onnx_export import export_onnx_info
from export.verify import render_report, verify_onnx


class VerificationFailed(DtmlError):
    """An exported artifact disagrees with the PyTorch model beyond the stated tolerances."""


@dataclass(frozen=True)
class ExportRequest:
    bundle: Path
    out_dir: Path
    precisions: tuple[str, ...] = ("fp32",)
    opset: int = 17
    dynamic_spatial: bool = False
    verify: bool = True
    real_case: Path | None = None  # a scan whose central patch joins the random verification patches
    trt: bool = False
    trt_fp16: bool = True
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 8
    workspace_gb: float = 4.0
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.trt:  # a bad profile fails before minutes of exporting, not after
            from export.trt_build import check_build_options  # importable without TensorRT

            check_build_options(self.min_batch, self.opt_batch, self.max_batch, self.workspace_gb)


@dataclass
class ExportResult:
    path: Path
    kind: str
    precision: str
    seconds: float
    size_bytes: int
    verification: str = ""
    extra: dict = field(default_factory=dict)


def central_patch(case: Path, bundle: Bundle) -> np.ndarray:
    """The network input at the centre of a real scan, as `dtml segment` would feed it (intensities
    prepared, resampled to the model's spacing), zero-padded to the bundle's patch size."""
    vol = read_volume(case, default_spacing=bundle.model.spacing)
    x, _ = prepare(vol.array, bundle.model.intensity, "auto", str(case))
    if vol.header is not None and spacing_differs(vol.spacing, bundle.model.spacing):
        x = resize(x, target_shape(x.shape, vol.spacing, bundle.model.spacing))
    patch = bundle.model.patch_size
    out = np.zeros(patch, np.float32)
    src, dst = [], []
    for n, p in zip(x.shape, patch):
        take = min(n, p)
        lo = (n - take) // 2
        src.append(slice(lo, lo + take))
        dst.append(slice((p - take) // 2, (p - take) // 2 + take))
    out[tuple(dst)] = x[tuple(src)]
    return out


def export_verified_onnx(bundle: Bundle, out: Path, precision: str, *, opset: int = 17,
                         dynamic_spatial: bool = False, verify: bool = True,
                         real_patch: np.ndarray | None = None) -> ExportResult:
    """Export to a temporary file, verify, then move to `out` (nothing is left on failure)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.onnx")
    try:
        info = export_onnx_info(bundle, tmp, precision=precision, dynamic_spatial=dynamic_spatial, opset=opset)
        text = ""
        if verify:
            report = verify_onnx(bundle, tmp, real_patch=real_patch)
            text = render_report(report)
            if not report.passed:
                raise VerificationFailed(f"{out.name} failed verification: "
                                         + "; ".join(f"{c.output}/{c.source} max err {c.max_abs_err:.2e} "
                                                     f"dice {c.dice:.4f}" for c in report.failures()))
        os.replace(tmp, out)
        return ExportResult(out, "onnx", precision, info.seconds, out.stat().st_size, text)
    finally:
        tmp.unlink(missing_ok=True)


def run_export(req: ExportRequest, echo: Callable[[str], None] = print) -> list[ExportResult]:
    """Everything `dtml export` does, in order; raises on the first failure."""
    bundle = Bundle.load(req.bundle)
    real = central_patch(req.real_case, bundle) if req.real_case is not None else None
    precisions = list(req.precisions)
    if req.trt:
        from export.trt_build import onnx_precision_for

        needed = onnx_precision_for(req.trt_fp16)
        if needed not in precisions:
            precisions.append(needed)
    results = []
    onnx_paths: dict[str, Path] = {}
    for precision in precisions:
        path = artifact_path(req.out_dir, "onnx", precision)
        res = export_verified_onnx(bundle, path, precision, opset=req.opset, dynamic_spatial=req.dynamic_spatial,
                                   verify=req.verify, real_patch=real)
        onnx_paths[precision] = path
        echo(f"onnx {precision}: {path} ({res.size_bytes / 1e6:.1f} MB, {res.seconds:.1f} s)")
        if res.verification:
            echo(res.verification)
        results.append(res)
    if req.trt:
        from export.trt_build import build_engine, onnx_precision_for

        src = onnx_paths[onnx_precision_for(req.trt_fp16)]
        engine = artifact_path(req.out_dir, "trt", "fp16" if req.trt_fp16 else "fp32")
        build = build_engine(src, engine, min_batch=req.min_batch, opt_batch=req.opt_batch,
                             max_batch=req.max_batch, fp16=req.trt_fp16, workspace_gb=req.workspace_gb,
                             timing_cache=req.timing_cache)
        size = engine.stat().st_size
        echo(f"tensorrt: {engine} ({size / 1e6:.1f} MB, {build.seconds:.1f} s)")
        results.append(ExportResult(engine, "trt", "fp16" if req.trt_fp16 else "fp32", build.seconds, size))
    return results


def cached_onnx(bundle: Bundle, bundle_dir: Path, precision: str, echo: Callable[[str], None] = print) -> Path:
    """The verified ONNX export of `bundle` (loaded from `bundle_dir`) in the user cache, exported on first use.

    Keyed by the bundle's content hash and dtml's version, so neither a changed bundle nor an upgraded
    exporter is served an old graph."""
    root = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dtml" / bundle.content_hash
            / f"dtml-{__version__}")
    path = artifact_path(root, "onnx", precision)
    if not path.is_file():
        echo(f"exporting {precision} ONNX of {bundle_dir} to {path} (once)")
        export_verified_onnx(bundle, path, precision)
    return path
