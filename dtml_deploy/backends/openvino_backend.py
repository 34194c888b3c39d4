"""OpenVINO backend: runs an IR made by `dtml export --openvino` (fp32, or int8 quantised with NNCF) on the CPU.

The IR carries dtml's metadata in its runtime info (`rt_info["dtml"]`, dtml_deploy/artifacts.py), checked
on load as an ONNX file's is: an IR from other weights is refused. The model is compiled for a static
[batch, 1, *patch] input (the engine pads a last short batch to --batch) and cut down to the outputs the
run needs, so a single-head run computes one network. `--precision` is OpenVINO's inference precision
hint for the layers that are not int8: fp32 (the default, set explicitly because OpenVINO would pick
bf16 on its own on a CPU that computes bf16 natively) or bf16.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtml_deploy.artifacts import (
    EXPORT_OPENVINO,
    ONNX_INPUT,
    ArtifactInfo,
    check_bundle_hash,
    parse_openvino_metadata,
    require_artifact,
)
from dtml_deploy.backends.base import Backend, BackendOptions
from dtml_deploy.backends.signal_stack import kept_signal_stack
from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import BackendUnavailable, BundleError

MISSING_EXTRA = "the openvino backend needs openvino; pip install 'dtml[openvino]'"
_HINTS = {"fp32": "f32", "bf16": "bf16"}  # --precision -> INFERENCE_PRECISION_HINT


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def read_ir_metadata(model: Any) -> dict[str, str]:
    """The `rt_info["dtml"]` entries of an `ov.Model` as strings ({} when it has none)."""
    if not model.has_rt_info(["dtml"]):
        return {}
    node = model.get_rt_info(["dtml"])
    return {str(k): model.get_rt_info(["dtml", str(k)]).astype(str) for k in node.astype(dict)}


def load_ir(path: Path) -> tuple[Any, ArtifactInfo]:
    """Read an IR and its dtml metadata; a foreign or unreadable file is a `BundleError`."""
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailable(MISSING_EXTRA) from None
    try:
        model = ov.Core().read_model(str(path))
    except Exception as e:  # OpenVINO raises its own RuntimeError subclasses
        raise BundleError(f"{path}: OpenVINO cannot read it ({_first_line(e)}); "
                          f"re-export with `{EXPORT_OPENVINO}`") from None
    return model, parse_openvino_metadata(read_ir_metadata(model), str(path))


class OpenVinoBackend(Backend):
    name = "openvino"

    @staticmethod
    def is_available() -> bool:
        return importlib.util.find_spec("openvino") is not None

    def __init__(self, bundle: Bundle, options: BackendOptions, outputs: tuple[str, ...]) -> None:
        super().__init__(bundle, options, outputs)
        if not self.is_available():
            raise BackendUnavailable(MISSING_EXTRA)
        if self.device.type != "cpu":
            raise BackendUnavailable(f"the openvino backend runs on the CPU, not {self.device}; pass --device cpu "
                                     "or use --backend trt/torch on CUDA")
        if self.options.precision not in _HINTS:
            raise BackendUnavailable(f"the openvino backend computes fp32 or bf16 (int8 layers stay int8), not "
                                     f"{self.options.precision}; pass --precision fp32")
        artifact = require_artifact(options.artifact, "openvino")
        model, self.info = load_ir(artifact)
        check_bundle_hash(self.info.bundle_hash, bundle, str(artifact), EXPORT_OPENVINO)
        missing = [o for o in self.outputs if o not in self.info.outputs]
        if missing:
            raise BundleError(f"{artifact} has no output {missing}; re-export with `{EXPORT_OPENVINO}`")
        self.artifact = artifact
        self._model = model
        self._requests: dict[int, Any] = {}  # batch size -> infer request of a model compiled for it
        self._infer_request(self.options.batch)  # compile errors surface here, not at the first window

    def _infer_request(self, batch: int) -> Any:
        """An infer request for a static [batch, 1, *patch] input (compiled once per batch size: the engine
        asks for --batch, and fewer windows only for a volume with fewer windows than that)."""
        if batch in self._requests:
            return self._requests[batch]
        import openvino as ov

        model = ov.Model([self._model.output(o) for o in self.outputs], self._model.get_parameters(), "dtml")
        model.reshape({ONNX_INPUT: [batch, 1, *self.info.patch_size]})  # the unneeded network is dropped above
        config = {"INFERENCE_PRECISION_HINT": _HINTS[self.options.precision], "PERFORMANCE_HINT": "LATENCY"}
        try:
            with kept_signal_stack():
                compiled = ov.Core().compile_model(model, "CPU", config)
        except Exception as e:
            raise BackendUnavailable(f"{self.artifact}: OpenVINO cannot compile it for this CPU "
                                     f"({_first_line(e)})") from None
        self._requests[batch] = compiled.create_infer_request()
        return self._requests[batch]

    def predict(self, windows: torch.Tensor) -> torch.Tensor:
        if windows.ndim != 5 or windows.shape[1] != 1:
            raise ValueError(f"windows must be [B, 1, D, H, W], got {tuple(windows.shape)}")
        if tuple(windows.shape[2:]) != tuple(self.info.patch_size):
            raise ValueError(f"windows are {tuple(windows.shape[2:])}, the IR takes {tuple(self.info.patch_size)}")
        request = self._infer_request(windows.shape[0])
        x = np.ascontiguousarray(windows.detach().to("cpu", torch.float32).numpy())
        result = request.infer({ONNX_INPUT: x})
        maps = [np.asarray(result[o]) for o in self.outputs]
        out = maps[0] if len(maps) == 1 else np.concatenate(maps, axis=1)
        return torch.from_numpy(np.ascontiguousarray(out)).to(self.device)

    def close(self) -> None:
        """Release the compiled models now (inside `kept_signal_stack`, as their compilation was)."""
        with kept_signal_stack():
            self._requests.clear()

    def __del__(self) -> None:
        if getattr(self, "_requests", None):
            self.close()

    def describe(self) -> str:
        return (f"openvino on cpu ({self.info.precision} IR, {self.options.precision} elsewhere, "
                f"batch {self.options.batch}, {self.artifact.name})")
