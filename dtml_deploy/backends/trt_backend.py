"""TensorRT backend: runs an engine built by `dtml export --model BUNDLE --trt` (TensorRT 10 or 11, CUDA only).

An engine is only valid for the TensorRT version and GPU model that built it, and for one bundle;
its JSON sidecar (`dtml_deploy.artifacts.TrtSidecar`) is checked against all three before the engine
is deserialised. I/O buffers are torch CUDA tensors bound by address (`set_tensor_address`) and the
engine runs on torch's current stream (`execute_async_v3`), so no pycuda is needed.
This module imports without TensorRT; `is_available()` then says False.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from dtml_deploy.artifacts import (
    EXPORT_TRT,
    FORMATS,
    ONNX_INPUT,
    TrtSidecar,
    check_trt_sidecar,
    read_sidecar,
    require_artifact,
)
from dtml_deploy.backends.base import Backend, BackendOptions
from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import BackendUnavailable, BundleError, DtmlError
from dtml_deploy.io.digest import file_sha256

_REBUILD = f"rebuild with `{EXPORT_TRT}`"


def _import_trt() -> Any | None:
    """The tensorrt module, or None if it does not import (absent, or its CUDA libraries are)."""
    try:
        return importlib.import_module("tensorrt")
    except Exception:  # ImportError, or OSError from a missing libnvinfer
        return None


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here, in one line; None when it can."""
    if _import_trt() is None:
        return "TensorRT is not installed (pip install 'dtml[trt]'); use --backend torch or onnx"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA device and torch sees none; use --backend torch or onnx"
    return None


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise BundleError(f"engine tensor type {dtype} is not supported; {_REBUILD}")
    return table[dtype]


class TrtBackend(Backend):
    name = "trt"

    @staticmethod
    def is_available() -> bool:
        return unavailable_reason() is None

    def __init__(self, bundle: Bundle, options: BackendOptions, outputs: tuple[str, ...]) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(reason)
        super().__init__(bundle, options, outputs)
        options = self.options  # resolved (device-dependent defaults made concrete)
        if self.device.type != "cuda":
            raise BackendUnavailable(f"the trt backend runs on CUDA only, not on {self.device}; "
                                     f"use --device cuda or --backend onnx")
        trt = _import_trt()
        artifact = require_artifact(options.artifact, "trt")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        props = torch.cuda.get_device_properties(index)
        sidecar = read_sidecar(artifact)
        check_trt_sidecar(sidecar, bundle_hash=bundle.content_hash, tensorrt_version=trt.__version__,
                          gpu_name=props.name, compute_capability=(props.major, props.minor))
        self._check_request(sidecar, artifact)
        if file_sha256(artifact) != sidecar.engine_sha256:
            raise BundleError(f"{artifact}: checksum differs from its sidecar (file replaced or corrupt); "
                              f"{_REBUILD}")
        self.sidecar = sidecar
        self.artifact = artifact

        self._logger = trt.Logger(trt.Logger.ERROR)
        with torch.cuda.device(index):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(artifact.read_bytes())
            if self._engine is None:
                raise BundleError(f"{artifact}: TensorRT could not deserialise the engine; {_REBUILD}")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise DtmlError(f"{artifact}: TensorRT could not create an execution context "
                                f"(out of GPU memory?)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if self._inputs != [ONNX_INPUT] or any(o not in self._outputs for o in self.outputs):
            raise BundleError(f"{artifact}: engine I/O {self._inputs} -> {self._outputs} is not a dtml pair; "
                              f"{_REBUILD}")
        self._in_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(ONNX_INPUT))
        self._out_dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in self._outputs}
        self._buffers: dict[str, torch.Tensor] = {}
        self._bound_batch = 0

    def _check_request(self, sidecar: TrtSidecar, artifact: Path) -> None:
        if self.options.precision not in FORMATS["trt"].precisions:
            raise BackendUnavailable(f"the trt backend runs fp32 or fp16 engines, not {self.options.precision}; "
                                     f"use --backend torch for {self.options.precision}")
        prof = sidecar.profile
        if not prof.min_batch <= self.options.batch <= prof.max_batch:
            raise BackendUnavailable(
                f"{artifact} takes batches of {prof.min_batch}..{prof.max_batch}, --batch {self.options.batch} "
                f"was asked; pass a batch in that range or rebuild with `{EXPORT_TRT} "
                f"--max-batch {self.options.batch}`")
        if self.options.precision != sidecar.precision:
            raise BackendUnavailable(
                f"{artifact} is an {sidecar.precision} engine but --precision {self.options.precision} was "
                f"asked; pass --precision {sidecar.precision} or build one with `{EXPORT_TRT} "
                f"--precision {self.options.precision}`")

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.float32

    def _bind(self, batch: int) -> None:
        """Allocate the output buffers for `batch` windows and bind their addresses (once per size)."""
        if batch == self._bound_batch:
            return
        patch = tuple(self.sidecar.patch_size)
        if not self._context.set_input_shape(ONNX_INPUT, (batch, 1, *patch)):
            raise ValueError(f"batch {batch} is outside the engine's profile "
                             f"{self.sidecar.profile.min_batch}..{self.sidecar.profile.max_batch}")
        self._buffers = {}
        for name in self._outputs:  # every output needs an address, requested or not
            shape = tuple(self._context.get_tensor_shape(name))
            buf = torch.empty(shape, dtype=self._out_dtypes[name], device=self.device)
            self._context.set_tensor_address(name, buf.data_ptr())
            self._buffers[name] = buf
        self._bound_batch = batch

    @torch.inference_mode()
    def predict(self, windows: torch.Tensor) -> torch.Tensor:
        if windows.ndim != 5 or windows.shape[1] != 1:
            raise ValueError(f"windows must be [B, 1, D, H, W], got {tuple(windows.shape)}")
        if tuple(windows.shape[2:]) != tuple(self.sidecar.patch_size):
            raise ValueError(f"windows are {tuple(windows.shape[2:])}, the engine takes "
                             f"{tuple(self.sidecar.patch_size)}")
        with torch.cuda.device(self.device):
            x = windows.to(self.device, self._in_dtype).contiguous()
            self._bind(int(x.shape[0]))
            self._context.set_tensor_address(ONNX_INPUT, x.data_ptr())
            stream = torch.cuda.current_stream(self.device)
            if not self._context.execute_async_v3(stream.cuda_stream):
                raise DtmlError("TensorRT execution failed (see the TensorRT log above)")
            # x must outlive the launch: the caching allocator only reuses its block for work queued on
            # this stream after the engine's kernels, so returning after the cat below is safe.
            maps = [self._buffers[o] for o in self.outputs]
            out = maps[0].float().clone() if len(maps) == 1 else torch.cat(maps, dim=1).float()
        return out

    def describe(self) -> str:
        sc = self.sidecar
        return (f"trt on {self.device} ({sc.precision}, {sc.typing}ly typed, batch {self.options.batch}, "
                f"TensorRT {sc.tensorrt_version}, {self.artifact.name})")
