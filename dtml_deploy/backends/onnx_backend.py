"""onnxruntime backend: runs an ONNX graph made by `dtml export` (CPU; CUDA/TensorRT EPs if present).

The artifact must come from the same bundle (its `dtml.bundle_hash` metadata is checked). When the
requested outputs need only one network of the pair (`p_seg` alone, or `p_dis`/`sdm` alone) and the
`onnx` package is present, the graph is cut down to that network before the session is made
(onnxruntime's `only_execute_path_to_fetches` does not skip the other branch: measured, no gain).
The graph's input and outputs are float32 for every precision (an fp16 graph casts inside), so
windows go in and maps come out as float32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtml_deploy.artifacts import (
    EXPORT_ONNX,
    FORMATS,
    ONNX_INPUT,
    ArtifactInfo,
    check_bundle_hash,
    parse_onnx_metadata,
    require_artifact,
)
from dtml_deploy.backends.base import Backend, BackendOptions
from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import BackendUnavailable, BundleError, first_line

_CUDA_EPS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _graph_for(artifact: Path, outputs: tuple[str, ...]) -> str | bytes:
    """The artifact's path, or (when only one network is needed and onnx imports) the serialised
    subgraph that computes `outputs` from `image`, with the metadata kept."""
    need_seg = "p_seg" in outputs
    need_dis = "p_dis" in outputs or "sdm" in outputs
    if need_seg and need_dis:
        return str(artifact)
    try:
        import onnx
        import onnx.utils
    except ImportError:
        return str(artifact)
    try:
        model = onnx.load(str(artifact))
        pruned = onnx.utils.Extractor(model).extract_model([ONNX_INPUT], list(outputs))
    except Exception:  # not a graph we can cut (damaged or foreign): let onnxruntime report on it
        return str(artifact)
    pruned.metadata_props.extend(model.metadata_props)
    return pruned.SerializeToString()


class OnnxBackend(Backend):
    name = "onnx"

    @staticmethod
    def is_available() -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    def __init__(self, bundle: Bundle, options: BackendOptions, outputs: tuple[str, ...]) -> None:
        super().__init__(bundle, options, outputs)
        options = self.options  # resolved (device-dependent defaults made concrete)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("the onnx backend needs onnxruntime; pip install 'dtml[onnx]' "
                                     "(or 'dtml[gpu]' for CUDA)") from None
        artifact = require_artifact(options.artifact, "onnx")
        self.providers = self._providers(ort)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: no per-session warnings on stderr
        try:
            self._session = ort.InferenceSession(_graph_for(artifact, self.outputs), opts,
                                                 providers=self.providers)
        except Exception as e:  # onnxruntime raises its own pybind exception types
            raise BundleError(f"{artifact}: onnxruntime cannot load it ({first_line(e)}); "
                              f"re-export with `{EXPORT_ONNX}`") from None
        self.artifact = artifact
        self.info: ArtifactInfo = parse_onnx_metadata(self._session.get_modelmeta().custom_metadata_map,
                                                      str(artifact))
        check_bundle_hash(self.info.bundle_hash, bundle, str(artifact), EXPORT_ONNX)
        missing = [o for o in self.outputs if o not in self.info.outputs]
        if missing:
            raise BundleError(f"{artifact} has no output {missing}; re-export with `{EXPORT_ONNX}`")
        want = options.precision
        if want not in FORMATS["onnx"].precisions:
            raise BackendUnavailable(f"the onnx backend runs fp32 or fp16 graphs, not {want}; "
                                     f"use --backend torch for {want}")
        if want != self.info.precision:
            raise BackendUnavailable(f"{artifact} is an {self.info.precision} graph but --precision {want} "
                                     f"was asked; pass --precision {self.info.precision} or export "
                                     f"{want} with `{EXPORT_ONNX} --precision {want}`")
        self._fetch = list(self.outputs)

    def _providers(self, ort: Any) -> list[Any]:
        """CPU EP on the CPU; on CUDA the TensorRT and CUDA EPs that this onnxruntime build has."""
        if self.device.type != "cuda":
            return ["CPUExecutionProvider"]
        present = set(ort.get_available_providers())
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        chosen: list[Any] = []
        if "TensorrtExecutionProvider" in present:
            chosen.append(("TensorrtExecutionProvider", {"device_id": index}))
        if "CUDAExecutionProvider" in present:
            chosen.append(("CUDAExecutionProvider", {"device_id": index}))
        if not chosen:
            raise BackendUnavailable("this onnxruntime has no CUDA execution provider; install "
                                     "onnxruntime-gpu ('dtml[gpu]') or use --device cpu")
        return [*chosen, "CPUExecutionProvider"]

    def predict(self, windows: torch.Tensor) -> torch.Tensor:
        if windows.ndim != 5 or windows.shape[1] != 1:
            raise ValueError(f"windows must be [B, 1, D, H, W], got {tuple(windows.shape)}")
        spatial = tuple(windows.shape[2:])
        if not self.info.dynamic_spatial and spatial != tuple(self.info.patch_size):
            raise ValueError(f"windows are {spatial}, the graph takes {tuple(self.info.patch_size)}")
        x = np.ascontiguousarray(windows.detach().to("cpu", torch.float32).numpy())
        maps = self._session.run(self._fetch, {ONNX_INPUT: x})
        out = maps[0] if len(maps) == 1 else np.concatenate(maps, axis=1)
        return torch.from_numpy(out).to(self.device)

    def describe(self) -> str:
        eps = ", ".join(p if isinstance(p, str) else p[0] for p in self._session.get_providers())
        return (f"onnx on {self.device} ({self.info.precision}, batch {self.options.batch}, "
                f"{self.artifact.name}, {eps})")
