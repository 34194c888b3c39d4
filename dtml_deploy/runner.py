"""The core of `dtml segment`: inference settings and a file job in, per-case reports out."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dtml_deploy.backend_choice import resolve_backend
from dtml_deploy.backends.base import BackendOptions, create_backend, resolve_device
from dtml_deploy.bundle import Bundle
from dtml_deploy.engine.grid import GridSpec
from dtml_deploy.engine.sliding import EngineConfig
from dtml_deploy.io.extent import voxel_estimate
from dtml_deploy.io.geometry import guessed_geometry_note
from dtml_deploy.io.outputs import RunPlan, plan_run
from dtml_deploy.io.reports import SEGMENT_JSON, check_report_path, check_report_target, write_report_text
from dtml_deploy.limits import WorkLimits
from dtml_deploy.qc import warning_line
from dtml_deploy.qc_reference import no_qc_note
from dtml_deploy.ranks import Beat, Ranks, ShardSettings, rank_device, run_cases, sigterm_stops
from dtml_deploy.segment import CaseReport, Segmenter, SegmentOptions, case_names


@dataclass(frozen=True)
class InferenceSettings:
    """How a bundle segments a scan: backend, engine, pre/post-processing and the maps it keeps.
    The defaults are the engine's own (EngineConfig, GridSpec, SegmentOptions, BackendOptions)."""

    model: Path | None = None  # the bundle folder; None for a bundle handed to build_segmenter in memory
    backend: str = "auto"
    artifact: Path | None = None
    device: str = BackendOptions.device
    precision: str | None = None  # None: fp16 on CUDA, fp32 on CPU
    overlap: float = GridSpec.overlap
    stride: tuple[int, int, int] | None = GridSpec.stride
    batch: int | None = None  # None: default_batch(device)
    blend: str = EngineConfig.blend
    head: str = EngineConfig.head
    tta: bool = EngineConfig.tta
    qc: bool = EngineConfig.qc
    lcc: bool = SegmentOptions.lcc
    resample: bool = SegmentOptions.resample
    intensity: str = SegmentOptions.intensity
    save_prob: bool = EngineConfig.keep_prob
    save_sdm: bool = EngineConfig.keep_sdm
    save_uncertainty: bool = EngineConfig.keep_uncertainty
    output_format: str = SegmentOptions.output_format
    preview: bool = SegmentOptions.preview
    compile: bool = BackendOptions.compile
    cuda_graphs: bool | None = None  # None: on for the torch backend on CUDA
    cudnn_fusion: bool | None = None  # None: on for the torch backend on CUDA
    spacing: tuple[float, float, float] | None = SegmentOptions.spacing  # overrides every input's voxel sizes
    max_windows: int | None = None  # None: WorkLimits' default


@dataclass(frozen=True)
class SegmentJob:
    """Which files `dtml segment` reads and where its results go."""

    inputs: list[Path]
    output: Path
    overwrite: bool = False
    json_report: Path | None = None
    progress: bool = True


def default_precision(device: str) -> str:
    return "fp16" if resolve_device(device).type == "cuda" else "fp32"


def default_batch(device: str) -> int:
    """8 on CUDA (fastest on an H200: benchmarks/results/segment_speed_h200.json, batch 16 was slower);
    4 on the CPU (batch 2 and 4 run level there, 0.76 s per window pair)."""
    return 8 if resolve_device(device).type == "cuda" else 4


def engine_config(req: InferenceSettings, bundle: Bundle) -> EngineConfig:
    trained = (bundle.meta.get("training") or {}).get("trained", ["seg", "dis"])
    both = "seg" in trained and "dis" in trained
    head = req.head
    if not both and head == "mean":  # the mean of the heads a single-network bundle has is its one head
        head = "seg" if "seg" in trained else "sdm"
    if not both and head != ("seg" if "seg" in trained else "sdm"):
        raise ValueError(f"this bundle trained only {trained}; --head {head} needs the other network")
    if req.save_uncertainty and not both:
        raise ValueError(f"this bundle trained only {trained}; --save-uncertainty needs both networks")
    return EngineConfig(
        grid=GridSpec(overlap=req.overlap, stride=req.stride), blend=req.blend, head=head,  # type: ignore[arg-type]
        qc=req.qc and both, keep_prob=req.save_prob, keep_sdm=req.save_sdm,
        keep_uncertainty=req.save_uncertainty and both, keep_heads=req.qc and both, tta=req.tta)


