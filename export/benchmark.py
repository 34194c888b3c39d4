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
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtml_deploy.artifacts import TrtProfile
from dtml_deploy.backends.base import BackendOptions, resolve_device
from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import DtmlError, OutOfMemory
from dtml_deploy.io.atomic import atomic_write_text
from dtml_deploy.io.volume import read_volume
from dtml_deploy.metrics import agreement
from dtml_deploy.predictor import Predictor
from dtml_deploy.segment import Segmenter, case_name
from export.formats import FORMATS, artifact_path, missing_packages
from export.pipeline import VerificationFailed, central_patch, export_verified_onnx

RANDOM_SHAPE = (144, 128, 88)
STATUS_THRESHOLD = 0.99  # agreement below this marks a row "exported but failed parity"
PASSED = "passed"
PARITY = "exported but failed parity"
OUTLIER_FACTOR = 1.5  # a timed run longer than this times the median is an outlier
NO_REAL_CASE = "no real case: agreement not measured"


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: a backend at a precision with its options."""

    key: str  # the name --formats takes
    name: str
    backend: str  # torch | onnx | trt
    precision: str | None  # None: the device's default (fp16 on CUDA, fp32 on CPU)
    compile: bool = False
    cuda_graphs: bool = False
    cudnn_fusion: bool = False


ROWS: tuple[RowSpec, ...] = (
    RowSpec("torch-fp32", "torch fp32", "torch", "fp32"),
    RowSpec("torch-bf16", "torch bf16", "torch", "bf16"),
    RowSpec("torch-fp16", "torch fp16", "torch", "fp16"),
    RowSpec("torch-fp16-graphs", "torch fp16 + CUDA graphs + cuDNN fusion", "torch", "fp16",
            cuda_graphs=True, cudnn_fusion=True),
    RowSpec("torch-compiled", "torch compiled", "torch", None, compile=True),
    RowSpec("onnx-fp32", "onnxruntime fp32", "onnx", "fp32"),
    RowSpec("onnx-fp16", "onnxruntime fp16", "onnx", "fp16"),
    RowSpec("trt-fp16", "TensorRT fp16", "trt", "fp16"),
)
ROW_KEYS: tuple[str, ...] = tuple(s.key for s in ROWS)


def parse_formats(text: str | None) -> tuple[str, ...]:
    """`--formats a,b`: the row keys (None: every row); an option that names nothing is refused."""
    if text is None:
        return ()
    keys = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    if not keys:
        raise ValueError(f"--formats names no row; choose from {', '.join(ROW_KEYS)}")
    return keys


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
class BenchmarkRow:
    """One backend/precision: what ran, whether it agrees with torch fp32, and how fast it was."""

    key: str
    name: str
    backend: str
    precision: str
    status: str  # passed | exported but failed parity | failed: <reason> | skipped: <reason>
    detail: str | None = None
    runs_on: str | None = None  # the backend's own description (device, flags, execution providers)
    artifact: str | None = None
    artifact_mb: float | None = None
    agreement: float | None = None  # Dice of the final mask with torch fp32's, first real case
    agreement_note: str | None = None
    windows: int | None = None  # windows per pass over the cases
    ms_per_window: dict[str, float] = field(default_factory=dict)  # batch -> median engine ms per window
    ms_per_window_b1: float | None = None
    best_batch: int | None = None
    ms_per_window_best: float | None = None
    seconds_per_case: float | None = None  # median over the timed passes, at the best batch
    seconds_min: float | None = None
    seconds_max: float | None = None
    outliers: int | None = None  # timed passes longer than OUTLIER_FACTOR x the median
    runs: list[float] = field(default_factory=list)
    mvox_per_s: float | None = None
    peak_memory_mb: float | None = None
    memory_growth_mb: float | None = None

    @property
    def timed(self) -> bool:
        return self.status in (PASSED, PARITY)


@dataclass
class BenchmarkReport:
    machine: str
    memory: str  # what peak_memory_mb measures on this device
    request: dict[str, Any]
    cases: list[str]
    rows: list[BenchmarkRow]

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "memory": self.memory, "request": self.request, "cases": self.cases,
                "rows": [asdict(r) for r in self.rows]}


@dataclass
class _Case:
    name: str
    image: np.ndarray
    spacing: tuple[float, float, float] | None


@dataclass
class _Timing:
    """One batch size of one row."""

    ms_per_window: float
    seconds_per_case: list[float]
    windows: int
    mask: np.ndarray


@dataclass
class _Context:
    req: BenchmarkRequest
    bundle: Bundle
    device: torch.device
    cases: list[_Case]
    real: bool
    batches: tuple[int, ...]
    workdir: Path
    echo: Callable[[str], None]
    reference: np.ndarray | None = None
    reference_note: str | None = None
    onnx: dict[str, tuple[Path, str | None]] = field(default_factory=dict)  # precision -> (path, failure)


# ------------------------------------------------------------------------------------------ helpers


def one_line(e: BaseException) -> str:
    """An exception as one short line (toolkit errors without their type name)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0].strip() if lines else ""
    if not isinstance(e, DtmlError):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text[:200]


