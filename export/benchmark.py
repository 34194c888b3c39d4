"""`dtml benchmark`: every backend and precision this machine can run, side by side.

Each row (a backend at a precision) gets its artifact made when it needs one (a verified ONNX export,
a TensorRT engine built from it), then the engine `dtml segment` uses (same grid, blending, heads,
LCC) runs over whole cases: `warmup` untimed passes, then `repeats` timed passes at every batch size.
Agreement is the Dice of a row's final mask with the torch fp32 row's mask on the first real case;
without a real case it is not measured (timing then runs on a random 144x128x88 volume). A row that
cannot exist here is `skipped: <reason>`, a row that breaks is `failed: <reason>`; neither stops the
others.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtml_deploy.artifacts import TrtProfile
from dtml_deploy.backends.base import BackendOptions, resolve_device
from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import DtmlError, OutOfMemory, first_line
from dtml_deploy.io.volume import read_volume
from dtml_deploy.metrics import agreement
from dtml_deploy.predictor import Predictor
from dtml_deploy.segment import Segmenter, case_name
from dtml_export.bench_report import (
    NO_REAL_CASE,
    BenchmarkReport,
    BenchmarkRow,
    below_min_dice,
    format_report,
    machine,
    markdown_table,
    memory_note,
    nothing_timed,
    write_json,
)
from dtml_export.bench_rows import PARITY, PASSED, ROW_KEYS, ROWS, RowSpec, parse_formats, skip_reason
from dtml_export.bench_timing import Case, Timing, batch_values, fill_timing, record_memory, reset_memory, time_batch
from dtml_export.formats import artifact_path
from dtml_export.pipeline import VerificationFailed, central_patch, export_verified_onnx

RANDOM_SHAPE = (144, 128, 88)
STATUS_THRESHOLD = 0.99  # agreement below this marks a row "exported but failed parity"

__all__ = ["ROWS", "ROW_KEYS", "BenchmarkReport", "BenchmarkRequest", "BenchmarkRow", "below_min_dice",
           "format_report", "machine", "markdown_table", "nothing_timed", "parse_formats", "run_benchmark",
           "write_json"]


@dataclass(frozen=True)
class BenchmarkRequest:
    """What `dtml benchmark` measures."""

    bundle: Path
    data: tuple[Path, ...] = ()  # real cases; the first one measures agreement
    device: str = "auto"
    batches: tuple[int, ...] = ()  # empty: 1, 2, 4 on CPU; 1, 8, 16 on CUDA (batch 1 is always timed)
    repeats: int = 5
    warmup: int = 1
    min_dice: float | None = None  # None: STATUS_THRESHOLD sets the status, nothing gates the exit
    formats: tuple[str, ...] = ()  # row keys to run; empty: every row
    workdir: Path | None = None  # exported artifacts; None: a temporary folder, removed afterwards

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        bad = [b for b in self.batches if b < 1]
        if bad:
            raise ValueError(f"--batch values must be >= 1, got {bad[0]}")
        unknown = [f for f in self.formats if f not in ROW_KEYS]
        if unknown:
            raise ValueError(f"--formats: unknown row {unknown[0]!r}; choose from {', '.join(ROW_KEYS)}")
        if self.min_dice is not None and not self.data:
            raise ValueError("--min-dice needs --data: agreement is measured on a real case")

    @property
    def threshold(self) -> float:
        return STATUS_THRESHOLD if self.min_dice is None else self.min_dice


@dataclass
class _Context:
    req: BenchmarkRequest
    bundle: Bundle
    device: torch.device
    cases: list[Case]
    real: bool
    batches: tuple[int, ...]
    workdir: Path
    echo: Callable[[str], None]
    reference: np.ndarray | None = None
    reference_note: str | None = None
    onnx: dict[str, tuple[Path, str | None]] = field(default_factory=dict)  # precision -> (path, failure)


def _load_cases(req: BenchmarkRequest, bundle: Bundle) -> list[Case]:
    if not req.data:
        rng = np.random.default_rng(0)
        return [Case("random-144x128x88", rng.standard_normal(RANDOM_SHAPE, dtype=np.float32), None)]
    cases = []
    for path in req.data:
        vol = read_volume(path, default_spacing=bundle.model.spacing)
        cases.append(Case(case_name(Path(path)), vol.array, vol.spacing if vol.header is not None else None))
    return cases


def _onnx_artifact(ctx: _Context, precision: str) -> tuple[Path, str | None]:
    """A verified ONNX export (made once per precision); a failed verification is exported again
    unverified so it can still be timed, with the failure returned beside the path."""
    if precision in ctx.onnx:
        return ctx.onnx[precision]
    path = artifact_path(ctx.workdir, "onnx", precision)
    real = central_patch(ctx.req.data[0], ctx.bundle) if ctx.real else None
    failure = None
    try:
        export_verified_onnx(ctx.bundle, path, precision, real_patch=real)
    except VerificationFailed as e:
        failure = first_line(e, 200, typed=True)
        export_verified_onnx(ctx.bundle, path, precision, verify=False)
    ctx.onnx[precision] = (path, failure)
    return path, failure


def _trt_artifact(ctx: _Context, fp16: bool) -> tuple[Path, str | None]:
    from dtml_export.trt_build import TrtBuildOptions, build_engine, onnx_precision_for

    src, failure = _onnx_artifact(ctx, onnx_precision_for(fp16))
    engine = artifact_path(ctx.workdir, "trt", "fp16" if fp16 else "fp32")
    top = max(ctx.batches)
    build_engine(src, engine, TrtBuildOptions(TrtProfile(1, top, top), fp16=fp16))
    return engine, failure


def _artifact(ctx: _Context, spec: RowSpec, precision: str) -> tuple[Path | None, str | None]:
    """The artifact a row runs (None for torch), made by its format's maker; with a parity failure, if any."""
    if spec.backend == "torch":
        return None, None
    if spec.backend not in _MAKERS:
        raise DtmlError(f"dtml benchmark has no maker for {spec.backend} artifacts")
    return _MAKERS[spec.backend](ctx, spec.artifact_precision or precision)