def build_segmenter(req: InferenceSettings, bundle: Bundle | None = None, ranks: Ranks = Ranks()) -> Segmenter:
    """The one way a segmenter is made (CLI, evaluation, benchmark): create the backend for `bundle`
    (loaded from `req.model` when not given) and bind them with the engine options of `req`; under
    torchrun on CUDA each rank takes cuda:LOCAL_RANK (ranks.rank_device)."""
    req = replace(req, device=rank_device(req.device, ranks))
    if bundle is None:
        if req.model is None:
            raise ValueError("build_segmenter needs a bundle or InferenceSettings.model")
        bundle = Bundle.load(req.model)
    engine = engine_config(req, bundle)
    precision = req.precision or default_precision(req.device)
    # The fastest measured CUDA configuration (benchmarks/results/segment_speed_h200.md) is the default.
    cuda = resolve_device(req.device).type == "cuda"
    options = BackendOptions(device=req.device, precision=precision,  # type: ignore[arg-type]
                             batch=default_batch(req.device) if req.batch is None else req.batch,
                             compile=req.compile, artifact=req.artifact,
                             cuda_graphs=cuda if req.cuda_graphs is None else req.cuda_graphs,
                             cudnn_fusion=cuda if req.cudnn_fusion is None else req.cudnn_fusion)
    name = resolve_backend(req.backend, req.artifact, compile=req.compile, cuda_graphs=req.cuda_graphs,
                           cudnn_fusion=req.cudnn_fusion)
    backend = create_backend(name, bundle, options, engine.channels)
    limits = WorkLimits() if req.max_windows is None else WorkLimits(max_windows=req.max_windows)
    return Segmenter(bundle, backend, SegmentOptions(engine=engine, lcc=req.lcc, resample=req.resample,
                                                     intensity=req.intensity,  # type: ignore[arg-type]
                                                     limits=limits, spacing=req.spacing,
                                                     output_format=req.output_format,
                                                     preview=req.preview))


def check_outputs(job: SegmentJob, segmenter: Segmenter, names: list[str]) -> RunPlan:
    """Refuse, before any inference, outputs that would collide (io/outputs.py) and a report path that is an
    input, a planned output or a file other than an earlier segment report (io/reports.py); `names` are the
    cases' names (segment.case_names)."""
    plan = plan_run(job.inputs, names, job.output, segmenter.output_spec())
    if job.json_report is not None:
        check_report_target(job.json_report, SEGMENT_JSON, plan.taken, job.overwrite)
    return plan


def _case_line(rep: CaseReport, name: str, model_spacing: tuple[float, float, float]) -> list[str]:
    """The console lines of one finished case (its result, a resampling note, a QC warning)."""
    if rep.status != "ok":
        return [f"error: {rep.error}"]
    lines = []
    if rep.resampled:
        lines.append(f"  warning: {name}: spacing {tuple(round(x, 4) for x in rep.spacing or ())} differs from "
                     f"the model's {model_spacing}; resampled to it and back (--no-resample to skip)")
    s = sum(rep.seconds.values())
    agree = f", head agreement {rep.agreement:.3f}" if rep.agreement is not None else ""
    windows = f"{rep.windows} window{'' if rep.windows == 1 else 's'}"
    score = f", QC score {rep.qc['score']:.2f}" if rep.qc else ""
    lines.append(f"  {name}: {rep.output} ({windows}, {s:.2f} s{agree}{score})")
    lines.extend(f"  warning: {name}: {w}" for w in rep.warnings or ())
    if rep.removed:
        lines.append(f"  note: {name}: removed {', '.join(rep.removed)}: left by an earlier run, not written by "
                     "this one (--overwrite replaces a case's whole output set)")
    flagged = warning_line(name, rep.qc)
    if flagged:
        lines.append(f"  {flagged}")
    return lines


