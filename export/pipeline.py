"""`dtml export`: ONNX (fp32/fp16) with built-in verification, and optionally a TensorRT engine and
OpenVINO IRs (fp32, and int8 checked against fp32 on its calibration scans: export/openvino_export.py).

Each ONNX artifact is exported to a temporary name, verified against the PyTorch fp32 pair, and only
then moved into place; a failed verification leaves nothing behind and fails the command. A TensorRT
engine is built from that verified ONNX (atomically, with its sidecar); its own agreement with torch
fp32 on a real case is what `dtml benchmark`'s TensorRT row measures.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtml_deploy.artifacts import TrtProfile
from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import BackendUnavailable, DtmlError
from dtml_deploy.intensity import prepare
from dtml_deploy.io.atomic import atomic_write_text
from dtml_deploy.io.digest import file_sha256
from dtml_deploy.io.volume import read_volume
from dtml_deploy.resample import resize, spacing_differs, target_shape
from dtml_deploy.speed_record import SPEED_FILE, write_record
from dtml_deploy.version import __version__
from dtml_export.formats import FORMATS, artifact_path, require_packages
from dtml_export.onnx_export import DEFAULT_OPSET, check_opset, export_onnx_info
from dtml_export.trt_build import TrtBuildOptions  # importable without TensorRT
from dtml_export.verify import render_report, verify_onnx


class VerificationFailed(DtmlError):
    """An exported artifact disagrees with the PyTorch model beyond the stated tolerances."""


@dataclass(frozen=True)
class ExportRequest:
    bundle: Path
    out_dir: Path
    precisions: tuple[str, ...] = ("fp32",)
    opset: int = DEFAULT_OPSET
    dynamic_spatial: bool = False
    verify: bool = True
    real_case: Path | None = None  # a scan whose central patch joins the random verification patches
    trt: bool = False
    trt_fp16: bool = True
    min_batch: int = TrtProfile.min_batch
    opt_batch: int = TrtProfile.opt_batch
    max_batch: int = TrtProfile.max_batch
    workspace_gb: float = TrtBuildOptions.workspace_gb
    timing_cache: Path | None = TrtBuildOptions.timing_cache
    openvino: bool = False  # also write the OpenVINO IR model-fp32.xml/.bin
    int8: bool = False  # also model-int8.xml/.bin (NNCF); implies openvino, needs calibration scans
    calibration: tuple[Path, ...] = ()  # scans whose windows calibrate int8 and check it against fp32
    calibration_cases: int = 16  # at most this many of them are used
    calibration_windows: int = 4  # windows per scan, evenly spaced over its window grid
    # Least mask Dice (int8 vs fp32 IR, whole calibration scans) for the int8 IR to be written. The shipped
    # model's 16 calibration scans measured 0.990-0.998, most unlabeled cases >= 0.98 but not all
    # (benchmarks/results/openvino_accuracy_cpu.json): a pass is necessary, not sufficient.
    min_int8_agreement: float = 0.98
    # With openvino: time every CPU-runnable model of the folder beside torch here (export/speed_probe.py) and
    # write speed.json, which `--backend auto --artifact FOLDER` ranks the folder's models by on this machine.
    measure: bool = True

    def __post_init__(self) -> None:
        check_opset(self.opset)
        self._check_openvino()
        bad = [p for p in self.precisions if p not in FORMATS["onnx"].precisions]
        if bad or not self.precisions:
            raise ValueError(f"ONNX precisions must be among {FORMATS['onnx'].precisions}, got {list(self.precisions)}")
        if Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise ValueError(f"{self.out_dir}: exists and is not a folder")
        if self.real_case is not None and not Path(self.real_case).is_file():
            raise ValueError(f"--real-case {self.real_case}: no such file")
        if self.trt:  # a bad profile fails before minutes of exporting, not after
            self.trt_options()
            from dtml_deploy.backends.trt_backend import unavailable_reason

            reason = unavailable_reason()
            if reason is not None:  # before the ONNX export it would build from, not after
                raise BackendUnavailable(f"--trt: {reason.split(';')[0]}")

    def _check_openvino(self) -> None:
        """int8 and calibration options that cannot work are refused before any export."""
        if self.int8 and not self.calibration:
            raise ValueError("--int8 needs real scans to calibrate on: pass --calibration SCANS "
                             "(files, folders or globs)")
        if self.calibration and not self.int8:
            raise ValueError("--calibration is used by --int8 only; add --int8 or drop --calibration")
        if self.calibration_cases < 1 or self.calibration_windows < 1:
            raise ValueError("--calibration-cases and --calibration-windows must be >= 1")
        if not 0.0 < self.min_int8_agreement <= 1.0:
            raise ValueError(f"--min-int8-agreement must be in (0, 1], got {self.min_int8_agreement}")
        if self.openvino or self.int8:
            require_packages(FORMATS["openvino"])

    def trt_options(self) -> TrtBuildOptions:
        """The TensorRT build these options ask for (ValueError for a profile or workspace it cannot build)."""
        return TrtBuildOptions(TrtProfile(self.min_batch, self.opt_batch, self.max_batch), fp16=self.trt_fp16,
                               workspace_gb=self.workspace_gb, timing_cache=self.timing_cache)


@dataclass
class ExportResult:
    path: Path
    kind: str
    precision: str
    seconds: float
    size_bytes: int
    verification: str = ""


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


def export_verified_onnx(bundle: Bundle, out: Path, precision: str, *, opset: int = DEFAULT_OPSET,
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


@contextlib.contextmanager
def _nothing_left_on_failure(out_dir: Path, planned: list[Path]) -> Iterator[None]:
    """If the block fails, remove the planned files it created and the folders it created for them,
    so a failed export leaves the output folder as it was (or absent)."""
    out_dir = Path(out_dir)
    missing_dirs = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    existed = {p for p in planned if p.exists()}
    try:
        yield
    except BaseException:
        for p in planned:
            if p not in existed:
                p.unlink(missing_ok=True)
        for d in missing_dirs:  # innermost first
            with contextlib.suppress(OSError):  # not empty: someone else wrote there
                d.rmdir()
        raise


def run_export(req: ExportRequest, echo: Callable[[str], None] = print) -> list[ExportResult]:
    """Everything `dtml export` does, in order; raises on the first failure, leaving no new file."""
    bundle = Bundle.load(req.bundle)
    real = central_patch(req.real_case, bundle) if req.real_case is not None else None
    precisions = list(req.precisions)
    planned = [artifact_path(req.out_dir, "onnx", p) for p in FORMATS["onnx"].precisions]
    if req.trt:
        from dtml_deploy.artifacts import sidecar_path
        from dtml_export.trt_build import onnx_precision_for

        needed = onnx_precision_for(req.trt_fp16)
        if needed not in precisions:
            precisions.append(needed)
        engine = artifact_path(req.out_dir, "trt", "fp16" if req.trt_fp16 else "fp32")
        planned += [engine, sidecar_path(engine)]
    if req.openvino or req.int8:
        if "fp32" not in precisions:
            precisions.append("fp32")  # the IR is converted from the verified fp32 graph
        xmls = [artifact_path(req.out_dir, "openvino", p) for p in ("fp32", "int8")]
        planned += [*xmls, *(x.with_suffix(".bin") for x in xmls), Path(req.out_dir) / SPEED_FILE]
    with _nothing_left_on_failure(req.out_dir, planned):
        return _export_all(req, bundle, precisions, real, echo)


def _export_all(req: ExportRequest, bundle: Bundle, precisions: list[str], real: np.ndarray | None,
                echo: Callable[[str], None]) -> list[ExportResult]:
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
        from dtml_export.trt_build import build_engine, onnx_precision_for

        src = onnx_paths[onnx_precision_for(req.trt_fp16)]
        engine = artifact_path(req.out_dir, "trt", "fp16" if req.trt_fp16 else "fp32")
        build = build_engine(src, engine, req.trt_options())
        size = engine.stat().st_size
        echo(f"tensorrt: {engine} ({size / 1e6:.1f} MB, {build.seconds:.1f} s)")
        results.append(ExportResult(engine, "trt", "fp16" if req.trt_fp16 else "fp32", build.seconds, size))
    if req.openvino or req.int8:
        results += _export_openvino(req, bundle, onnx_paths["fp32"], echo)
        if req.measure:
            _measure(req, bundle, real, echo)
    return results


def _measure(req: ExportRequest, bundle: Bundle, real: np.ndarray | None, echo: Callable[[str], None]) -> None:
    """Time the folder's CPU models beside torch here and write speed.json (what `--backend auto` reads)."""
    from dtml_export.speed_probe import ROUNDS, measure_folder

    echo(f"timing the CPU models beside torch on this machine (best of {ROUNDS} rounds)...")
    record = measure_folder(bundle, req.out_dir, [real] if real is not None else [])
    fastest = min(record.rows, key=lambda r: r.ms_per_window)
    path = write_record(req.out_dir, record)
    echo(f"speed: {path} (ms per window, batch {record.batch}): {record.summary()}; `--backend auto --artifact "
         f"{req.out_dir}` runs {fastest.label} on this machine")