def _openvino_artifact(ctx: _Context, precision: str) -> tuple[Path, str | None]:
    """An IR from the verified fp32 graph; int8 is quantised on windows of the --data scans (its agreement
    is this row's, not a refusal as in `dtml export --int8`)."""
    from dtml_export.onnx_export import DEFAULT_OPSET
    from dtml_export.openvino_export import convert_onnx, quantize_int8, save_ir, scan_windows
    from dtml_export.pipeline import ExportRequest

    src, failure = _onnx_artifact(ctx, "fp32")
    path = artifact_path(ctx.workdir, "openvino", precision)
    model = convert_onnx(src)
    if precision == "int8":
        n = ExportRequest.calibration_windows
        model = quantize_int8(model, [w for scan in ctx.req.data for w in scan_windows(scan, ctx.bundle, n)])
    return save_ir(model, ctx.bundle, path, precision, DEFAULT_OPSET), failure


_MAKERS: dict[str, Callable[[_Context, str], tuple[Path, str | None]]] = {
    "onnx": _onnx_artifact, "trt": lambda ctx, precision: _trt_artifact(ctx, precision == "fp16"),
    "openvino": _openvino_artifact}


def _segmenter(ctx: _Context, spec: RowSpec, precision: str, batch: int, artifact: Path | None) -> Segmenter:
    """The bundle and a backend with the engine settings of `dtml segment` (its defaults)."""
    return Predictor.load(ctx.bundle, backend=spec.backend, artifact=artifact, device=ctx.req.device,
                          precision=precision, batch=batch, compile=spec.compile, cuda_graphs=spec.cuda_graphs,
                          cudnn_fusion=spec.cudnn_fusion).segmenter


def _measure(ctx: _Context, spec: RowSpec, row: BenchmarkRow, precision: str) -> np.ndarray:
    """Make the artifact, time every batch size; returns the first case's final mask."""
    artifact, failure = _artifact(ctx, spec, precision)
    if artifact is not None:
        row.artifact = str(artifact)
        row.artifact_mb = artifact.stat().st_size / 1e6
    if failure is not None:
        row.status, row.detail = PARITY, failure
    timings: dict[int, Timing] = {}
    skipped: list[str] = []
    for batch in ctx.batches:
        segmenter = _segmenter(ctx, spec, precision, batch, artifact)
        row.runs_on = row.runs_on or segmenter.backend.describe()
        try:
            timings[batch] = time_batch(segmenter, ctx.cases, ctx.req.warmup, ctx.req.repeats)
        except OutOfMemory:
            skipped.append(f"batch {batch}: out of memory")
            if not timings:
                raise
            break
        ctx.echo(f"  {spec.key} batch {batch}: {timings[batch].ms_per_window:.2f} ms/window")
    if skipped:
        row.detail = "; ".join(filter(None, [row.detail, *skipped]))
    voxels = sum(c.image.size for c in ctx.cases) / len(ctx.cases)
    fill_timing(row, timings, voxels)
    return timings[min(timings)].mask


