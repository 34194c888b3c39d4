"""`dtml segment`: scans in, masks (and optional maps, previews, a JSON report) out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dtml_deploy.cli.common import (
    ENGINE_OPTIONS,
    INPUT_OPTIONS,
    POST_OPTIONS,
    FormatName,
    ModelOpt,
    ProgressOpt,
    RankTimeoutOpt,
    bundle_path,
    default_of,
    echo_err,
    exit_for_failures,
    fail,
    inference_settings,
    load_for_backend,
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
from dtml_deploy.runner import SegmentJob


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
    from dtml_deploy.runner import run_segment

    with user_errors():
        ranks, shard = Ranks.from_env(), ShardSettings(stall_timeout_s=rank_timeout)
        if preview:
            require_viz("--preview")
        model_path = bundle_path(model)
        settings, _ = inference_settings(
            model_path, qc=qc, save_prob=save_prob, save_sdm=save_sdm, save_uncertainty=save_uncertainty,
            output_format=output_format, preview=preview, compile=compile, cuda_graphs=cuda_graphs,
            cudnn_fusion=cudnn_fusion, **options)
        check_dicomweb_options(dicomweb, inputs or [], study, series, store, settings.output_format)
        bundle, settings = load_for_backend(settings)
        with scans_from(inputs or [], expand_inputs, ranks.is_main, dicomweb, study, series) as scans:
            job = SegmentJob(inputs=scans, output=output, overwrite=overwrite, json_report=json_report,
                             progress=progress)
            reports = stored(run_segment(job, settings, bundle, ranks, shard), dicomweb if store else None, echo_err)
    if reports is None:  # another rank of a torchrun launch: rank 0 reports every case
        return
    if not reports:
        raise fail("no input scans found")
    exit_for_failures(sum(r.status != "ok" for r in reports), len(reports))
