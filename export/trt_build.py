"""Build a TensorRT engine from an exported ONNX graph (TensorRT 10 and 11).

Precision:

* fp32: the fp32 ONNX; TF32 convolutions are allowed unless `tf32=False` (as in torch's default).
* fp16 on TensorRT 10 from the fp32 ONNX: weak typing with `BuilderFlag.FP16`; the head layers after
  the last convolutions (sigmoid, tanh, -k*sdm, the mean) are pinned to fp32 with
  `OBEY_PRECISION_CONSTRAINTS`, so the k-sharpened transition is never computed in fp16.
* fp16 from the fp16 ONNX (TensorRT 11, where the FP16 flag is gone, or 10 by choice): a strongly
  typed network — the graph's own Casts decide, and they keep the heads in fp32.

`onnx_precision_for(fp16)` says which ONNX variant to export for the TensorRT installed here. A JSON
sidecar (`dtml_deploy.artifacts.TrtSidecar`) is written beside the engine; the trt backend refuses
the engine where its TensorRT version, GPU or bundle hash no longer hold. Importable without TensorRT.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtml_deploy.artifacts import (
    EXPORT_ONNX,
    ONNX_INPUT,
    ArtifactInfo,
    TrtProfile,
    TrtSidecar,
    parse_onnx_metadata,
    read_onnx_metadata,
    sidecar_path,
)
from dtml_deploy.errors import BackendUnavailable, DtmlError
from dtml_deploy.io.atomic import atomic_path, atomic_write_text
from dtml_deploy.version import __version__

log = logging.getLogger(__name__)


def _trt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except Exception:  # ImportError, or OSError from a missing libnvinfer
        raise BackendUnavailable("building a TensorRT engine needs TensorRT; pip install 'dtml[trt]'") from None


def has_weak_fp16(trt: Any) -> bool:
    """True on TensorRT 10 (BuilderFlag.FP16 exists); TensorRT 11 builds fp16 only strongly typed."""
    return hasattr(trt.BuilderFlag, "FP16")


def onnx_precision_for(fp16: bool) -> str:
    """Which ONNX variant (`fp32`/`fp16`) to export for an engine of this precision here."""
    if not fp16:
        return "fp32"
    return "fp32" if has_weak_fp16(_trt()) else "fp16"


@dataclass(frozen=True)
class TrtBuild:
    """What one build produced."""

    engine_path: Path
    sidecar_path: Path
    sidecar: TrtSidecar
    seconds: float
    size_bytes: int


DEFAULT_WORKSPACE_GB = 4.0  # builder workspace: ample for the V-Net pair at batch 8 on an H200


@dataclass(frozen=True)
class TrtBuildOptions:
    """How an engine is built: its batch profile, precision, workspace and timing cache."""

    profile: TrtProfile = field(default_factory=TrtProfile)
    fp16: bool = False
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    timing_cache: Path | None = None  # reused across builds; written back after each
    tf32: bool = True  # TF32 convolutions in fp32 engines, as torch allows by default

    def __post_init__(self) -> None:
        if not self.workspace_gb > 0:
            raise ValueError(f"workspace_gb must be positive, got {self.workspace_gb}")


def build_engine(onnx_path: Path, engine_path: Path, options: TrtBuildOptions | None = None) -> TrtBuild:
    """Build and write `engine_path` (atomically) plus its sidecar; see the module docstring."""
    options = options or TrtBuildOptions()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    info = parse_onnx_metadata(read_onnx_metadata(onnx_path), str(onnx_path))
    trt = _trt()
    if not torch.cuda.is_available():
        raise BackendUnavailable("building a TensorRT engine needs a CUDA device; torch sees none")
    strong = _choose_typing(trt, info, options.fp16, onnx_path)
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _parse_network(trt, builder, logger, onnx_path, strong)
    config = _builder_config(trt, builder, network, options, strong, tuple(info.patch_size))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DtmlError(f"TensorRT failed to build an engine from {onnx_path} (see the log above; "
                        f"try a smaller --max-batch or a larger workspace)")
    seconds = time.perf_counter() - t0
    if options.timing_cache is not None:
        with atomic_path(Path(options.timing_cache)) as tmp:
            tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    data = bytes(memoryview(serialized))
    sidecar = _sidecar(trt, info, options, strong, data, onnx_path, seconds)
    side = _write_engine(engine_path, data, sidecar)
    log.info("built %s in %.1f s (%s, %sly typed, batch %d..%d)", engine_path, seconds, sidecar.precision,
             sidecar.typing, options.profile.min_batch, options.profile.max_batch)
    return TrtBuild(engine_path, side, sidecar, seconds, len(data))


def _parse_network(trt: Any, builder: Any, logger: Any, onnx_path: Path, strong: bool) -> Any:
    """The network parsed from the ONNX file, strongly typed when `strong`."""
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strong and strongly is not None:  # required on 10.x; TensorRT 11 is always strongly typed
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DtmlError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors[:500]}")
    return network


def _builder_config(trt: Any, builder: Any, network: Any, options: TrtBuildOptions, strong: bool,
                    patch: tuple[int, ...]) -> Any:
    """Workspace, precision flags, the batch profile and the timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if not options.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.fp16 and not strong:
        config.set_flag(trt.BuilderFlag.FP16)
        _pin_heads_fp32(trt, network)
        if hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"):
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = options.profile
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(ONNX_INPUT, (profile.min_batch, 1, *patch), (profile.opt_batch, 1, *patch),
                          (profile.max_batch, 1, *patch))
    config.add_optimization_profile(opt_profile)
    if options.timing_cache is not None:
        cache_file = Path(options.timing_cache)
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("timing cache %s does not fit this TensorRT/GPU; starting a new one", cache_file)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=True)
    return config


