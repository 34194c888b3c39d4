"""The rows `dtml benchmark` can time, and why a row cannot run on this machine.

The torch rows are the torch backend's own variants; every other row is a precision of an exported format,
read from the one format table (`dtml_deploy.artifacts.FORMATS`: its `title` and `benchmarked` precisions),
so a format added there is benchmarked without restating it here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dtml_export.formats import FORMATS, ArtifactFormat, missing_packages

PASSED = "passed"
PARITY = "exported but failed parity"


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: a backend at a precision with its options."""

    key: str  # the name --formats takes
    name: str
    backend: str  # torch | onnx | trt | openvino
    precision: str | None  # None: the device's default (fp16 on CUDA, fp32 on CPU)
    artifact_precision: str | None = None  # the artifact's own when it differs (an int8 IR computes in fp32)
    compile: bool = False
    cuda_graphs: bool = False
    cudnn_fusion: bool = False


TORCH_ROWS: tuple[RowSpec, ...] = (
    RowSpec("torch-fp32", "torch fp32", "torch", "fp32"),
    RowSpec("torch-bf16", "torch bf16", "torch", "bf16"),
    RowSpec("torch-fp16", "torch fp16", "torch", "fp16"),
    RowSpec("torch-fp16-graphs", "torch fp16 + CUDA graphs + cuDNN fusion", "torch", "fp16",
            cuda_graphs=True, cudnn_fusion=True),
    RowSpec("torch-compiled", "torch compiled", "torch", None, compile=True),
)
QUANTISED = ("int8",)  # artifact precisions that are not compute precisions: the backend computes in fp32
ROWS: tuple[RowSpec, ...] = TORCH_ROWS + tuple(
    RowSpec(f"{fmt.name}-{p}", f"{fmt.title} {p}", fmt.backend, "fp32" if p in QUANTISED else p,
            p if p in QUANTISED else None)
    for fmt in FORMATS.values() for p in fmt.benchmarked)
ROW_KEYS: tuple[str, ...] = tuple(s.key for s in ROWS)


def parse_formats(text: str | None) -> tuple[str, ...]:
    """`--formats a,b`: the row keys (None: every row); an option that names nothing is refused."""
    if text is None:
        return ()
    keys = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    if not keys:
        raise ValueError(f"--formats names no row; choose from {', '.join(ROW_KEYS)}")
    return keys


def _format_reason(fmt: ArtifactFormat, cuda: bool) -> str | None:
    """Why a format's rows cannot run here in general: its runtime is not installed, or it needs a GPU."""
    missing = missing_packages(fmt) + missing_packages(fmt, run=True)
    if missing:
        return f"{', '.join(sorted(set(missing)))} not installed (pip install 'dtml[{fmt.extra}]')"
    return f"{fmt.title} runs on CUDA only; the device is the CPU" if fmt.needs_gpu and not cuda else None


def _onnx_ep_reason(precision: str, cuda: bool) -> str | None:
    if not cuda:
        fp16 = precision == "fp16"
        return "fp16 ONNX runs on onnxruntime's CUDA provider only; the device is the CPU" if fp16 else None
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)"
    return None


def _trt_reason(precision: str, cuda: bool) -> str | None:
    from dtml_deploy.backends.trt_backend import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return reason.split(";")[0]
    return None if cuda else "TensorRT runs on CUDA only; the device is the CPU"


def _openvino_reason(precision: str, cuda: bool) -> str | None:
    return "OpenVINO runs on the CPU; the device is CUDA" if cuda else None


def skip_reason(spec: RowSpec, cuda: bool, named: bool, real: bool = True) -> str | None:
    """Why `spec` cannot run here (None when it can); `named`: --formats asked for it; `real`: --data given."""
    if spec.backend == "torch":
        if spec.precision == "fp16" and not cuda:
            return "fp16 needs CUDA (no fp16 convolutions on the CPU)"
        if spec.compile and not cuda and not named:
            return "torch.compile is slow to build on the CPU; name torch-compiled in --formats to include it"
        return None
    fmt = next(f for f in FORMATS.values() if f.backend == spec.backend)
    check = _RUNTIME_CHECKS.get(fmt.name)
    reason = _format_reason(fmt, cuda) or (check(spec.precision or "fp32", cuda) if check else None)
    if reason is None and spec.artifact_precision in QUANTISED and not real:
        return f"{spec.artifact_precision} is calibrated on real scans: pass --data"
    return reason


# Checks beyond the format table's packages and GPU flag, per format (execution providers, a usable GPU).
_RUNTIME_CHECKS: dict[str, Callable[[str, bool], str | None]] = {"onnx": _onnx_ep_reason, "trt": _trt_reason,
                                                                 "openvino": _openvino_reason}


