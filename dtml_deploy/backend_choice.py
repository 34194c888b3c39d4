"""Which backend a request runs on, refusing options that backend would silently drop."""

from __future__ import annotations

from pathlib import Path

from dtml_deploy.artifacts import format_for_path


def resolve_backend(backend: str, artifact: Path | None, *, compile: bool = False,
                    cuda_graphs: bool | None = None, cudnn_fusion: bool | None = None) -> str:
    """The backend to create: `auto` with `--artifact` runs the artifact's own backend (an .onnx on
    onnx, an .engine on trt); `--artifact` with `--backend torch`, and torch-only switches with the
    onnx or trt backend, are refused (ValueError) instead of being ignored."""
    if artifact is not None:
        fmt = format_for_path(artifact)
        if backend == "torch":
            raise ValueError(f"--artifact {artifact} needs --backend {fmt.backend} (or auto); "
                             "the torch backend runs the bundle itself")
        if backend == "auto":
            backend = fmt.backend
    if backend in ("onnx", "trt"):
        torch_only = [flag for flag, on in (("--compile", compile), ("--cuda-graphs", cuda_graphs),
                                            ("--cudnn-fusion", cudnn_fusion)) if on]
        if torch_only:
            raise ValueError(f"{torch_only[0]} is an option of the torch backend; --backend {backend} cannot "
                             "honour it")
    return backend
