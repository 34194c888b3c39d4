"""Export the dual-task pair to one ONNX graph.

Graph: input `image` float32 [B, 1, D, H, W]; outputs (all float32, [B, 1, D, H, W]):

* `p_seg` = sigmoid(M_s logits)
* `p_dis` = sigmoid(-k * sdm), computed inside the graph
* `sdm`   = tanh(M_d output)
* `prob`  = (p_seg + p_dis) / 2 — the documented head combination (the engine's `--head mean`)

BatchNorm is folded into the convolutions (`fold_batchnorm`), dropout is gone (eval mode), the batch
axis is dynamic and the spatial axes are fixed to the bundle's patch size unless `dynamic_spatial`
(then any multiple of 16 works). Opset 17 by default, written by PyTorch's TorchScript-based exporter
(`dynamo=False`): the torch.export-based one needs `onnxscript`, which is not a dependency, and this
network is a plain static graph that the TorchScript tracer handles exactly.

fp16 variant: the folded pair is converted with `.half()` and wrapped in `ExportGraph`, whose
forward casts the float32 input to fp16 (a `Cast` node in the graph), runs every convolution in
fp16, and casts both head outputs to float32 *before* tanh, sigmoid and the -k*sdm product — so the
non-linearities and the sharp SDM-to-mask transition are evaluated in fp32, and the graph's inputs
and outputs stay float32 for every precision.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dtml_deploy.artifacts import ONNX_INPUT, ONNX_OUTPUTS, PROB_COMBINATION, onnx_metadata
from dtml_deploy.bundle import Bundle
from dtml_deploy.io.atomic import atomic_path
from dtml_deploy.nets.fold import fold_batchnorm
from dtml_export.formats import FORMATS, require_packages

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 13  # Conv/ConvTranspose/Sigmoid/Tanh/Cast are all stable from 13 on


def max_opset() -> int:
    """The newest opset the TorchScript-based exporter of this torch writes (20 in torch 2.x)."""
    try:
        from torch.onnx import _constants

        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
    except ImportError:  # a torch that moved its constants: the value torch 2.13 reports
        return 20


def check_opset(opset: int) -> None:
    """Refuse an opset this exporter cannot write, before any work."""
    top = max_opset()
    if not (isinstance(opset, int) and MIN_OPSET <= opset <= top):
        raise ValueError(f"--opset must be between {MIN_OPSET} and {top} (what this torch's exporter "
                         f"writes and the graph needs), got {opset}")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class ExportGraph(nn.Module):
    """The folded pair with all four outputs; conv math in `dtype`, heads and outputs in fp32."""

    def __init__(self, bundle: Bundle, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        net = fold_batchnorm(bundle.build("cpu"))
        self.seg = net.seg.to(dtype)
        self.dis = net.dis.to(dtype)
        self.dtype = dtype
        self.k = float(bundle.model.k)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = _cast(image, self.dtype)  # a Cast node for fp16; nothing for fp32
        logits = _cast(self.seg(x), torch.float32)
        sdm = torch.tanh(_cast(self.dis(x), torch.float32))
        p_seg = torch.sigmoid(logits)
        p_dis = torch.sigmoid(sdm * -self.k)
        prob = (p_seg + p_dis) * 0.5
        return p_seg, p_dis, sdm, prob


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)` that leaves no no-op Cast node in the traced graph."""
    return t if t.dtype == dtype else t.to(dtype)


@dataclass(frozen=True)
class OnnxExport:
    """What one export produced."""

    path: Path
    precision: str
    opset: int
    dynamic_spatial: bool
    bundle_hash: str
    seconds: float
    size_bytes: int
    n_nodes: int

    def summary(self) -> str:
        return (f"{self.path} ({self.precision}, opset {self.opset}, "
                f"{'dynamic' if self.dynamic_spatial else 'fixed'} spatial, {self.n_nodes} nodes, "
                f"{self.size_bytes / 1e6:.1f} MB, {self.seconds:.1f} s)")


def export_onnx_info(bundle: Bundle, out_path: Path, precision: str = "fp32", dynamic_spatial: bool = False,
                     opset: int = DEFAULT_OPSET) -> OnnxExport:
    """Export `bundle` to `out_path` (written atomically, checked by `onnx.checker`); return what was made."""
    fmt = FORMATS["onnx"]
    if precision not in fmt.precisions:
        raise ValueError(f"precision must be one of {fmt.precisions}, got {precision!r}")
    check_opset(int(opset))
    out_path = Path(out_path)
    if out_path.suffix != fmt.suffix:
        raise ValueError(f"{out_path}: an ONNX export must end in {fmt.suffix}")
    require_packages(fmt)
    import onnx

    t0 = time.perf_counter()
    graph = ExportGraph(bundle, _DTYPES[precision]).eval()
    # Trace at the smallest size the V-Net takes, with every axis dynamic, then pin the spatial axes
    # (tracing runs the network once, and fp16 convolutions on the CPU take minutes at full size).
    # InstanceNorm refuses the 1-voxel bottleneck of a 16^3 input; 32^3 costs fp16 tracing ~6x more time.
    example = torch.zeros(2, 1, *((32,) * 3 if bundle.model.net.norm == "instance" else (16,) * 3))
    axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    buf = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call; that is expected here.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        # Shape checks inside the norms are constant at a fixed patch size; InstanceNorm always uses the
        # instance's own statistics (no running stats), which is what "train=True" means in its symbolic.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train=True.*")
        torch.onnx.export(graph, (example,), buf, dynamo=False, opset_version=int(opset),
                          input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS),
                          dynamic_axes={name: axes for name in (ONNX_INPUT, *ONNX_OUTPUTS)},
                          do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    _drop_identities(model)
    if not dynamic_spatial:
        model = _pin_spatial(model, bundle.model.patch_size)
    model.producer_name = "dtml"
    model.doc_string = (f"DTML dual-task pair ({precision}); outputs p_seg, p_dis = sigmoid(-k*sdm), sdm, "
                        f"{PROB_COMBINATION}")
    onnx.helper.set_model_props(model, onnx_metadata(bundle, precision=precision,
                                                     dynamic_spatial=dynamic_spatial, opset=int(opset)))
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(out_path) as tmp:
        onnx.save(model, str(tmp))
    info = OnnxExport(path=out_path, precision=precision, opset=int(opset), dynamic_spatial=dynamic_spatial,
                      bundle_hash=bundle.content_hash, seconds=time.perf_counter() - t0,
                      size_bytes=out_path.stat().st_size, n_nodes=len(model.graph.node))
    log.info("exported %s", info.summary())
    return info


def export_onnx(bundle: Bundle, out_path: Path, precision: str = "fp32", dynamic_spatial: bool = False,
                opset: int = DEFAULT_OPSET) -> Path:
    """Export `bundle` to an ONNX file and return its path (see `export_onnx_info` for timing and size)."""
    return export_onnx_info(bundle, out_path, precision, dynamic_spatial, opset).path


def _drop_identities(model: object) -> None:
    """Remove `Identity` nodes (eval-mode dropout leftovers) by rewiring their consumers."""
    graph = model.graph  # type: ignore[attr-defined]
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
        else:
            keep.append(node)
    if not rename:
        return
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)


def _pin_spatial(model: object, patch: tuple[int, int, int]) -> object:
    """Fix the spatial axes of the graph's input and outputs to `patch` and re-infer inner shapes."""
    import onnx

    graph = model.graph  # type: ignore[attr-defined]
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims[2:], patch, strict=True):
            dim.ClearField("dim_param")
            dim.dim_value = int(size)
    del graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)
