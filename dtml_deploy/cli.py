"""The `dtml` command line: thin Typer commands over keyword-only cores.

Heavy modules (torch, training, export) are imported inside the commands, so `dtml --help` and
`dtml segment` start without loading training code. The toolkit's own errors end in one line on
stderr and exit code 2 (1 when only some of several inputs failed).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from dtml_deploy.bundle import Bundle
    from dtml_deploy.protocol import Protocol

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="DTML: train, export, segment, evaluate and benchmark dual-task V-Nets.")

DEFAULT_MODEL = Path(__file__).parent / "default_model"


class RecipeName(str, Enum):
    dtml = "dtml"
    dtml_dis = "dtml-dis"
    dtml_dis_mask = "dtml-dis-mask"
    dtml_labeled_only = "dtml-labeled-only"
    seg_only = "seg-only"
    sdm_only = "sdm-only"
    full = "full"


class BackendName(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"
    trt = "trt"


class PrecisionName(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class HeadName(str, Enum):
    seg = "seg"
    sdm = "sdm"
    mean = "mean"


class BlendName(str, Enum):
    gaussian = "gaussian"
    constant = "constant"


class ProtocolName(str, Enum):
    dtml = "dtml"
    paper = "paper"


class IntensityName(str, Enum):
    auto = "auto"
    zscore = "zscore"
    none = "none"


class FormatName(str, Enum):
    auto = "auto"
    nii_gz = "nii.gz"
    nrrd = "nrrd"
    mha = "mha"
    dicom_seg = "dicom-seg"


class AmpName(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    none = "none"


class Supervision(str, Enum):
    mask = "mask"
    dis = "dis"
    dis_mask = "dis+mask"


class Schedule(str, Enum):
    code = "code"
    paper = "paper"


# Inference options shared by `segment`, `evaluate` and `benchmark` (one definition each).
ModelOpt = Annotated[Path | None, typer.Option(help="Bundle folder (default: the shipped model)")]
BackendOpt = Annotated[BackendName, typer.Option(help="Inference backend")]
ArtifactOpt = Annotated[Path | None, typer.Option(help="Prebuilt .onnx or .engine for --backend onnx/trt")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
PrecisionOpt = Annotated[PrecisionName | None,
                         typer.Option(help="fp32 | fp16 | bf16 (default: fp16 on CUDA, fp32 on CPU)")]
OverlapOpt = Annotated[float | None, typer.Option(help="Window overlap fraction (dtml protocol: 0.5)")]
StrideOpt = Annotated[tuple[int, int, int] | None, typer.Option(help="Fixed stride X Y Z (paper: 18 18 4)")]
BatchOpt = Annotated[int | None, typer.Option(
    help="Windows per forward (default: 8 on CUDA, the fastest measured on an H200; 4 on the CPU)")]
BlendOpt = Annotated[BlendName | None, typer.Option(
    help="Window blending (dtml protocol: gaussian; paper: constant)")]
HeadOpt = Annotated[HeadName | None, typer.Option(
    help="seg (paper) | sdm | mean of both (dtml protocol: mean, the most accurate measured)")]
LccOpt = Annotated[bool | None, typer.Option(help="Keep the largest connected component (both protocols: on)")]
TtaOpt = Annotated[bool | None, typer.Option(
    help="Mirror test-time augmentation over x and y (4 passes per window; dtml protocol: off)")]
ProtocolOpt = Annotated[ProtocolName, typer.Option(
    help="dtml: the toolkit's defaults; paper: stride 18 18 4, constant blending, fp32, --head seg, LCC. "
         "Explicit flags override dtml's values; under paper a contradicting flag is refused")]
ResampleOpt = Annotated[bool, typer.Option(help="Resample to the model's spacing and back")]
IntensityOpt = Annotated[IntensityName, typer.Option(
    help="auto: z-score unless the scan is already z-scored (as LA2018 files are); zscore; none")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars")]
SpacingOpt = Annotated[tuple[float, float, float] | None, typer.Option(
    help="Voxel size X Y Z in mm for every input, replacing the files' own (h5 files have none)")]
MaxWindowsOpt = Annotated[int | None, typer.Option(
    help="Allow more sliding windows per case than the default bound (dtml_deploy/limits.py: WorkLimits)")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the toolkit's errors (and bad option values) into one line and exit code 2."""
    from dtml_deploy.errors import DtmlError

    try:
        yield
    except (DtmlError, ValueError, FileExistsError) as e:
        raise _fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def _bundle_path(model: Path | None) -> Path:
    if model is not None:
        return model
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise _fail("no default model is installed with this copy of dtml; pass --model BUNDLE_DIR")
    return DEFAULT_MODEL


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Data root: LA2018 layout, UA-MT h5 layout, or images folder")],
    out: Annotated[Path, typer.Option(help="Run folder: bundle/, checkpoint/, train_log.jsonl")],
    recipe: Annotated[RecipeName, typer.Option(help="A row of the paper's tables")] = RecipeName.dtml,
    labels: Annotated[Path | None, typer.Option(help="Labels folder (generic image/label folder pair)")] = None,
    case_list: Annotated[Path | None, typer.Option(help="File listing case ids, one per line")] = None,
    labeled: Annotated[int | None, typer.Option(help="Number of labeled cases (16 or 8 in the paper)")] = None,
    unlabeled: Annotated[int | None, typer.Option(help="Number of unlabeled cases (default: all others)")] = None,
    val_cases: Annotated[int | None, typer.Option(help="Validation cases carved from the non-labeled list")] = None,
    iterations: Annotated[int | None, typer.Option(help="Training iterations (paper: 6000)")] = None,
    labeled_bs: Annotated[int | None, typer.Option(help="Labeled patches per batch")] = None,
    unlabeled_bs: Annotated[int | None, typer.Option(help="Unlabeled patches per batch")] = None,
    patch: Annotated[tuple[int, int, int] | None, typer.Option(help="Patch size X Y Z")] = None,
    n_filters: Annotated[int | None, typer.Option(help="V-Net width (paper: 16)")] = None,
    norm: Annotated[str | None, typer.Option(help="batch | instance | group | none")] = None,
    supervision: Annotated[Supervision | None, typer.Option(help="M_d supervision")] = None,
    k: Annotated[float | None, typer.Option(help="Sharpness of sigmoid(-k*sdm)")] = None,
    schedule: Annotated[Schedule | None, typer.Option(help="Consistency ramp-up: released code or paper text")] = None,
    lambda_max: Annotated[float | None, typer.Option(help="Consistency weight maximum")] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate")] = None,
    lr_step: Annotated[int | None, typer.Option(help="Iterations between learning-rate steps")] = None,
    lr_gamma: Annotated[float | None, typer.Option(help="Learning-rate factor at each step (code: 0.1)")] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum (code: 0.9)")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="SGD weight decay (code: 1e-4)")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout3d probability in training (code: 0.5)")] = None,
    rampup_period: Annotated[int | None, typer.Option(help="code schedule: iterations per ramp-up step (150)")] = None,
    rampup_length: Annotated[float | None, typer.Option(help="code schedule: ramp-up length in steps (40)")] = None,
    consistency: Annotated[bool | None, typer.Option(help="Use the cross-task consistency loss")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (code: 1337)")] = None,
    deterministic: Annotated[bool, typer.Option(help="Deterministic algorithms (slower on GPU)")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    amp: Annotated[AmpName, typer.Option(help="Mixed precision on CUDA")] = AmpName.auto,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers (-1: auto)")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint interval in iterations")] = None,
    val_every: Annotated[int | None, typer.Option(help="Validation interval in iterations")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a previous run in OUT (else refused)")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar")] = True,
    tensorboard: Annotated[bool, typer.Option(
        help="Also log every scalar to OUT/tensorboard (optional: only when the tensorboard package is "
             "installed, else skipped silently). OUT/training_curves.png is drawn at the end with dtml[viz]")]
        = True,
) -> None:
    """Train a DTML pair and write a bundle to OUT/bundle."""
    with _user_errors():
        from dataclasses import replace

        from dtml_deploy.io.datasets import make_split, open_source
        from training.divergence import TrainingDiverged
        from training.losses import ConsistencyConfig
        from training.recipes import recipe as make_recipe
        from training.run_visuals import run_visuals
        from training.trainer import Trainer

        cfg = make_recipe(
            recipe.value, labeled=labeled, unlabeled=unlabeled, val_cases=val_cases, iterations=iterations,
            labeled_bs=labeled_bs, unlabeled_bs=unlabeled_bs, patch=tuple(patch) if patch else None,
            n_filters=n_filters, norm=norm, supervision=supervision.value if supervision else None, k=k,
            lr=lr, lr_step=lr_step, lr_gamma=lr_gamma, momentum=momentum, weight_decay=weight_decay,
            dropout=dropout, consistency=consistency, seed=seed, deterministic=deterministic or None, device=device,
            amp=amp.value, workers=workers, checkpoint_every=checkpoint_every, val_every=val_every)
        if any(v is not None for v in (schedule, lambda_max, rampup_period, rampup_length)):
            cc = cfg.consistency_cfg
            cfg = replace(cfg, consistency_cfg=ConsistencyConfig(
                schedule=schedule.value if schedule else cc.schedule,
                lambda_max=lambda_max if lambda_max is not None else cc.lambda_max,
                rampup_period=rampup_period if rampup_period is not None else cc.rampup_period,
                rampup_length=rampup_length if rampup_length is not None else cc.rampup_length))
        source = open_source(data, labels_dir=labels, list_file=case_list)
        split = make_split(source, cfg.labeled, cfg.unlabeled, cfg.val_cases)
        with run_visuals(out, tensorboard, lambda m: typer.echo(m, err=True)):
            try:
                result = Trainer(cfg, split, out, resume=resume, overwrite=overwrite, show_progress=progress).run()
            except TrainingDiverged as e:  # the run itself failed, not its input: exit 1
                raise _fail(str(e), 1) from None
        s = result.summary
        if result.interrupted:
            typer.echo(f"interrupted at iteration {result.iterations}; checkpoint in {out / 'checkpoint'} "
                       f"(continue with --resume)", err=True)
            raise typer.Exit(130)
        typer.echo(f"trained {s['iterations']} iterations in {s['wall_seconds']:.1f} s "
                   f"({s['it_per_s']:.2f} it/s on {s['device']}); bundle: {result.bundle}")