def _export_openvino(req: ExportRequest, bundle: Bundle, onnx_fp32: Path,
                     echo: Callable[[str], None]) -> list[ExportResult]:
    """model-fp32.xml from the verified fp32 graph; with --int8 also model-int8.xml, written only when its
    masks agree with fp32's on every calibration scan (export/openvino_export.py)."""
    import time

    from dtml_export.openvino_export import bin_path, check_int8, convert_onnx, quantize_int8, save_ir, scan_windows

    def result(xml: Path, precision: str, seconds: float) -> ExportResult:
        size = xml.stat().st_size + bin_path(xml).stat().st_size
        echo(f"openvino {precision}: {xml} ({size / 1e6:.1f} MB, {seconds:.1f} s)")
        return ExportResult(xml, "openvino", precision, seconds, size)

    t = time.perf_counter()
    fp32 = save_ir(convert_onnx(onnx_fp32), bundle, artifact_path(req.out_dir, "openvino", "fp32"), "fp32", req.opset)
    results = [result(fp32, "fp32", time.perf_counter() - t)]
    if not req.int8:
        return results
    t = time.perf_counter()
    scans = list(req.calibration[: req.calibration_cases])
    windows = [w for s in scans for w in scan_windows(s, bundle, req.calibration_windows)]
    echo(f"int8: calibrating on {len(windows)} windows of {len(scans)} scan(s); the first and output "
         "convolutions stay fp32")
    quantised = quantize_int8(convert_onnx(onnx_fp32), windows)

    def check(tmp: Path) -> None:
        check_int8(bundle, fp32, tmp, scans, req.min_int8_agreement, echo)

    xml = save_ir(quantised, bundle, artifact_path(req.out_dir, "openvino", "int8"), "int8", req.opset, check)
    return [*results, result(xml, "int8", time.perf_counter() - t)]


