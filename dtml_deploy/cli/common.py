"""What the commands share: choices built from the core's tuples, shared options, error handling.

Every choice and default here is read from the core (tuples and dataclass fields), never restated, so an
option cannot drift from what the code it drives does.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dtml_deploy.backends.base import BACKENDS, DEVICE_CHOICES, PRECISIONS
from dtml_deploy.engine.blending import BLENDS
from dtml_deploy.engine.sliding import HEADS
from dtml_deploy.intensity import POLICIES
from dtml_deploy.io.formats import OUTPUT_FORMATS
from dtml_deploy.predictor import DEFAULT_MODEL
from dtml_deploy.protocol import DTML, PROTOCOLS
from dtml_deploy.settings import ROUTES, PredictorSettings

if TYPE_CHECKING:
    from dtml_deploy.predictor import Predictor
    from dtml_deploy.ranks import Ranks

# The CLI's names for settings whose flag reads better than the field (`--save-prob` keeps the prob map).
FLAG_NAMES = {"save_prob": "keep_prob", "save_sdm": "keep_sdm", "save_uncertainty": "keep_uncertainty"}


def choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum whose values are `values` (member names made identifiers: `nii.gz` -> `nii_gz`)."""
    members = [("".join(c if c.isalnum() else "_" for c in v), v) for v in values]
    return Enum(name, members, type=str, module=__name__)  # type: ignore[return-value]


def default_of(cls: type, name: str) -> Any:
    """The default of dataclass `cls`'s field `name` (its factory's value for a factory field)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


RankTimeoutOpt = Annotated[float, typer.Option(
    help="Under torchrun: seconds a rank may show no progress (no finished window) before the job stops")]
BackendName = choices("BackendName", BACKENDS)
PrecisionName = choices("PrecisionName", PRECISIONS)
HeadName = choices("HeadName", HEADS)
BlendName = choices("BlendName", BLENDS)
IntensityName = choices("IntensityName", POLICIES)
FormatName = choices("FormatName", OUTPUT_FORMATS)
ProtocolName = choices("ProtocolName", tuple(PROTOCOLS))


def value(choice: Enum | None) -> Any:
    """An enum option's value (None stays None)."""
    return None if choice is None else choice.value


# Inference options shared by `segment`, `evaluate` and `benchmark` (one definition each).
ModelOpt = Annotated[Path | None, typer.Option(help="Bundle folder (default: the shipped model)")]
BackendOpt = Annotated[BackendName, typer.Option(help="Inference backend")]
ArtifactOpt = Annotated[Path | None, typer.Option(
    help="Prebuilt .onnx, .engine or .xml for --backend onnx/trt/openvino, or a `dtml export` folder (the fastest "
         "measured artifact there that runs here is used)")]
DeviceOpt = Annotated[str, typer.Option(help=DEVICE_CHOICES.replace(", ", " | "))]
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


def setting(name: str) -> Any:
    """The core default of an inference option: the field of that name in the settings tree's part that owns it."""
    name = FLAG_NAMES.get(name, name)
    if name not in ROUTES:
        return default_of(PredictorSettings, name)
    node: Any = PredictorSettings()
    for part in ROUTES[name]:
        node = getattr(node, part)
    return getattr(node, name)