def _load_for_backend(backend: str, model: Path, artifact: Path | None, precision: str | None,
                      device: str) -> tuple[Bundle, Path | None]:
    """Load the bundle once; for onnx without --artifact also find (or make) its cached, verified export
    in the precision the run will use (lazy import of export/)."""
    from dtml_deploy.bundle import Bundle
    from dtml_deploy.runner import default_precision

    bundle = Bundle.load(model)
    if backend != "onnx" or artifact is not None:
        return bundle, artifact
    from export.pipeline import cached_onnx

    precision = precision or default_precision(device)
    return bundle, cached_onnx(bundle, model, precision, lambda m: typer.echo(m, err=True))


@app.command("export")
def export_cmd(
    model: ModelOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the artifacts")] = Path("dtml-export"),
    precision: Annotated[list[PrecisionName] | None, typer.Option(
        help="ONNX precision(s) to export: fp32 and/or fp16 (repeat the option)")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 17,
    dynamic_spatial: Annotated[bool, typer.Option(help="Dynamic spatial axes (default: fixed to the patch)")] = False,
    verify: Annotated[bool, typer.Option(help="Check onnxruntime against PyTorch; fail beyond tolerance")] = True,
    real_case: Annotated[Path | None, typer.Option(help="A real scan whose central patch joins the check")] = None,
    trt: Annotated[bool, typer.Option("--trt", help="Also build a TensorRT engine (needs tensorrt and a GPU)")] = False,
    trt_precision: Annotated[PrecisionName, typer.Option(
        help="TensorRT engine precision (fp16 or fp32)")] = PrecisionName.fp16,
    min_batch: Annotated[int, typer.Option(help="TensorRT profile: smallest batch")] = 1,
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile: batch to optimise for")] = 4,
    max_batch: Annotated[int, typer.Option(help="TensorRT profile: largest batch")] = 8,
    workspace_gb: Annotated[float, typer.Option(help="TensorRT builder workspace limit (GB)")] = 4.0,
    timing_cache: Annotated[Path | None, typer.Option(
        help="TensorRT timing cache file, reused across builds")] = None,
) -> None:
    """Export a bundle to verified ONNX (fp32/fp16) and, with --trt, a TensorRT engine + sidecar."""
    with _user_errors():
        from export.pipeline import ExportRequest, run_export

        if trt_precision == PrecisionName.bf16:
            raise ValueError("--trt-precision must be fp16 or fp32")
        precisions = tuple(p.value for p in precision) if precision else ("fp32",)
        if "bf16" in precisions:
            raise ValueError("ONNX export supports fp32 and fp16")
        req = ExportRequest(bundle=_bundle_path(model), out_dir=output, precisions=precisions, opset=opset,
                            dynamic_spatial=dynamic_spatial, verify=verify, real_case=real_case, trt=trt,
                            trt_fp16=trt_precision == PrecisionName.fp16, min_batch=min_batch, opt_batch=opt_batch,
                            max_batch=max_batch, workspace_gb=workspace_gb, timing_cache=timing_cache)
        run_export(req, typer.echo)


def _expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders -> their scan files, UA-MT <ID>/mri_norm2.h5, challenge <ID>/lgemri.nrrd and
    DICOM series (io/formats.find_scans); globs expanded."""
    import glob

    from dtml_deploy.io.formats import find_scans

    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found.extend(find_scans(p))
        elif not p.exists() and any(c in item for c in "*?["):
            found.extend(Path(m) for m in sorted(glob.glob(item)))
        else:
            found.append(p)  # missing files are reported per case
    return found


def _protocol(protocol: ProtocolName, overlap: float | None, stride: tuple[int, int, int] | None,
              blend: BlendName | None, precision: PrecisionName | None, head: HeadName | None,
              lcc: bool | None, tta: bool | None) -> Protocol:
    """The protocol's settings with the flags the user gave (dtml_deploy/protocol.py has the rule)."""
    from dtml_deploy.protocol import resolve_protocol

    return resolve_protocol(protocol.value, overlap=overlap, stride=tuple(stride) if stride else None,
                            blend=blend.value if blend else None, precision=precision.value if precision else None,
                            head=head.value if head else None, lcc=lcc, tta=tta)


@app.command()
def segment(
    inputs: Annotated[list[str], typer.Argument(
        help="Scans: files (.nii, .nii.gz, .h5, .nrrd, .nhdr, .mha, .mhd), DICOM series folders, folders or globs")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder")] = Path("dtml-seg"),
    model: ModelOpt = None,
    backend: BackendOpt = BackendName.auto,
    artifact: ArtifactOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    protocol: ProtocolOpt = ProtocolName.dtml,
    overlap: OverlapOpt = None,
    stride: StrideOpt = None,
    batch: BatchOpt = None,
    blend: BlendOpt = None,
    head: HeadOpt = None,
    tta: TtaOpt = None,
    qc: Annotated[bool, typer.Option(help="Run both heads; report their agreement and the QC score")] = True,
    lcc: LccOpt = None,
    resample: ResampleOpt = True,
    intensity: IntensityOpt = IntensityName.auto,
    save_prob: Annotated[bool, typer.Option(help="Also write <case>_prob.nii.gz")] = False,
    save_sdm: Annotated[bool, typer.Option(help="Also write <case>_sdm.nii.gz")] = False,
    save_uncertainty: Annotated[bool, typer.Option(help="Also write <case>_uncertainty.nii.gz")] = False,
    output_format: Annotated[FormatName, typer.Option("--format", help=(
        "Mask format: auto (the input's: NIfTI, NRRD, MHA; DICOM -> DICOM SEG + NIfTI), nii.gz, nrrd, mha, "
        "dicom-seg (DICOM input only)"))] = FormatName.auto,
    preview: Annotated[bool, typer.Option(help="Also write <case>_preview.png: three slices with the mask outline "
                                                "and the heads' disagreement (needs dtml[viz])")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs")] = False,
    json_report: Annotated[Path | None, typer.Option("--json", help="Write a per-case JSON report")] = None,
    compile: Annotated[bool, typer.Option(help="torch.compile the networks (torch backend)")] = False,
    cuda_graphs: Annotated[bool | None, typer.Option(
        help="Replay CUDA graphs (torch backend; default on for CUDA)")] = None,
    cudnn_fusion: Annotated[bool | None, typer.Option(
        help="Fused cuDNN conv+ReLU (torch backend; default on for CUDA)")] = None,
    progress: ProgressOpt = True,
    spacing: SpacingOpt = None,
    max_windows: MaxWindowsOpt = None,
) -> None:
    """Segment scans with a bundle (fused sliding-window inference over both networks)."""
    with _user_errors():
        from dtml_deploy.protocol import request_fields
        from dtml_deploy.runner import SegmentRequest, run_segment

        if preview:
            from dtml_deploy.viz.figure import require_matplotlib

            require_matplotlib("--preview")
        model_path = _bundle_path(model)
        proto = _protocol(protocol, overlap, stride, blend, precision, head, lcc, tta)
        bundle, artifact = _load_for_backend(backend.value, model_path, artifact, proto.precision, device)
        req = SegmentRequest(
            inputs=_expand_inputs(inputs), output=output, model=model_path, backend=backend.value,
            artifact=artifact, device=device, **request_fields(proto), batch=batch,
            qc=qc, resample=resample, intensity=intensity.value, save_prob=save_prob,
            save_sdm=save_sdm,
            save_uncertainty=save_uncertainty, output_format=output_format.value, preview=preview,
            overwrite=overwrite, json_report=json_report, compile=compile, cuda_graphs=cuda_graphs,
            cudnn_fusion=cudnn_fusion, progress=progress, spacing=_spacing(spacing), max_windows=max_windows)
        reports = run_segment(req, bundle)
    failed = [r for r in reports if r.status != "ok"]
    if not reports:
        raise _fail("no input scans found")
    if failed:
        raise typer.Exit(1 if len(failed) < len(reports) else 2)


def _spacing(spacing: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
    """--spacing as given, or a one-line error for a size that is not finite and positive."""
    if spacing is None:
        return None
    from dtml_deploy.io.geometry import check_spacing

    return check_spacing(spacing, "--spacing", "option")


def _unique(ids: list[str], cases: str) -> list[str]:
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise ValueError(f"--cases {cases}: case {dupes[0]!r} is listed twice; each case is scored once")
    return ids


def _case_list(source: object, cases: str) -> list[str]:
    """A split name of splits.json, a file of ids, or comma-separated ids (each id once)."""
    splits = getattr(source, "splits", {})
    if cases in splits:
        return _unique(list(splits[cases]), cases)
    if Path(cases).is_file():
        from dtml_deploy.io.datasets import read_case_list

        return _unique(read_case_list(Path(cases)), cases)
    ids = _unique([c.strip() for c in cases.split(",") if c.strip()], cases)
    known = set(getattr(source, "case_ids", ()))
    unknown = [c for c in ids if c not in known]
    if unknown:
        raise ValueError(f"--cases: {unknown[0]!r} is neither a split of splits.json, a file, nor a case id")
    return ids


@app.command()
def evaluate(
    pred_dir: Annotated[Path | None, typer.Argument(help="Folder of predicted masks")] = None,
    gt_dir: Annotated[Path | None, typer.Argument(help="Folder of labels (same case names)")] = None,
    model: Annotated[Path | None, typer.Option(help="Segment with this bundle instead of reading masks")] = None,
    data: Annotated[Path | None, typer.Option(help="Data root for --model (LA2018, h5 or folder layout)")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels folder for a generic folder pair")] = None,
    cases: Annotated[str | None, typer.Option(help="Split name in splits.json, file of ids, or id,id,...")] = None,
    backend: BackendOpt = BackendName.auto,
    artifact: ArtifactOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = None,
    protocol: ProtocolOpt = ProtocolName.dtml,
    overlap: OverlapOpt = None,
    stride: StrideOpt = None,
    batch: BatchOpt = None,
    blend: BlendOpt = None,
    head: HeadOpt = None,
    tta: TtaOpt = None,
    lcc: LccOpt = None,
    resample: ResampleOpt = True,
    intensity: IntensityOpt = IntensityName.auto,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write per-case rows and summary as JSON")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write per-case rows as CSV")] = None,
    report: Annotated[Path | None, typer.Option(
        help="Write a self-contained HTML report: summary, sortable cases with previews, charts (needs dtml[viz])")]
        = None,
    progress: ProgressOpt = True,
    spacing: SpacingOpt = None,
    max_windows: MaxWindowsOpt = None,
    ignore_geometry: Annotated[bool, typer.Option(
        help="Score a prediction whose affine differs from its label's (the shapes must still match)")] = False,
) -> None:
    """Score masks (PRED_DIR GT_DIR), or segment and score with --model --data --cases."""
    with _user_errors():
        from dtml_deploy.evaluate import score_model
        from dtml_deploy.io.reports import check_report_path

        for path, what in ((json_out, "the JSON report"), (csv_out, "the CSV report")):
            if path is not None:
                check_report_path(path, what)
        thumbs = None
        if report is not None:
            from dtml_deploy.viz.figure import require_matplotlib
            from dtml_deploy.viz.report import Thumbnails, write_html_report

            require_matplotlib("--report")
            thumbs = Thumbnails()
        extra: dict[str, object] = {}
        if model is not None or data is not None:
            if data is None:
                raise ValueError("--model needs --data (and usually --cases)")
            from dtml_deploy.io.datasets import open_source
            from dtml_deploy.protocol import request_fields
            from dtml_deploy.runner import SegmentRequest, build_segmenter

            source = open_source(data, labels_dir=labels)
            ids = _case_list(source, cases) if cases else list(source.case_ids)
            model_path = _bundle_path(model)
            proto = _protocol(protocol, overlap, stride, blend, precision, head, lcc, tta)
            bundle, artifact = _load_for_backend(backend.value, model_path, artifact, proto.precision, device)
            req = SegmentRequest(inputs=[], output=Path("."), model=model_path, backend=backend.value,
                                 artifact=artifact, device=device, **request_fields(proto), batch=batch,
                                 qc=True, resample=resample, intensity=intensity.value, spacing=_spacing(spacing),
                                 max_windows=max_windows, save_uncertainty=report is not None)
            segmenter = build_segmenter(req, bundle)
            typer.echo(f"segmenting {len(ids)} cases with {segmenter.backend.describe()}", err=True)
            done = []
            rows = score_model(segmenter, [source.labeled(i) for i in ids],
                               (lambda c: done.append(c) or typer.echo(f"  {len(done)}/{len(ids)} {c}", err=True))
                               if progress else None, ignore_geometry=ignore_geometry, visit=thumbs)
            _warn_guessed(rows, segmenter.bundle.model.spacing)
            extra = {"model": str(req.model), "bundle_hash": segmenter.bundle.content_hash,
                     "backend": segmenter.backend.describe(), "cases_from": cases,
                     "engine": {"protocol": proto.name, "overlap": proto.overlap, "stride": proto.stride,
                                "blend": proto.blend, "head": proto.head, "tta": proto.tta, "lcc": proto.lcc,
                                "precision": segmenter.backend.options.precision}}
        elif pred_dir is not None and gt_dir is not None:
            rows, extra = _score_folder_pair(pred_dir, gt_dir, ignore_geometry, _spacing(spacing), thumbs)
        else:
            raise ValueError("give PRED_DIR GT_DIR, or --model BUNDLE --data DIR [--cases LIST]")
        n_failed, summary = _print_and_write(rows, json_out, csv_out, extra)
        if report is not None:
            scored = [r for r in rows if r.get("status", "ok") == "ok"]
            write_html_report(report, scored, summary, {"predictions": f"masks in {pred_dir}", **extra}, thumbs.png)
    if n_failed:
        raise typer.Exit(1 if n_failed < len(rows) else 2)


def _score_folder_pair(pred_dir: Path, gt_dir: Path, ignore_geometry: bool, spacing: tuple[float, float, float] | None,
                       visit: Callable[..., None] | None) -> tuple[list[dict], dict[str, object]]:
    """Rows for PRED_DIR GT_DIR, with a warning when labelled cases have no prediction."""
    from dtml_deploy.evaluate import score_folders

    rows, unscored = score_folders(pred_dir, gt_dir, ignore_geometry, spacing, visit)
    _warn_guessed(rows, (1.0, 1.0, 1.0))  # read_volume's default: distances in mm are voxels
    if unscored and any(r["status"] == "ok" for r in rows):  # a smaller set would flatter the mean: say so
        typer.echo(f"warning: {len(unscored)} labelled case(s) have no prediction and are not scored: "
                   f"{', '.join(unscored[:5])}{' ...' if len(unscored) > 5 else ''}", err=True)
    return rows, ({"unscored_labels": unscored} if unscored else {})


def _print_and_write(rows: list[dict], json_out: Path | None, csv_out: Path | None,
                     extra: dict[str, object]) -> tuple[int, dict]:
    """One `error:` line per failed case, the table of the scored ones, the reports; returns the number of
    failures and the summary."""
    from dtml_deploy.evaluate import format_table, summarise_rows, write_reports

    summary = summarise_rows(rows)
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        typer.echo(f"error: {r['error']}", err=True)
    if len(failed) < len(rows):
        typer.echo(format_table(rows, summary))
    write_reports(rows, summary, json_out, csv_out, extra)
    return len(failed), summary


def _warn_guessed(rows: list[dict], model_spacing: tuple[float, float, float]) -> None:
    """Once per run: the geometry that h5 cases lack and that was assumed."""
    from dtml_deploy.io.geometry import guessed_geometry_note

    for r in rows:
        if r.get("geometry_guessed"):
            typer.echo(guessed_geometry_note(r["case"], r["geometry_guessed"].split(","), model_spacing), err=True)
            return


def _batch_values(values: list[str] | None) -> tuple[int, ...]:
    """`--batch 1 --batch 2` and `--batch 1,2` alike."""
    out = []
    for item in values or []:
        for part in item.split(","):
            if not part.strip().isdigit():
                raise ValueError(f"--batch takes whole numbers (repeat it or comma-separate), got {part!r}")
            out.append(int(part))
    return tuple(out)


@app.command()
def benchmark(
    model: ModelOpt = None,
    data: Annotated[list[Path] | None, typer.Option(
        help="Real scan(s) to time; the first also measures agreement (repeat the option; default: a random "
             "144x128x88 volume, agreement not measured)")] = None,
    device: DeviceOpt = "auto",
    batch: Annotated[list[str] | None, typer.Option(
        help="Batch sizes to time, repeated or comma-separated (default: 1,2,4 on CPU, 1,8,16 on CUDA; "
             "1 is always timed)")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per batch size (the median is reported)")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write machine, request and rows as JSON")] = None,
    min_dice: Annotated[float | None, typer.Option(
        help="Exit 1 when a row's agreement with torch fp32 is below this (CI; needs --data). "
             "Without it, rows below 0.99 are marked but the exit code is 0")] = None,
    formats: Annotated[str | None, typer.Option(
        help="Comma-separated rows to run (default: all that exist here; torch-compiled only on CUDA): "
             "torch-fp32, torch-bf16, torch-fp16, torch-fp16-graphs, torch-compiled, onnx-fp32, onnx-fp16, "
             "trt-fp16")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Folder for exported artifacts (default: a temporary folder, removed)")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Also draw the table as a chart (ms per window, Mvox/s) into this PNG (needs dtml[viz])")] = None,
    progress: ProgressOpt = True,
) -> None:
    """Time every backend and precision side by side, with each one's agreement with torch fp32."""
    with _user_errors():
        from export import benchmark as bench
        from export.benchmark import BenchmarkRequest, below_min_dice, format_report, run_benchmark, write_json

        if json_out is not None and json_out.is_dir():
            raise ValueError(f"--json {json_out}: is a folder; give a file name")
        if plot is not None:
            from dtml_deploy.viz.figure import require_matplotlib

            require_matplotlib("--plot")
        req = BenchmarkRequest(
            bundle=_bundle_path(model), data=tuple(data or ()), device=device, batches=_batch_values(batch),
            repeats=repeats, warmup=warmup, min_dice=min_dice, formats=bench.parse_formats(formats), workdir=output)
        report = run_benchmark(req, (lambda m: typer.echo(m, err=True)) if progress else (lambda _: None))
        typer.echo(format_report(report))
        if bench.nothing_timed(report):  # a benchmark that timed nothing is a failure, not a report
            raise _fail(str(bench.nothing_timed(report)), 1)
        if json_out is not None:
            write_json(report, json_out)
        if plot is not None:
            from dtml_deploy.viz.bench_plot import write_benchmark_plot

            write_benchmark_plot(report.to_dict(), plot)
    if min_dice is not None:
        low = below_min_dice(report, min_dice)
        if low:
            raise _fail(f"agreement with torch fp32 below --min-dice {min_dice}: {', '.join(low)}", 1)


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A `dtml train` run folder (holds train_log.jsonl)")],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="PNG to write (default: RUN_DIR/training_curves.png)")] = None,
) -> None:
    """Redraw a run's training curves from its log, also while it is still training (needs dtml[viz])."""
    with _user_errors():
        from dtml_deploy.viz.figure import require_matplotlib
        from training.run_visuals import draw_curves

        require_matplotlib("dtml plot")
        typer.echo(str(draw_curves(run_dir, output)))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
