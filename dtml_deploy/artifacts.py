"""Exported artifacts: the table of formats, the ONNX metadata schema and the TensorRT sidecar.

Both the exporter (`export/`) and the runtime backends read this module, so it lives in `dtml_deploy`
(which never imports `export/`). An artifact describes itself:

* ONNX files carry `dtml.*` entries in `metadata_props` (see `onnx_metadata`);
* an OpenVINO IR carries the same entries in its runtime info (`rt_info["dtml"][key]`, key without
  the `dtml.` prefix; see `openvino_metadata`);
* a TensorRT engine has a JSON sidecar beside it (`<name>.engine.json`, see `TrtSidecar`), because an
  engine is only valid for the TensorRT version and the GPU model that built it.

The bundle's `content_hash` travels in both, so an artifact made from other weights is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dtml_deploy.bundle import Bundle
from dtml_deploy.config import ModelConfig
from dtml_deploy.errors import BackendUnavailable, BundleError, first_line
from dtml_deploy.version import __version__

ONNX_INPUT = "image"
# Every exported graph has these outputs, in this order (all float32, [B, 1, D, H, W]).
ONNX_OUTPUTS: tuple[str, ...] = ("p_seg", "p_dis", "sdm", "prob")
# The documented head combination baked into the `prob` output.
PROB_COMBINATION = "prob = (p_seg + p_dis) / 2"

ONNX_FORMAT = "dtml-onnx"
TRT_FORMAT = "dtml-trt-engine"
OPENVINO_FORMAT = "dtml-openvino"
ARTIFACT_FORMAT_VERSION = 1
# The commands that make each artifact, as error messages quote them.
EXPORT_ONNX = "dtml export --model BUNDLE"
EXPORT_TRT = f"{EXPORT_ONNX} --trt"
EXPORT_OPENVINO = f"{EXPORT_ONNX} --openvino"
EXPORT_INT8 = f"{EXPORT_OPENVINO} --int8 --calibration SCANS"
_PREFIX = "dtml."


@dataclass(frozen=True)
class ArtifactFormat:
    """One kind of exported model: how it is named, what builds it, what runs it."""

    name: str  # onnx | trt | openvino
    suffix: str  # file suffix of the artifact
    backend: str  # the backend (see dtml_deploy.backends) that runs it
    build_packages: tuple[str, ...]  # import names needed to produce it
    run_packages: tuple[str, ...]  # import names needed to run it
    precisions: tuple[str, ...]  # precision variants that can be produced
    needs_gpu: bool  # building and running need a CUDA device
    extra: str = ""  # pip extra that installs the run packages
    title: str = ""  # the runtime's name in tables (`dtml benchmark` rows)
    benchmarked: tuple[str, ...] = ()  # the precisions `dtml benchmark` times (export/bench_rows.py)

    def filename(self, precision: str) -> str:
        """Default file name inside an export folder, e.g. `model-fp32.onnx`."""
        if precision not in self.precisions:
            raise ValueError(f"{self.name} artifacts come in {self.precisions}, not {precision!r}")
        return f"model-{precision}{self.suffix}"


# The one table the exporter, the backends, the CLI and the benchmark read.
FORMATS: dict[str, ArtifactFormat] = {
    "onnx": ArtifactFormat("onnx", ".onnx", "onnx", ("torch", "onnx"), ("onnxruntime",),
                           ("fp32", "fp16"), needs_gpu=False, extra="onnx", title="onnxruntime",
                           benchmarked=("fp32", "fp16")),
    "trt": ArtifactFormat("trt", ".engine", "trt", ("tensorrt", "onnx"), ("tensorrt", "torch"),
                          ("fp32", "fp16"), needs_gpu=True, extra="trt", title="TensorRT", benchmarked=("fp16",)),
    "openvino": ArtifactFormat("openvino", ".xml", "openvino", ("torch", "onnx", "onnxruntime", "openvino", "nncf"),
                               ("openvino",), ("fp32", "int8"), needs_gpu=False, extra="openvino", title="OpenVINO",
                               benchmarked=("fp32", "int8")),
}
# What makes each format (quoted by error messages).
EXPORT_COMMANDS = {"onnx": EXPORT_ONNX, "trt": EXPORT_TRT, "openvino": EXPORT_OPENVINO}


def artifact_format(name: str) -> ArtifactFormat:
    """Look up a format by name (`onnx`, `trt`, `openvino`)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown export format {name!r}; choose from {sorted(FORMATS)}") from None


def format_for_path(path: Path) -> ArtifactFormat:
    """The format of an artifact file, from its suffix."""
    for fmt in FORMATS.values():
        if Path(path).name.endswith(fmt.suffix):
            return fmt
    raise ValueError(f"{path}: not a known artifact (suffixes: {[f.suffix for f in FORMATS.values()]})")


# ---------------------------------------------------------------------------------------------- ONNX