def machine(device: torch.device) -> str:
    """One line naming the hardware and runtimes the numbers come from."""
    if device.type == "cuda":
        hw = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        cpu = platform.processor() or "cpu"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        hw = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU)"
    with contextlib.suppress(ImportError):
        import onnxruntime

        hw += f", onnxruntime {onnxruntime.__version__}"
    return hw


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of `rows` restricted to `columns` (None prints as empty)."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v).replace("|", "/")

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def default_batches(cuda: bool) -> tuple[int, ...]:
    return (1, 8, 16) if cuda else (1, 2, 4)


def batch_values(requested: tuple[int, ...], cuda: bool) -> tuple[int, ...]:
    """Sorted distinct batch sizes, batch 1 always among them."""
    return tuple(sorted({1, *(requested or default_batches(cuda))}))


def _maxrss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak MB: torch.cuda.max_memory_allocated per row (torch's allocator only)"
    return ("peak MB: process ru_maxrss after the row, a high-water mark of the whole process (torch's CPU "
            "allocations are not traceable per row); +N: its growth during the row")


def _load_cases(req: BenchmarkRequest, bundle: Bundle) -> list[_Case]:
    if not req.data:
        rng = np.random.default_rng(0)
        return [_Case("random-144x128x88", rng.standard_normal(RANDOM_SHAPE, dtype=np.float32), None)]
    cases = []
    for path in req.data:
        vol = read_volume(path, default_spacing=bundle.model.spacing)
        cases.append(_Case(case_name(Path(path)), vol.array, vol.spacing if vol.header is not None else None))
    return cases


# ------------------------------------------------------------------------------------ skip reasons


def _onnx_ep_reason(precision: str, cuda: bool) -> str | None:
    missing = missing_packages(FORMATS["onnx"]) + missing_packages(FORMATS["onnx"], run=True)
    if missing:
        return f"{', '.join(sorted(set(missing)))} not installed (pip install 'dtml[onnx]')"
    if not cuda:
        fp16 = precision == "fp16"
        return "fp16 ONNX runs on onnxruntime's CUDA provider only; the device is the CPU" if fp16 else None
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)"
    return None


def _trt_reason(cuda: bool) -> str | None:
    from dtml_deploy.backends.trt_backend import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return reason.split(";")[0]
    return None if cuda else "TensorRT runs on CUDA only; the device is the CPU"


def skip_reason(spec: RowSpec, cuda: bool, named: bool) -> str | None:
    """Why `spec` cannot run here (None when it can); `named`: --formats asked for it."""
    if spec.backend == "torch":
        if spec.precision == "fp16" and not cuda:
            return "fp16 needs CUDA (no fp16 convolutions on the CPU)"
        if spec.compile and not cuda and not named:
            return "torch.compile is slow to build on the CPU; name torch-compiled in --formats to include it"
        return None
    if spec.backend == "onnx":
        return _onnx_ep_reason(spec.precision or "fp32", cuda)
    return _trt_reason(cuda)


# -------------------------------------------------------------------------------------- artifacts


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
        failure = one_line(e)
        export_verified_onnx(ctx.bundle, path, precision, verify=False)
    ctx.onnx[precision] = (path, failure)
    return path, failure


def _trt_artifact(ctx: _Context, fp16: bool) -> tuple[Path, str | None]:
    from export.trt_build import TrtBuildOptions, build_engine, onnx_precision_for

    src, failure = _onnx_artifact(ctx, onnx_precision_for(fp16))
    engine = artifact_path(ctx.workdir, "trt", "fp16" if fp16 else "fp32")
    top = max(ctx.batches)
    build_engine(src, engine, TrtBuildOptions(TrtProfile(1, top, top), fp16=fp16))
    return engine, failure


def _artifact(ctx: _Context, spec: RowSpec, precision: str) -> tuple[Path | None, str | None]:
    if spec.backend == "onnx":
        return _onnx_artifact(ctx, precision)
    if spec.backend == "trt":
        return _trt_artifact(ctx, precision == "fp16")
    return None, None


