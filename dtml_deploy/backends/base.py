"""The backend interface: run a fixed-size batch of windows, return the requested per-window maps.

Channel names a backend can produce (always fp32):
  `p_seg` sigmoid of M_s's logits; `sdm` tanh output of M_d; `p_dis` sigmoid(-k * sdm).
Backends are registered by name (`torch`, `onnx`, `trt`, `openvino`); `auto` picks one for the device and the
artifact given (`auto_backend` states the rule and the measurement behind it).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal, get_args

import torch

from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import BackendUnavailable

CHANNELS = ("p_seg", "p_dis", "sdm")
Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass(frozen=True)
class BackendOptions:
    """How a backend runs the networks."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision | None = None  # None: fp16 on CUDA, fp32 on the CPU
    batch: int | None = None  # windows per forward (None: `default_batch`); the last batch is padded to it
    channels_last: bool = True  # torch: channels_last_3d memory format
    fold_bn: bool = True  # torch: BatchNorm folded into the convolutions
    compile: bool = False  # torch: torch.compile the pair
    # None: on for the torch backend on CUDA (the fastest measured: benchmarks/results/segment_speed_h200.md)
    cuda_graphs: bool | None = None  # torch: replay a captured CUDA graph per batch
    cudnn_fusion: bool | None = None  # torch, CUDA: conv + ReLU as one cuDNN call
    keep_host_memory: bool = True  # torch, CPU: glibc keeps freed blocks for reuse (backends/host_memory.py)
    artifact: Path | None = None  # onnx/trt: a prebuilt .onnx / .engine (else looked up or exported)

    def __post_init__(self) -> None:
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {self.precision!r}")

    def resolved(self, backend: str = "torch") -> BackendOptions:
        """These options with every device-dependent default made concrete for `backend` (idempotent):
        the one place the device, precision, batch and CUDA extras are decided."""
        dev = resolve_device(self.device)
        cuda = dev.type == "cuda"
        torch_cuda = cuda and backend == "torch"
        return replace(self, device=str(dev), precision=self.precision or ("fp16" if cuda else "fp32"),
                       batch=default_batch(dev) if self.batch is None else self.batch,
                       cuda_graphs=torch_cuda if self.cuda_graphs is None else self.cuda_graphs,
                       cudnn_fusion=torch_cuda if self.cudnn_fusion is None else self.cudnn_fusion)


def default_batch(device: torch.device) -> int:
    """8 on CUDA (fastest on an H200: benchmarks/results/segment_speed_h200.json, batch 16 was slower);
    4 on the CPU (batch 2 and 4 run level there, 0.76 s per window pair)."""
    return 8 if device.type == "cuda" else 4


DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if present else cpu. Anything but cpu and a present CUDA device is a
    `BackendUnavailable` naming the valid choices (the CLI prints it as one line)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BackendUnavailable(f"--device {device!r} is not a device; choose from {DEVICE_CHOICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"--device {device}: dtml runs on the CPU or CUDA only; choose from "
                                 f"{DEVICE_CHOICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"--device {device} asked for, but torch sees no CUDA device; choose from "
                                     f"auto, cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendUnavailable(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                                     f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


class Backend(ABC):
    """Runs the dual-task pair on batches of windows."""

    name: ClassVar[str]

    def __init__(self, bundle: Bundle, options: BackendOptions, outputs: tuple[str, ...]) -> None:
        bad = [o for o in outputs if o not in CHANNELS]
        if bad or not outputs:
            raise ValueError(f"outputs must be a non-empty subset of {CHANNELS}, got {outputs}")
        self.bundle = bundle
        self.options = options.resolved(self.name)
        self.outputs = tuple(outputs)
        self.device = torch.device(self.options.device)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype windows are handed over in (the backend casts inside if it needs another)."""
        return torch.float32

    @abstractmethod
    def predict(self, windows: torch.Tensor) -> torch.Tensor:
        """[B, 1, *patch] on `self.device` -> [B, len(outputs), *patch] fp32 on `self.device`."""

    def describe(self) -> str:
        """One line saying what actually runs (for reports)."""
        return f"{self.name} on {self.device} ({self.options.precision}, batch {self.options.batch})"


_REGISTRY = {
    "torch": "dtml_deploy.backends.torch_backend:TorchBackend",
    "onnx": "dtml_deploy.backends.onnx_backend:OnnxBackend",
    "trt": "dtml_deploy.backends.trt_backend:TrtBackend",
    "openvino": "dtml_deploy.backends.openvino_backend:OpenVinoBackend",
}
BACKENDS: tuple[str, ...] = ("auto", *_REGISTRY)  # what --backend accepts


def _backend_class(name: str) -> type[Backend]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose from auto, {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def available_backends() -> list[str]:
    """Backends whose runtime imports here, in the order TensorRT, onnxruntime, torch (the order of their
    measured GPU speed; `auto` does not follow it, see `auto_backend`)."""
    found = []
    for name in ("trt", "onnx", "torch"):
        if _backend_class(name).is_available():  # type: ignore[attr-defined]
            found.append(name)
    return found


def create_backend(name: str, bundle: Bundle, options: BackendOptions,
                   outputs: tuple[str, ...] = ("p_seg", "p_dis")) -> Backend:
    """Instantiate a backend by name; `auto` resolves through `auto_backend`."""
    if name == "auto":
        name = auto_backend(options)
    return _backend_class(name)(bundle, options, outputs)


def auto_backend(options: BackendOptions) -> str:
    """TensorRT on a GPU when it imports, else torch. On the CPU torch with channels_last_3d runs
    level with onnxruntime's CPU provider (benchmarks/backend_speed.py), so torch needs no export."""
    dev = resolve_device(options.device)
    if dev.type == "cuda" and options.artifact is not None and _backend_class("trt").is_available():  # type: ignore[attr-defined]
        return "trt"
    return "torch"