def run_segment(job: SegmentJob, req: InferenceSettings, bundle: Bundle | None = None,
                ranks: Ranks = Ranks(), shard: ShardSettings = ShardSettings()) -> list[CaseReport] | None:
    """Segment every input of `job` with `req`; a failing case becomes a 'failed' report and the rest go on.
    Under torchrun (`ranks.distributed`) the cases are shared among the ranks (dtml_deploy/ranks.py); rank 0
    prints every case, writes the one report and returns all reports, the other ranks return None."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True, soft_wrap=True)  # one line per message in logs, however narrow the terminal

    def say(line: str) -> None:
        if ranks.is_main:
            err.print(line, highlight=False, markup=False)

    if job.json_report is not None:  # the path alone, before the model loads; the rest once it has
        check_report_path(job.json_report, "the JSON report")
    segmenter = build_segmenter(req, bundle, ranks)
    names = case_names(job.inputs)
    protected = frozenset(check_outputs(job, segmenter, names).taken)
    bundle, backend = segmenter.bundle, segmenter.backend
    say(f"dtml: {len(job.inputs)} scan(s){ranks.running(backend.describe())}")
    from dtml_deploy.backends.torch_backend import cpu_precision_note

    for note in (cpu_precision_note(backend.name, backend.device, backend.options.precision, req.precision is not None),
                 no_qc_note(bundle.meta) if req.qc else None):
        if note:
            say(note)
    guessed: list[bool] = []
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                  TimeElapsedColumn(), console=err, disable=not (job.progress and ranks.is_main),
                  transient=True) as bar:

        def work(i: int, beat: Beat) -> dict:
            path, name = job.inputs[i], names[i]
            task = bar.add_task(name, total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)
                beat()

            rep = segmenter.segment_file(path, job.output, job.overwrite, progress, protected, name)
            bar.remove_task(task)
            return rep.to_dict()

        def on_result(i: int, result: dict) -> None:
            rep = CaseReport(**result)
            if rep.geometry_guessed and not guessed:  # once per run: every h5 input gets the same guess
                guessed.append(True)
                say(guessed_geometry_note(rep.input, rep.geometry_guessed, bundle.model.spacing))
            for line in _case_line(rep, names[i], bundle.model.spacing):
                say(line)

        with sigterm_stops():  # a stopped run removes its temporaries; no half-written case stays behind
            outcome = run_cases([str(p) for p in job.inputs], lambda i: voxel_estimate(job.inputs[i]), work,
                                on_result, ranks, shard, "segment")
    if outcome is None:
        return None
    reports = [CaseReport(**r) if r is not None else
               CaseReport(input=str(p), status="failed", error=f"{p}: not segmented: {outcome.stopped}")
               for p, r in zip(job.inputs, outcome.results)]
    seconds = time.perf_counter() - t0
    if outcome.stopped:
        say(f"error: {outcome.stopped}; {sum(r is None for r in outcome.results)} case(s) not segmented "
            "(finished cases are written)")
    if ranks.distributed:
        ok = sum(r.status == "ok" for r in reports)
        say(f"dtml: {ok} of {len(reports)} scan(s) segmented on {ranks.world_size} ranks in {seconds:.1f} s "
            f"({len(reports) / max(seconds, 1e-9):.3f} scans/s)")
    if job.json_report is not None:
        report = {"backend": backend.describe(), "model": str(req.model), "bundle_hash": bundle.content_hash,
                  "engine": {"overlap": req.overlap, "stride": req.stride, "blend": req.blend, "head": req.head,
                             "batch": backend.options.batch, "lcc": req.lcc, "tta": req.tta},
                  "ranks": outcome.ranks, "total_seconds": round(seconds, 3),
                  "cases": [r.to_dict() for r in reports]}
        write_report_text(job.json_report, json.dumps(report, indent=2) + "\n", "the JSON report")
    return reports