# ----------------------------------------------------------------------------------------- timing


def _segmenter(ctx: _Context, spec: RowSpec, precision: str, batch: int, artifact: Path | None) -> Segmenter:
    """The bundle and a backend with the engine settings of `dtml segment` (its defaults)."""
    return Predictor.load(ctx.bundle, backend=spec.backend, artifact=artifact, device=ctx.req.device,
                          precision=precision, batch=batch, compile=spec.compile, cuda_graphs=spec.cuda_graphs,
                          cudnn_fusion=spec.cudnn_fusion).segmenter


def _one_pass(segmenter: Segmenter, cases: list[_Case]) -> tuple[float, float, int, np.ndarray]:
    """Wall seconds, engine seconds, windows, and the first case's final mask of one pass."""
    wall = engine = 0.0
    windows = 0
    first: np.ndarray | None = None
    for case in cases:
        t = time.perf_counter()
        seg = segmenter.segment_array(case.image, case.spacing, case.name)
        wall += time.perf_counter() - t
        engine += seg.seconds.get("windows", 0.0) + seg.seconds.get("finalise", 0.0)
        windows += seg.windows
        if first is None:
            first = seg.mask
    assert first is not None
    return wall, engine, windows, first


def _time_batch(segmenter: Segmenter, cases: list[_Case], warmup: int, repeats: int) -> _Timing:
    mask = None
    for _ in range(warmup):
        _, _, _, m = _one_pass(segmenter, cases)
        mask = m if mask is None else mask
    walls, per_window = [], []
    windows = 0
    for _ in range(repeats):
        wall, engine, windows, m = _one_pass(segmenter, cases)
        mask = m if mask is None else mask
        walls.append(wall / len(cases))
        per_window.append(1000.0 * engine / max(windows, 1))
    assert mask is not None
    return _Timing(statistics.median(per_window), walls, windows, mask)


def _reset_memory(device: torch.device) -> float | None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return None
    return _maxrss_mb()


def _record_memory(row: BenchmarkRow, device: torch.device, before: float | None) -> None:
    if device.type == "cuda":
        row.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
        return
    after = _maxrss_mb()
    row.peak_memory_mb = after
    row.memory_growth_mb = None if after is None or before is None else after - before


def _fill_timing(row: BenchmarkRow, timings: dict[int, _Timing], voxels_per_case: float) -> None:
    row.ms_per_window = {str(b): t.ms_per_window for b, t in timings.items()}
    row.ms_per_window_b1 = timings[1].ms_per_window if 1 in timings else None
    best = min(timings, key=lambda b: timings[b].ms_per_window)
    runs = timings[best].seconds_per_case
    median = statistics.median(runs)
    row.best_batch, row.ms_per_window_best = best, timings[best].ms_per_window
    row.windows = timings[best].windows
    row.seconds_per_case, row.seconds_min, row.seconds_max = median, min(runs), max(runs)
    row.outliers = sum(r > OUTLIER_FACTOR * median for r in runs)
    row.runs = runs
    row.mvox_per_s = voxels_per_case / median / 1e6 if median > 0 else None


def _measure(ctx: _Context, spec: RowSpec, row: BenchmarkRow, precision: str) -> np.ndarray:
    """Make the artifact, time every batch size; returns the first case's final mask."""
    artifact, failure = _artifact(ctx, spec, precision)
    if artifact is not None:
        row.artifact = str(artifact)
        row.artifact_mb = artifact.stat().st_size / 1e6
    if failure is not None:
        row.status, row.detail = PARITY, failure
    timings: dict[int, _Timing] = {}
    skipped: list[str] = []
    for batch in ctx.batches:
        segmenter = _segmenter(ctx, spec, precision, batch, artifact)
        row.runs_on = row.runs_on or segmenter.backend.describe()
        try:
            timings[batch] = _time_batch(segmenter, ctx.cases, ctx.req.warmup, ctx.req.repeats)
        except OutOfMemory:
            skipped.append(f"batch {batch}: out of memory")
            if not timings:
                raise
            break
        ctx.echo(f"  {spec.key} batch {batch}: {timings[batch].ms_per_window:.2f} ms/window")
    if skipped:
        row.detail = "; ".join(filter(None, [row.detail, *skipped]))
    voxels = sum(c.image.size for c in ctx.cases) / len(ctx.cases)
    _fill_timing(row, timings, voxels)
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
    row = BenchmarkRow(spec.key, spec.name, spec.backend, precision, PASSED)
    reason = skip_reason(spec, cuda, named)
    if reason is not None:
        row.status = f"skipped: {reason}"
        return row
    ctx.echo(f"{spec.name}: running")
    before = _reset_memory(ctx.device)
    try:
        mask = _measure(ctx, spec, row, precision)
    except Exception as e:  # any failure of one row is reported in its row; the others go on
        row.status = f"failed: {one_line(e)}"
        if spec.key == "torch-fp32":
            ctx.reference_note = "no reference: the torch fp32 row failed"
        return row
    finally:
        _record_memory(row, ctx.device, before)
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
        ctx.reference_note = f"no reference: torch fp32 failed ({one_line(e)})"


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
    reasons = {s.key: skip_reason(s, cuda, s.key in req.formats) for s in specs}
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


