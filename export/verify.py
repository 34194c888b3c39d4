"""Check an exported ONNX graph against the PyTorch fp32 pair it came from.

`verify_onnx` runs onnxruntime and the unfolded fp32 `DualTaskNet` (so BatchNorm folding is checked
too) on seeded random patches and, when given, a real patch; per output it reports the max abs error
and the Dice agreement of the masks (p > 0.5; for `sdm`, sdm < 0), and compares them with the
tolerances below.

Tolerances (per precision of the artifact, against the fp32 PyTorch reference):

* fp32 — both sides compute in fp32 and differ only by summation order (and the folded BN), which
  moves logits and sdm by ~1e-6. 1e-4 on `p_seg`/`sdm` leaves two orders of magnitude of headroom.
  `p_dis = sigmoid(-k*sdm)` amplifies an sdm error by up to k/4 (375 for k = 1500) in the transition
  band, so `p_dis` gets k/4 x 1e-5 (3.75e-3 at k=1500) and `prob` half of that plus half the p_seg
  tolerance. Masks must agree to Dice >= 0.999.
* fp16 — weights and activations carry an 11-bit mantissa (relative eps 4.9e-4), which after ~20
  convolutions moves logits/sdm by up to ~1e-2 on random weights and by ~1e-3 on a trained pair.
  `p_seg` and `sdm` get 2e-2. `p_dis` is not bounded by an absolute error: an sdm error of 1e-3 can flip
  a voxel of the (k-sharpened) transition band from 0.3 to 0.7, so its max abs error is reported but
  only its Dice is enforced; the same holds for `prob`. Masks must agree to Dice >= 0.98 (random noise
  patches put far more voxels on a decision boundary than a real scan does; on real data it is > 0.99).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dtml_deploy.artifacts import EXPORT_ONNX, ONNX_INPUT, ONNX_OUTPUTS, check_bundle_hash, parse_onnx_metadata
from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import BackendUnavailable
from dtml_deploy.metrics import agreement
from dtml_deploy.nets.dual import DualTaskNet, sdm_to_mask

SDM_BAND_TOL_FP32 = 1e-5  # sdm error budget that sets the fp32 p_dis tolerance through k/4
UNBOUNDED = float("inf")


@dataclass(frozen=True)
class Tolerance:
    """Max abs error per output and the minimum Dice of the masks."""

    max_abs: Mapping[str, float]
    min_dice: float


def tolerance(precision: str, k: float) -> Tolerance:
    """The tolerances for an artifact of `precision` (see the module docstring for the reasoning)."""
    if precision == "fp32":
        p_dis = min(1.0, k / 4 * SDM_BAND_TOL_FP32)
        return Tolerance({"p_seg": 1e-4, "sdm": 1e-4, "p_dis": p_dis, "prob": 0.5 * (1e-4 + p_dis)}, 0.999)
    if precision == "fp16":
        return Tolerance({"p_seg": 2e-2, "sdm": 2e-2, "p_dis": UNBOUNDED, "prob": UNBOUNDED}, 0.98)
    raise ValueError(f"no tolerances for precision {precision!r}")


@dataclass(frozen=True)
class OutputCheck:
    """One output on one set of patches."""

    output: str
    source: str  # "random" | "real"
    max_abs_err: float
    mean_abs_err: float
    dice: float
    tol_abs: float
    min_dice: float

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.tol_abs and self.dice >= self.min_dice


@dataclass
class VerifyReport:
    """All checks of one artifact."""

    onnx_path: Path
    precision: str
    checks: list[OutputCheck] = field(default_factory=list)
    low_precision_heads: list[str] = field(default_factory=list)  # see heads_below_fp32
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks) and not self.low_precision_heads

    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.passed]


def render_report(report: VerifyReport) -> str:
    """The report as a text table, one row per (source, output), and a verdict line."""
    head = f"{'source':<7} {'output':<6} {'max abs err':>12} {'tol':>9} {'mean abs err':>12} " \
           f"{'Dice':>8} {'min':>6}  ok"
    rows = [f"verify {report.onnx_path.name} ({report.precision}) vs torch fp32", head, "-" * len(head)]
    for c in report.checks:
        tol = "-" if c.tol_abs == UNBOUNDED else f"{c.tol_abs:.2e}"
        rows.append(f"{c.source:<7} {c.output:<6} {c.max_abs_err:>12.3e} {tol:>9} {c.mean_abs_err:>12.3e} "
                    f"{c.dice:>8.5f} {c.min_dice:>6.3f}  {'yes' if c.passed else 'NO'}")
    heads = ", ".join(report.low_precision_heads) or "all fp32"
    rows.append(f"graph: tanh/sigmoid and the -k*sdm product: {heads}")
    rows.append(f"{'PASSED' if report.passed else 'FAILED'} in {report.seconds:.1f} s")
    return "\n".join(rows)


_HEAD_OPS = ("Tanh", "Sigmoid", "Mul")


def heads_below_fp32(model: object) -> list[str]:
    """Head nodes (Tanh, Sigmoid, and the Mul feeding a Sigmoid: -k*sdm) whose inputs are not fp32.

    onnxruntime's CPU provider runs fp16 convolutions in fp32 (it inserts casts and drops the graph's),
    so on the CPU the numeric comparison cannot show a head computed in fp16; the graph's own types can.
    Returns "op name (dtype)" entries; empty for a safe graph.
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)  # type: ignore[arg-type]
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    consumers: dict[str, list[str]] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node.op_type)
    bad = []
    for node in g.node:
        if node.op_type not in _HEAD_OPS:
            continue
        if node.op_type == "Mul" and "Sigmoid" not in {c for o in node.output for c in consumers.get(o, [])}:
            continue  # an fp16 multiply inside the networks, not the head's -k*sdm
        for i in node.input:
            if i and types.get(i, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
                bad.append(f"{node.op_type} {node.name or node.output[0]} "
                           f"({onnx.TensorProto.DataType.Name(types[i]).lower()})")
                break
    return bad


def reference_outputs(net: DualTaskNet, x: torch.Tensor, k: float) -> dict[str, np.ndarray]:
    """The four graph outputs computed by the PyTorch pair (fp32, eval)."""
    with torch.inference_mode():
        logits, sdm = net(x)
        p_seg = torch.sigmoid(logits)
        p_dis = sdm_to_mask(sdm, k)
        maps = {"p_seg": p_seg, "p_dis": p_dis, "sdm": sdm, "prob": 0.5 * (p_seg + p_dis)}
    return {name: t.numpy() for name, t in maps.items()}


def _mask(name: str, a: np.ndarray) -> np.ndarray:
    return a < 0 if name == "sdm" else a > 0.5


def verify_onnx(bundle: Bundle, onnx_path: Path, *, real_patch: np.ndarray | None = None, n_random: int = 2,
                seed: int = 0, tol: Tolerance | None = None) -> VerifyReport:
    """Compare onnxruntime (CPU) on `onnx_path` with the bundle's PyTorch fp32 pair.

    `real_patch`: optional network input of the bundle's patch size ([D, H, W], leading axes of size
    1 allowed), already intensity-normalised as the bundle expects. Random patches are N(0, 1), seeded.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("verifying an ONNX export needs onnxruntime; pip install 'dtml[onnx]'") from None
    t0 = time.perf_counter()
    onnx_path = Path(onnx_path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    info = parse_onnx_metadata(session.get_modelmeta().custom_metadata_map, str(onnx_path))
    check_bundle_hash(info.bundle_hash, bundle, str(onnx_path), EXPORT_ONNX)
    tol = tol or tolerance(info.precision, bundle.model.k)
    net = bundle.build("cpu")
    patch = bundle.model.patch_size

    inputs: list[tuple[str, torch.Tensor]] = []
    if n_random > 0:
        gen = torch.Generator().manual_seed(seed)
        inputs.append(("random", torch.randn(n_random, 1, *patch, generator=gen)))
    if real_patch is not None:
        arr = np.asarray(real_patch, dtype=np.float32)
        while arr.ndim > 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.shape != tuple(patch):
            raise ValueError(f"real_patch must have the bundle's patch size {tuple(patch)}, got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("real_patch has non-finite values")
        inputs.append(("real", torch.from_numpy(np.ascontiguousarray(arr))[None, None]))
    if not inputs:
        raise ValueError("nothing to verify: n_random is 0 and no real_patch was given")

    import onnx

    report = VerifyReport(onnx_path=onnx_path, precision=info.precision,
                          low_precision_heads=heads_below_fp32(onnx.load(str(onnx_path))))
    for source, x in inputs:
        ref = reference_outputs(net, x, bundle.model.k)
        got = dict(zip(ONNX_OUTPUTS, session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: x.numpy()}), strict=True))
        for name in ONNX_OUTPUTS:
            err = np.abs(got[name].astype(np.float64) - ref[name].astype(np.float64))
            report.checks.append(OutputCheck(
                output=name, source=source, max_abs_err=float(err.max()), mean_abs_err=float(err.mean()),
                dice=agreement(_mask(name, got[name]), _mask(name, ref[name])),
                tol_abs=float(tol.max_abs[name]), min_dice=tol.min_dice))
    report.seconds = time.perf_counter() - t0
    return report