def _judge(ctx: _Context, row: BenchmarkRow, mask: np.ndarray, is_reference: bool) -> None:
    """Agreement with torch fp32 and the parity status."""
    if not ctx.real:
        row.agreement_note = NO_REAL_CASE
        return
    if is_reference:
        ctx.reference = mask
    if ctx.reference is None:
        row.agreement_note = ctx.reference_note or "no torch fp32 reference: agreement not measured"
        return
    row.agreement = agreement(mask, ctx.reference)
    if row.agreement < ctx.req.threshold:
        row.status = PARITY
        why = f"agreement {row.agreement:.4f} < {ctx.req.threshold}"
        row.detail = f"{row.detail}; {why}" if row.detail else why


def run_row(ctx: _Context, spec: RowSpec, named: bool) -> BenchmarkRow:
    """One row; never raises (a failure becomes the row's status)."""
    cuda = ctx.device.type == "cuda"
    precision = spec.precision or str(BackendOptions(device=str(ctx.device)).resolved(spec.backend).precision)
    row = BenchmarkRow(spec.key, spec.name, spec.backend, spec.artifact_precision or precision, PASSED)
    reason = skip_reason(spec, cuda, named, ctx.real)
    if reason is not None:
        row.status = f"skipped: {reason}"
        return row
    ctx.echo(f"{spec.name}: running")
    before = reset_memory(ctx.device)
    try:
        mask = _measure(ctx, spec, row, precision)
    except Exception as e:  # any failure of one row is reported in its row; the others go on
        row.status = f"failed: {first_line(e, 200, typed=True)}"
        if spec.key == "torch-fp32":
            ctx.reference_note = "no reference: the torch fp32 row failed"
        return row
    finally:
        record_memory(row, ctx.device, before)
        if cuda:
            torch.cuda.empty_cache()
    _judge(ctx, row, mask, spec.key == "torch-fp32")
    return row


def _reference_mask(ctx: _Context) -> None:
    """torch fp32's mask of the first real case, when the torch fp32 row is not among the rows."""
    if not ctx.real:
        return
    try:
        segmenter = _segmenter(ctx, ROWS[0], "fp32", 1, None)
        ctx.reference = segmenter.segment_array(ctx.cases[0].image, ctx.cases[0].spacing).mask
    except Exception as e:  # reported in each row's agreement note
        ctx.reference_note = f"no reference: torch fp32 failed ({first_line(e, 200, typed=True)})"


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="dtml-benchmark-") as tmp:
        yield Path(tmp)


def _request_dict(req: BenchmarkRequest, batches: tuple[int, ...]) -> dict[str, Any]:
    d = asdict(req)
    d.update(bundle=str(req.bundle), data=[str(p) for p in req.data], batches=list(batches),
             workdir=str(req.workdir) if req.workdir else None, status_threshold=req.threshold)
    d["formats"] = list(req.formats)
    return d


def run_benchmark(req: BenchmarkRequest, echo: Callable[[str], None] = lambda _: None) -> BenchmarkReport:
    """Every selected row in table order; bad requests raise, row failures become rows."""
    bundle = Bundle.load(req.bundle)
    device = resolve_device(req.device)
    cuda = device.type == "cuda"
    batches = batch_values(req.batches, cuda)
    specs = [s for s in ROWS if not req.formats or s.key in req.formats]
    reasons = {s.key: skip_reason(s, cuda, s.key in req.formats, bool(req.data)) for s in specs}
    if all(reasons.values()):  # say so before loading cases or making a work folder
        raise DtmlError("nothing to benchmark on this machine: "
                        + "; ".join(f"{key} skipped ({why})" for key, why in reasons.items()))
    cases = _load_cases(req, bundle)
    rows: list[BenchmarkRow] = []
    with _workdir(req.workdir) as workdir:
        ctx = _Context(req, bundle, device, cases, bool(req.data), batches, workdir, echo)
        if not any(s.key == "torch-fp32" for s in specs):
            _reference_mask(ctx)
        for spec in specs:
            row = run_row(ctx, spec, spec.key in req.formats)
            echo(f"{spec.name}: {row.status}")
            rows.append(row)
    return BenchmarkReport(machine(device), memory_note(device), _request_dict(req, batches),
                           [c.name for c in cases], rows)