# ----------------------------------------------------------------------------------------- output


def _fmt(v: float | None, digits: int = 2) -> str | None:
    return None if v is None else f"{v:.{digits}f}"


def _table_row(row: BenchmarkRow) -> dict[str, Any]:
    spread = None
    if row.seconds_per_case is not None:
        spread = f"{row.seconds_min:.3g}–{row.seconds_max:.3g} s, {row.outliers} outlier(s)"
    memory = _fmt(row.peak_memory_mb, 0) if row.timed else None
    if memory is not None and row.memory_growth_mb is not None:
        memory += f" (+{row.memory_growth_mb:.0f})"
    agreement = _fmt(row.agreement, 4) if row.agreement is not None else ("n/a" if row.timed else None)
    status = row.status if row.detail is None or not row.timed else f"{row.status} ({row.detail})"
    return {
        "row": row.name, "precision": row.precision, "status": status,
        "artifact MB": _fmt(row.artifact_mb, 1), "agreement": agreement,
        "ms/window b1": _fmt(row.ms_per_window_b1),
        "ms/window best": None if row.best_batch is None else f"{row.ms_per_window_best:.2f} (b{row.best_batch})",
        "s/case": _fmt(row.seconds_per_case, 3), "Mvox/s": _fmt(row.mvox_per_s),
        "peak MB": memory, "spread": spread,
    }


TABLE_COLUMNS = ["row", "precision", "status", "artifact MB", "agreement", "ms/window b1", "ms/window best",
                 "s/case", "Mvox/s", "peak MB", "spread"]


def format_report(report: BenchmarkReport) -> str:
    """The Markdown table with a header naming the machine and the cases, and notes below it."""
    req = report.request
    head = [f"machine: {report.machine}",
            f"cases: {', '.join(report.cases)}; batches {req['batches']}; median of {req['repeats']} timed "
            f"run(s) after {req['warmup']} warm-up(s)"]
    agreement = (f"agreement: Dice of the final mask with torch fp32's on {report.cases[0]}; parity failed "
                 f"below {req['status_threshold']}" if req["data"] else f"agreement: {NO_REAL_CASE} (pass --data)")
    notes = [report.memory, agreement,
             f"spread: min–max seconds per case at the best batch; outliers: runs > {OUTLIER_FACTOR}x the median"]
    if req["workdir"] is None:
        notes.append("artifacts were written to a temporary folder and removed; pass -o DIR to keep them")
    table = markdown_table([_table_row(r) for r in report.rows], TABLE_COLUMNS)
    return "\n".join([*head, "", table, "", *notes])


def write_json(report: BenchmarkReport, path: Path) -> None:
    try:
        atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
    except OSError as e:
        raise DtmlError(f"{path}: cannot write the JSON report ({e.strerror or e})") from None


def nothing_timed(report: BenchmarkReport) -> str | None:
    """One line when no row of the report was timed (all skipped or failed); None when one was."""
    if any(r.timed for r in report.rows):
        return None
    return "no benchmark row ran: " + "; ".join(f"{r.key} {r.status}" for r in report.rows)


def below_min_dice(report: BenchmarkReport, min_dice: float) -> list[str]:
    """'key (why)' for every row that does not show agreement >= `min_dice`: below it, failed, or run
    without a torch fp32 reference. Rows skipped because this machine lacks their runtime do not count."""
    low = []
    for r in report.rows:
        if r.status.startswith("failed"):
            low.append(f"{r.key} (failed)")
        elif r.timed and r.agreement is None:
            low.append(f"{r.key} (not measured)")
        elif r.timed and r.agreement < min_dice:
            low.append(f"{r.key} ({r.agreement:.4f})")
    return low