def _shared(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# The inference options `segment` and `evaluate` share, each defined once with its core default. The
# settings a protocol fixes (dtml_deploy/protocol.py) default to None: "the protocol's value".
SHARED_OPTIONS: dict[str, inspect.Parameter] = {p.name: p for p in (
    _shared("backend", BackendOpt, BackendName(PredictorSettings.backend)),
    _shared("artifact", ArtifactOpt, setting("artifact")),
    _shared("device", DeviceOpt, setting("device")),
    _shared("precision", PrecisionOpt, None),
    _shared("protocol", ProtocolOpt, ProtocolName(DTML.name)),
    _shared("overlap", OverlapOpt, None),
    _shared("stride", StrideOpt, None),
    _shared("batch", BatchOpt, setting("batch")),
    _shared("blend", BlendOpt, None),
    _shared("head", HeadOpt, None),
    _shared("tta", TtaOpt, None),
    _shared("lcc", LccOpt, None),
    _shared("resample", ResampleOpt, setting("resample")),
    _shared("intensity", IntensityOpt, IntensityName(setting("intensity"))),
    _shared("spacing", SpacingOpt, setting("spacing")),
    _shared("max_windows", MaxWindowsOpt, setting("max_windows")),
)}


class Shared:
    """A run of SHARED_OPTIONS, as the default of a placeholder parameter of a command (see `with_shared`)."""

    def __init__(self, *names: str) -> None:
        self.names = names


ENGINE_OPTIONS = Shared("backend", "artifact", "device", "precision", "protocol", "overlap", "stride", "batch", "blend",
                        "head", "tta")
POST_OPTIONS = Shared("lcc", "resample", "intensity")
INPUT_OPTIONS = Shared("spacing", "max_windows")


def with_shared(command: Callable[..., None]) -> Callable[..., None]:
    """Replace each placeholder parameter whose default is a `Shared` run by those options; the command
    receives them in its **options."""
    params = []
    for p in inspect.signature(command, eval_str=True).parameters.values():
        if isinstance(p.default, Shared):
            params.extend(SHARED_OPTIONS[n] for n in p.default.names)
        elif p.kind is not inspect.Parameter.VAR_KEYWORD:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one `error:` line; the caller raises the returned Exit."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the toolkit's errors (and bad option values) into one line and exit code 2."""
    from dtml_deploy.errors import DtmlError, first_line
    from dtml_deploy.ranks import JobStopped

    try:
        yield
    except (DtmlError, ValueError, FileExistsError) as e:
        raise fail(first_line(e, limit=10_000)) from None
    except JobStopped as e:  # a rank of a torchrun launch (or a plain run) told to stop: finished cases are written
        from dtml_deploy.ranks import Ranks

        why = "torchrun ended the job; see its report" if Ranks.from_env().distributed else "finished cases are written"
        raise fail(f"stopped by {e} ({why})", 143) from None


def bundle_path(model: Path | None) -> Path:
    """--model, or the shipped model (refused in one line when this copy has none)."""
    if model is not None:
        return model
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise fail("no default model is installed with this copy of dtml; pass --model BUNDLE_DIR")
    return DEFAULT_MODEL


def echo_err(message: str) -> None:
    typer.echo(message, err=True)


def checked_spacing(spacing: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
    """--spacing as given, or a one-line error for a size that is not finite and positive."""
    if spacing is None:
        return None
    from dtml_deploy.io.geometry import check_spacing

    return check_spacing(spacing, "--spacing", "option")


def require_viz(option: str) -> None:
    """Refuse an option that draws when matplotlib is missing, before any work."""
    from dtml_deploy.viz.figure import require_matplotlib

    require_matplotlib(option)


def progress_echo(progress: bool) -> Callable[[str], None]:
    """Progress lines on stderr, or nothing."""
    return echo_err if progress else (lambda _: None)


def predictor_settings(**options: Any) -> PredictorSettings:
    """The settings tree from command options: enum choices become their values, flag names their fields,
    the protocol is resolved with the flags given (dtml_deploy/protocol.py), --spacing is checked."""
    given = {FLAG_NAMES.get(k, k): value(v) if isinstance(v, Enum) else v for k, v in options.items()}
    given["spacing"] = checked_spacing(given.get("spacing"))
    return PredictorSettings.build(**given)


def load_predictor(model: Path | None, settings: PredictorSettings, ranks: Ranks) -> Predictor:
    """The Predictor of a command: --model (or the shipped model), settings resolved once; an ONNX run
    without --artifact finds (or makes, once) its cached, verified graph (export/, which the CLI may import)."""
    from dtml_deploy.predictor import Predictor
    from dtml_export.pipeline import cached_onnx

    def exporter(bundle: Any, folder: Path, precision: str) -> Path:
        return cached_onnx(bundle, folder, precision, echo_err if ranks.is_main else (lambda _: None))

    return Predictor.load(bundle_path(model), settings, ranks=ranks, exporter=exporter)


def exit_for_failures(n_failed: int, n_total: int) -> None:
    """Exit 1 when some of several cases failed, 2 when all did; return when none did."""
    if n_failed:
        raise typer.Exit(1 if n_failed < n_total else 2)