def _sidecar(trt: Any, info: ArtifactInfo, options: TrtBuildOptions, strong: bool, data: bytes, onnx_path: Path,
             seconds: float) -> TrtSidecar:
    """What the engine needs to hold where it runs: TensorRT version, GPU, bundle hash, profile."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return TrtSidecar(
        tensorrt_version=trt.__version__, gpu_name=props.name,
        compute_capability=(props.major, props.minor), bundle_hash=info.bundle_hash,
        precision="fp16" if options.fp16 else "fp32", typing="strong" if strong else "weak",
        profile=options.profile, patch_size=tuple(info.patch_size), outputs=info.outputs,
        engine_sha256=hashlib.sha256(data).hexdigest(), dtml_version=__version__, source_onnx=onnx_path.name,
        build_seconds=round(seconds, 2),
        extra={"workspace_gb": options.workspace_gb, "tf32": options.tf32, "onnx_precision": info.precision},
    )


def _write_engine(engine_path: Path, data: bytes, sidecar: TrtSidecar) -> Path:
    """The engine and its sidecar, each written atomically; returns the sidecar's path."""
    side = sidecar_path(engine_path)
    side.unlink(missing_ok=True)  # never leave an old sidecar describing a new engine
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(data)
    atomic_write_text(side, json.dumps(sidecar.to_dict(), indent=2) + "\n")
    return side


def _choose_typing(trt: Any, info: ArtifactInfo, fp16: bool, onnx_path: Path) -> bool:
    """True for a strongly typed network; refuses ONNX/precision pairs that would not do what is asked."""
    if info.precision == "fp16":
        if not fp16:
            raise ValueError(f"{onnx_path} is the fp16 graph; build an fp32 engine from the fp32 ONNX "
                             f"(`{EXPORT_ONNX} --precision fp32`) or pass fp16=True")
        return True
    if not has_weak_fp16(trt):  # TensorRT 11: every network is strongly typed
        if fp16:
            raise DtmlError(f"TensorRT {trt.__version__} builds fp16 engines only from the fp16 graph "
                            f"(strong typing): export it with `{EXPORT_ONNX} --precision fp16` and "
                            f"build from that")
        return True
    return False  # TensorRT 10: the classic weakly typed build (fp32, or fp16 via BuilderFlag.FP16)


def _pin_heads_fp32(trt: Any, network: Any) -> None:
    """Weak-typing fp16 only: run every layer between the last convolutions and the outputs in fp32."""
    producer: dict[str, Any] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    stop = {trt.LayerType.CONVOLUTION, trt.LayerType.DECONVOLUTION}
    skip = {trt.LayerType.CONSTANT, trt.LayerType.SHUFFLE}
    seen: set[str] = set()
    todo = [network.get_output(i).name for i in range(network.num_outputs)]
    while todo:
        layer = producer.get(todo.pop())
        if layer is None or layer.name in seen or layer.type in stop:
            continue
        seen.add(layer.name)
        if layer.type not in skip:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            if tensor is not None:
                todo.append(tensor.name)
