"""`dtml segment`: scans in, masks (and optional maps, previews, a JSON report) out."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dtml_deploy.cli.common import (
    ENGINE_OPTIONS,
    INPUT_OPTIONS,
    POST_OPTIONS,
    FormatName,
    ModelOpt,
    ProgressOpt,
    RankTimeoutOpt,
    default_of,
    echo_err,
    exit_for_failures,
    fail,
    load_predictor,
    predictor_settings,
    require_viz,
    setting,
    user_errors,
    with_shared,
)
from dtml_deploy.cli.dicomweb_inputs import (
    DicomWebOpt,
    SeriesOpt,
    StoreOpt,
    StudyOpt,
    check_dicomweb_options,
    scans_from,
    stored,
)
from dtml_deploy.ranks import ShardSettings

if TYPE_CHECKING:
    from dtml_deploy.predictor import Predictor
    from dtml_deploy.ranks import Ranks
    from dtml_deploy.segment import CaseReport


@dataclass(frozen=True)
class SegmentJob:
    """Which files `dtml segment` reads and where its results go."""

    inputs: list[Path]
    output: Path
    overwrite: bool = False
    json_report: Path | None = None
    progress: bool = True


def expand_inputs(inputs: list[str], note: Callable[[str], None] = echo_err) -> list[Path]:
    """Files as given; folders -> their scan files, UA-MT <ID>/mri_norm2.h5, challenge <ID>/lgemri.nrrd and
    DICOM series (io/formats.find_scans); globs expanded. What a folder holds besides its scans (non-image
    DICOM, dtml's own earlier outputs, stray entries of a challenge root) goes to `note`, one line each."""
    import glob

    from dtml_deploy.io.challenge import stray_notes
    from dtml_deploy.io.formats import find_scans

    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            skipped: list[str] = []
            scans = find_scans(p, skipped)
            for line in [*(f"note: {s}" for s in skipped), *stray_notes(p, scans)]:
                note(line)
            found.extend(scans)
        elif not p.exists() and any(c in item for c in "*?["):
            found.extend(Path(m) for m in sorted(glob.glob(item)))
        else:
            found.append(p)  # missing files are reported per case
    return found


InputsArg = Annotated[list[str] | None, typer.Argument(
    help="Scans: files (.nii, .nii.gz, .h5, .nrrd, .nhdr, .mha, .mhd), DICOM series folders, folders or globs")]


@with_shared
def segment(
    inputs: InputsArg = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder")] = Path("dtml-seg"),
    model: ModelOpt = None,
    engine: Any = ENGINE_OPTIONS,
    qc: Annotated[bool, typer.Option(help="Run both heads; report their agreement and the QC score")]
        = setting("qc"),
    post: Any = POST_OPTIONS,
    save_prob: Annotated[bool, typer.Option(help="Also write <case>_prob.nii.gz")] = setting("save_prob"),
    save_sdm: Annotated[bool, typer.Option(help="Also write <case>_sdm.nii.gz")] = setting("save_sdm"),
    save_uncertainty: Annotated[bool, typer.Option(help="Also write <case>_uncertainty.nii.gz")]
        = setting("save_uncertainty"),
    output_format: Annotated[FormatName, typer.Option("--format", help=(
        "Mask format: auto (the input's: NIfTI, NRRD, MHA; DICOM -> DICOM SEG + NIfTI), nii.gz, nrrd, mha, "
        "dicom-seg (DICOM input only)"))] = FormatName(setting("output_format")),
    preview: Annotated[bool, typer.Option(help="Also write <case>_preview.png: three slices with the mask outline "
                                                "and the heads' disagreement (needs dtml[viz])")]
        = setting("preview"),
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs")] = default_of(SegmentJob, "overwrite"),
    json_report: Annotated[Path | None, typer.Option("--json", help="Write a per-case JSON report")]
        = default_of(SegmentJob, "json_report"),
    compile: Annotated[bool, typer.Option(help="torch.compile the networks (torch backend)")] = setting("compile"),
    cuda_graphs: Annotated[bool | None, typer.Option(
        help="Replay CUDA graphs (torch backend; default on for CUDA)")] = setting("cuda_graphs"),
    cudnn_fusion: Annotated[bool | None, typer.Option(
        help="Fused cuDNN conv+ReLU (torch backend; default on for CUDA)")] = setting("cudnn_fusion"),
    progress: ProgressOpt = default_of(SegmentJob, "progress"),
    rank_timeout: RankTimeoutOpt = default_of(ShardSettings, "stall_timeout_s"),
    inputs_: Any = INPUT_OPTIONS,
    dicomweb: DicomWebOpt = None,
    study: StudyOpt = None,
    series: SeriesOpt = None,
    store: StoreOpt = False,
    **options: Any,
) -> None:
    """Segment scans with a bundle (fused sliding-window inference over both networks). Under torchrun the
    scans are shared among the ranks (one per GPU, or CPU processes); rank 0 writes the report."""
    from dtml_deploy.ranks import Ranks

    with user_errors():
        ranks, shard = Ranks.from_env(), ShardSettings(stall_timeout_s=rank_timeout)
        require_viz("--preview") if preview else None
        settings = predictor_settings(
            qc=qc, save_prob=save_prob, save_sdm=save_sdm, save_uncertainty=save_uncertainty,
            output_format=output_format, preview=preview, compile=compile, cuda_graphs=cuda_graphs,
            cudnn_fusion=cudnn_fusion, **options)
        check_dicomweb_options(dicomweb, inputs or [], study, series, store, settings.segment.output_format)
        job = SegmentJob(inputs=[], output=output, overwrite=overwrite, json_report=json_report, progress=progress)
        check_job(job)
        predictor = load_predictor(model, settings, ranks)
        with scans_from(inputs or [], expand_inputs, ranks.is_main, dicomweb, study, series) as scans:
            job = replace(job, inputs=scans)
            check_job(job, predictor)
            reports = stored(run_job(predictor, job, ranks, shard, options.get("precision") is not None, qc),
                             dicomweb if store else None, echo_err)
    if reports is None:  # another rank of a torchrun launch: rank 0 reports every case
        return
    if not reports:
        raise fail("no input scans found")
    exit_for_failures(sum(r.status != "ok" for r in reports), len(reports))


def check_job(job: SegmentJob, predictor: Predictor | None = None) -> None:
    """Refuse an unusable report path before the model loads; once it has (`predictor`), outputs that would
    collide (io/outputs.py) and a report path that is an input, a planned output or a file other than an
    earlier segment report (io/reports.py)."""
    from dtml_deploy.io.reports import SEGMENT_JSON, check_report_path, check_report_target

    if predictor is None:
        if job.json_report is not None:
            check_report_path(job.json_report, "the JSON report")
        return
    plan = predictor.plan(job.inputs, job.output)
    if job.json_report is not None:
        check_report_target(job.json_report, SEGMENT_JSON, plan.taken, job.overwrite)


def run_job(predictor: Predictor, job: SegmentJob, ranks: Ranks, shard: ShardSettings,
            precision_chosen: bool, qc: bool) -> list[CaseReport] | None:
    """Segment the job's inputs with the console's events; rank 0 prints the summary lines and writes the
    JSON report, and returns the reports (the other ranks None)."""
    from dtml_deploy.cli.console import ConsoleEvents, opening_lines
    from dtml_deploy.io.reports import write_report_text

    with ConsoleEvents(predictor, job.progress) as events:
        for line in opening_lines(predictor, f"dtml: {len(job.inputs)} scan(s)", precision_chosen, qc):
            events.say(line)
        reports = predictor.segment_files(job.inputs, job.output, job.overwrite, events, shard)
    if reports is None:
        return None
    if events.stopped:
        events.say(f"error: {events.stopped}; {events.unfinished} case(s) not segmented (finished cases are written)")
    if ranks.distributed:
        ok, n = sum(r.status == "ok" for r in reports), len(reports)
        events.say(f"dtml: {ok} of {n} scan(s) segmented on {ranks.world_size} ranks in {events.seconds:.1f} s "
                   f"({n / max(events.seconds, 1e-9):.3f} scans/s)")
    if job.json_report is not None:
        report = {**predictor.record(), "ranks": events.ranks, "total_seconds": round(events.seconds, 3),
                  "cases": [r.to_dict() for r in reports]}
        write_report_text(job.json_report, json.dumps(report, indent=2) + "\n", "the JSON report")
    return reports