@dataclass(frozen=True)
class ArtifactInfo:
    """What an ONNX artifact says about itself (parsed from its `dtml.*` metadata)."""

    bundle_hash: str
    model: ModelConfig
    precision: str
    outputs: tuple[str, ...]
    dynamic_spatial: bool
    opset: int
    dtml_version: str
    prob: str = PROB_COMBINATION

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.model.patch_size

    @property
    def k(self) -> float:
        return self.model.k


def onnx_metadata(bundle: Bundle, *, precision: str, dynamic_spatial: bool, opset: int,
                  outputs: tuple[str, ...] = ONNX_OUTPUTS, fmt: str = ONNX_FORMAT) -> dict[str, str]:
    """The `dtml.*` key/value strings an exported ONNX file carries (`fmt`: whose format tag)."""
    m = bundle.model
    values: dict[str, Any] = {
        "format": fmt,
        "format_version": ARTIFACT_FORMAT_VERSION,
        "bundle_hash": bundle.content_hash,
        "patch_size": list(m.patch_size),
        "k": m.k,
        "intensity": asdict(m.intensity),
        "spacing": list(m.spacing),
        "model_config": m.to_dict(),
        "version": __version__,
        "precision": precision,
        "outputs": list(outputs),
        "input": ONNX_INPUT,
        "dynamic_spatial": dynamic_spatial,
        "opset": opset,
        "prob": PROB_COMBINATION,
    }
    return {_PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()}


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """All `metadata_props` of an ONNX file (needs `onnx`, else falls back to onnxruntime)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such ONNX file")
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf raises its own DecodeError
            raise BundleError(f"{path}: not a readable ONNX file ({first_line(e)})") from None
        return {p.key: p.value for p in model.metadata_props}
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("reading ONNX metadata needs onnx or onnxruntime; "
                                 "pip install 'dtml[onnx]'") from None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BundleError(f"{path}: not a loadable ONNX file ({first_line(e)})") from None
    return dict(session.get_modelmeta().custom_metadata_map)


def openvino_metadata(bundle: Bundle, *, precision: str, opset: int) -> dict[str, str]:
    """The entries an OpenVINO IR carries under `rt_info["dtml"]`: the ONNX ones, keys unprefixed."""
    meta = onnx_metadata(bundle, precision=precision, dynamic_spatial=False, opset=opset, fmt=OPENVINO_FORMAT)
    return {k[len(_PREFIX):]: v for k, v in meta.items()}


def parse_openvino_metadata(entries: Mapping[str, str], source: str) -> ArtifactInfo:
    """Validate the `rt_info["dtml"]` entries of an IR (as `parse_onnx_metadata` does an ONNX file's)."""
    return parse_onnx_metadata({_PREFIX + k: v for k, v in entries.items()}, source, fmt="openvino")


def parse_onnx_metadata(meta: Mapping[str, str], source: str = "ONNX file", fmt: str = "onnx") -> ArtifactInfo:
    """Validate the `dtml.*` entries; an artifact not made by `dtml export` is a `BundleError`."""
    tag = OPENVINO_FORMAT if fmt == "openvino" else ONNX_FORMAT
    rebuild = EXPORT_COMMANDS[fmt]
    if meta.get(_PREFIX + "format") != tag:
        raise BundleError(f"{source}: not exported by dtml (no dtml metadata); "
                          f"make one with `{rebuild}`")
    try:
        version = int(json.loads(meta[_PREFIX + "format_version"]))
        if version > ARTIFACT_FORMAT_VERSION:
            raise BundleError(f"{source}: artifact format {version} is newer than this dtml "
                              f"understands ({ARTIFACT_FORMAT_VERSION}); upgrade dtml")
        return ArtifactInfo(
            bundle_hash=meta[_PREFIX + "bundle_hash"],
            model=ModelConfig.from_dict(json.loads(meta[_PREFIX + "model_config"])),
            precision=meta[_PREFIX + "precision"],
            outputs=tuple(json.loads(meta[_PREFIX + "outputs"])),
            dynamic_spatial=bool(json.loads(meta[_PREFIX + "dynamic_spatial"])),
            opset=int(json.loads(meta[_PREFIX + "opset"])),
            dtml_version=meta[_PREFIX + "version"],
            prob=meta.get(_PREFIX + "prob", PROB_COMBINATION),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{source}: damaged dtml metadata ({type(e).__name__}: {e}); "
                          f"re-export with `{rebuild}`") from None


def check_bundle_hash(artifact_hash: str, bundle: Bundle, source: str, rebuild: str) -> None:
    """Refuse an artifact made from other weights; `rebuild` is the command that makes a fresh one."""
    if artifact_hash != bundle.content_hash:
        raise BundleError(f"{source} was exported from bundle {artifact_hash}, but the bundle given is "
                          f"{bundle.content_hash}; re-export it with `{rebuild}`")


# ------------------------------------------------------------------------------------------ TensorRT


@dataclass(frozen=True)
class TrtProfile:
    """The optimisation profile over the batch axis of input `image`."""

    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")


@dataclass(frozen=True)
class TrtSidecar:
    """The JSON written next to a TensorRT engine; an engine runs only where all of it still holds."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    bundle_hash: str
    precision: str  # fp32 | fp16
    typing: str  # strong | weak (TensorRT 10 BuilderFlag.FP16)
    profile: TrtProfile
    patch_size: tuple[int, int, int]
    outputs: tuple[str, ...]
    engine_sha256: str
    dtml_version: str = __version__
    source_onnx: str = ""
    build_seconds: float = 0.0
    format: str = TRT_FORMAT
    format_version: int = ARTIFACT_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrtSidecar:
        version = d.get("format_version", ARTIFACT_FORMAT_VERSION)
        if isinstance(version, int) and version > ARTIFACT_FORMAT_VERSION:
            raise BundleError(f"TensorRT sidecar format {version} is newer than this dtml understands "
                              f"({ARTIFACT_FORMAT_VERSION}); upgrade dtml or rebuild with "
                              f"`{EXPORT_TRT}`")
        try:
            if d.get("format") != TRT_FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, not {TRT_FORMAT!r}")
            return cls(
                tensorrt_version=str(d["tensorrt_version"]),
                gpu_name=str(d["gpu_name"]),
                compute_capability=(int(d["compute_capability"][0]), int(d["compute_capability"][1])),
                bundle_hash=str(d["bundle_hash"]),
                precision=str(d["precision"]),
                typing=str(d.get("typing", "strong")),
                profile=TrtProfile(**d["profile"]),
                patch_size=tuple(int(p) for p in d["patch_size"]),  # type: ignore[arg-type]
                outputs=tuple(str(o) for o in d["outputs"]),
                engine_sha256=str(d["engine_sha256"]),
                dtml_version=str(d.get("dtml_version", "")),
                source_onnx=str(d.get("source_onnx", "")),
                build_seconds=float(d.get("build_seconds", 0.0)),
                format_version=int(d.get("format_version", ARTIFACT_FORMAT_VERSION)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise BundleError(f"TensorRT sidecar is damaged ({type(e).__name__}: {e}); "
                              f"rebuild with `{EXPORT_TRT}`") from None


def sidecar_path(engine_path: Path) -> Path:
    """`model-fp16.engine` -> `model-fp16.engine.json`."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_sidecar(engine_path: Path) -> TrtSidecar:
    """Load the sidecar of an engine; a missing or unreadable one is a `BundleError`."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise BundleError(f"{path}: the engine's sidecar is missing, so it cannot be checked; "
                          f"rebuild with `{EXPORT_TRT}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e}); rebuild with `{EXPORT_TRT}`") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a dtml sidecar; rebuild with `{EXPORT_TRT}`")
    return TrtSidecar.from_dict(data)


def check_trt_sidecar(sidecar: TrtSidecar | Mapping[str, Any], *, bundle_hash: str, tensorrt_version: str,
                      gpu_name: str, compute_capability: tuple[int, int]) -> None:
    """Refuse an engine built for other weights (`BundleError`), another TensorRT or another GPU
    (`BackendUnavailable`); every message says how to rebuild."""
    sc = sidecar if isinstance(sidecar, TrtSidecar) else TrtSidecar.from_dict(sidecar)
    rebuild = f"rebuild it here with `{EXPORT_TRT}`"
    if sc.bundle_hash != bundle_hash:
        raise BundleError(f"TensorRT engine was built from bundle {sc.bundle_hash}, but the bundle given is "
                          f"{bundle_hash}; {rebuild}")
    if sc.tensorrt_version != tensorrt_version:
        raise BackendUnavailable(f"TensorRT engine was built with TensorRT {sc.tensorrt_version}, this is "
                                 f"{tensorrt_version} (engines are not portable across versions); {rebuild}")
    cc = (int(compute_capability[0]), int(compute_capability[1]))
    if tuple(sc.compute_capability) != cc or sc.gpu_name != gpu_name:
        raise BackendUnavailable(
            f"TensorRT engine was built for {sc.gpu_name} (sm_{sc.compute_capability[0]}{sc.compute_capability[1]}), "
            f"this GPU is {gpu_name} (sm_{cc[0]}{cc[1]}); {rebuild}")


def require_artifact(artifact: Path | None, fmt: str) -> Path:
    """The artifact a runtime backend was given, checked to exist and to be of its format."""
    f = FORMATS[fmt]
    export = EXPORT_COMMANDS[fmt]
    other = "; ".join(f"{o.suffix} files run with --backend {o.backend}" for o in FORMATS.values() if o.name != fmt)
    if artifact is None:
        raise BackendUnavailable(f"the {fmt} backend runs an exported model: run `{export}` first "
                                 f"or pass --artifact MODEL{f.suffix}")
    artifact = Path(artifact)
    if not artifact.is_file():
        what = {"trt": "engine", "onnx": "ONNX file", "openvino": "OpenVINO IR"}[fmt]
        raise BackendUnavailable(f"{artifact}: no such {what}; run `{export}` first or pass --artifact MODEL{f.suffix}")
    if not artifact.name.endswith(f.suffix):
        raise BackendUnavailable(f"{artifact}: the {fmt} backend needs a {f.suffix} file ({other})")
    return artifact