def library_exporter(bundle: Bundle, bundle_dir: Path, precision: str) -> Path:
    """`cached_onnx` for the Python API (`dtml_deploy.Predictor`): its notes go to the `dtml` logger,
    not to the console."""
    import logging

    return cached_onnx(bundle, bundle_dir, precision, logging.getLogger("dtml").info)


def cached_onnx(bundle: Bundle, bundle_dir: Path, precision: str, echo: Callable[[str], None] = print) -> Path:
    """The verified ONNX export of `bundle` (loaded from `bundle_dir`) in the user cache, exported on first use.

    Keyed by the bundle's content hash and dtml's version, so neither a changed bundle nor an upgraded
    exporter is served an old graph. The graph's SHA-256 is recorded beside it when written and checked
    on every use: a truncated, edited or unrecorded graph is exported again, with a note."""
    root = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dtml" / bundle.content_hash
            / f"dtml-{__version__}")
    root.mkdir(parents=True, exist_ok=True)
    # Ranks of a torchrun launch on one node share the cache: one exports, the others wait and reuse it.
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = artifact_path(root, "onnx", precision)
        digest_file = path.with_name(path.name + ".sha256")
        if path.is_file():
            recorded = digest_file.read_text().strip() if digest_file.is_file() else None
            if recorded is not None and recorded == file_sha256(path):
                return path
            why = ("has no recorded SHA-256" if recorded is None
                   else "does not match its recorded SHA-256 (corrupt or modified)")
            echo(f"note: the cached ONNX graph {path} {why}; exporting it again")
        else:
            echo(f"exporting {precision} ONNX of {bundle_dir} to {path} (once)")
        digest_file.unlink(missing_ok=True)  # never a digest describing another graph
        export_verified_onnx(bundle, path, precision)
        atomic_write_text(digest_file, file_sha256(path) + "\n")
        return path
