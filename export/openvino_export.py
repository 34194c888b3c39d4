"""OpenVINO IR from the verified ONNX graph; int8 by NNCF post-training quantisation, checked against fp32.

* fp32: `ov.convert_model` on the fp32 ONNX file `dtml export` has just verified against PyTorch, saved
  uncompressed (`compress_to_fp16=False`: OpenVINO would otherwise store fp16 weights), with dtml's
  metadata in the IR's runtime info.
* int8: `nncf.quantize` (full bias correction, first and output convolutions fp32: `quantize_int8`) on the
  fp32 IR with real windows of the calibration scans, prepared exactly as
  `dtml segment` prepares a scan (intensity policy, resampling to the model's spacing, padding to the
  patch) and taken at evenly spaced positions of the scan's default window grid, not only its centre.
  The int8 IR is then checked against the fp32 IR by segmenting every calibration scan with both (the
  whole `dtml segment` pipeline, LCC included): a case whose mask Dice falls below `min_agreement` makes
  the export fail, naming it, and nothing is written.

Both files of an IR (`.xml` and `.bin`) are written to temporary names and moved into place together.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.artifacts import EXPORT_INT8, ONNX_INPUT, openvino_metadata
from dtml_deploy.backends.signal_stack import kept_signal_stack
from dtml_deploy.bundle import Bundle
from dtml_deploy.engine.grid import GridSpec, pad_volume, window_starts
from dtml_deploy.errors import DtmlError
from dtml_deploy.intensity import prepare
from dtml_deploy.io.volume import read_volume
from dtml_deploy.metrics import agreement
from dtml_deploy.resample import resize, spacing_differs, target_shape
from dtml_deploy.segment import case_name
from dtml_export.formats import FORMATS, require_packages


class Int8Disagrees(DtmlError):
    """The int8 IR's masks fall below the stated agreement with the fp32 IR's on a calibration scan."""


@dataclass(frozen=True)
class CaseAgreement:
    """One calibration scan: Dice of the int8 IR's final mask with the fp32 IR's."""

    case: str
    dice: float
    windows: int


def bin_path(xml: Path) -> Path:
    """The weights file OpenVINO reads beside an IR: `model-int8.xml` -> `model-int8.bin`."""
    return Path(xml).with_suffix(".bin")


@contextlib.contextmanager
def _ir_tmp(out: Path) -> Iterator[Path]:
    """A temporary `.xml` name beside `out`; on success both files are moved into place (weights first,
    so the `.xml` never names missing weights), on failure both temporaries are removed."""
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.xml")
    try:
        yield tmp
        os.replace(bin_path(tmp), bin_path(out))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        bin_path(tmp).unlink(missing_ok=True)


def save_ir(model: Any, bundle: Bundle, out: Path, precision: str, opset: int,
            check: Callable[[Path], object] | None = None) -> Path:
    """Write `model` to `out` (+ its .bin) with dtml's metadata in its runtime info; `check`, when given,
    runs on the written temporary IR and keeps it from being moved into place by raising."""
    import openvino as ov

    for key, value in openvino_metadata(bundle, precision=precision, opset=opset).items():
        model.set_rt_info(value, ["dtml", key])
    with _ir_tmp(out) as tmp:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        if check is not None:
            check(tmp)
    return out


def convert_onnx(onnx_path: Path) -> Any:
    """The `ov.Model` of a dtml ONNX graph (its metadata is written again by `save_ir`)."""
    require_packages(FORMATS["openvino"])
    import openvino as ov

    return ov.convert_model(str(onnx_path))


def scan_windows(scan: Path, bundle: Bundle, n: int, intensity: str = "auto") -> list[np.ndarray]:
    """Up to `n` network inputs [1, 1, *patch] from `scan`, prepared as `dtml segment` prepares it and
    taken at evenly spaced positions of its default window grid (every window when it has <= n)."""
    vol = read_volume(scan, default_spacing=bundle.model.spacing)
    x, _ = prepare(vol.array, bundle.model.intensity, intensity, str(scan))  # type: ignore[arg-type]
    if vol.header is not None and spacing_differs(vol.spacing, bundle.model.spacing):
        x = resize(x, target_shape(x.shape, vol.spacing, bundle.model.spacing))
    patch = bundle.model.patch_size
    x, _ = pad_volume(x, patch)
    starts = window_starts(x.shape, patch, GridSpec())
    picks = sorted({round(i) for i in np.linspace(0, len(starts) - 1, min(n, len(starts)))})
    out = []
    for i in picks:
        s = starts[i]
        w = x[s[0]:s[0] + patch[0], s[1]:s[1] + patch[1], s[2]:s[2] + patch[2]]
        out.append(np.ascontiguousarray(w, np.float32)[None, None])
    return out


_CONVOLUTIONS = ("Convolution", "ConvolutionBackpropData")


def edge_convolutions(model: Any) -> list[str]:
    """The convolutions that read the image and those that write each output (through bias, sigmoid, tanh):
    one input channel and one output channel each, so they cost little in fp32, and int8 there rounds the
    raw intensities and the logits that the 0.5 threshold cuts (benchmarks/results/openvino_int8_variants_cpu.json)."""
    first = [op.get_friendly_name() for op in model.get_ordered_ops()
             if op.get_type_name() in _CONVOLUTIONS and op.input_value(0).get_node().get_type_name() == "Parameter"]
    last: list[str] = []
    for result in model.get_results():
        stack, seen = [result], set()
        while stack:
            node = stack.pop()
            if node.get_friendly_name() in seen:
                continue
            seen.add(node.get_friendly_name())
            if node.get_type_name() in _CONVOLUTIONS:
                last.append(node.get_friendly_name())
                continue
            stack.extend(node.input_value(i).get_node() for i in range(node.get_input_size()))
    return sorted(set(first + last))


def quantize_int8(model: Any, windows: list[np.ndarray]) -> Any:
    """NNCF post-training quantisation of an fp32 IR on `windows`: symmetric int8, the edge convolutions
    (`edge_convolutions`) kept fp32, and NNCF's full bias correction instead of its fast one. The full one
    corrects each layer's bias on the activations the already-quantised layers before it produce, so the
    rounding errors of ~50 layers do not add up along the network: on the windows of the eight hardest
    unlabeled scans it raised the worst scan's mask Dice with fp32 from 0.875 to 0.993 (mean 0.968 to 0.998,
    benchmarks/results/openvino_int8_variants_cpu.json), for about a minute more of export."""
    if not windows:
        raise ValueError(f"int8 quantisation needs calibration windows; `{EXPORT_INT8}`")
    require_packages(FORMATS["openvino"])
    import nncf

    dataset = nncf.Dataset(windows, lambda w: {ONNX_INPUT: w})
    keep = nncf.IgnoredScope(names=edge_convolutions(model))
    log = logging.getLogger("nncf")
    level = log.level
    log.setLevel(logging.WARNING)  # NNCF's INFO lines list every kept layer; dtml says what it kept, once
    try:
        with kept_signal_stack():  # NNCF compiles and drops OpenVINO models (dtml_deploy/backends/signal_stack.py)
            return nncf.quantize(model, dataset, subset_size=len(windows), ignored_scope=keep,
                                 fast_bias_correction=False)
    finally:
        log.setLevel(level)


def check_int8(bundle: Bundle, fp32: Path, int8: Path, scans: list[Path], min_agreement: float,
               echo: Callable[[str], None] = print) -> list[CaseAgreement]:
    """Segment every scan with both IRs; raise `Int8Disagrees` naming the worst case below `min_agreement`."""
    def segmenter(xml: Path) -> Any:
        from dtml_deploy.predictor import Predictor

        return Predictor.load(bundle, backend="openvino", artifact=xml, device="cpu", precision="fp32").segmenter

    ref, q = segmenter(fp32), segmenter(int8)
    results = []
    for scan in scans:
        vol = read_volume(scan, default_spacing=bundle.model.spacing)
        spacing = vol.spacing if vol.header is not None else None
        a = ref.segment_array(vol.array, spacing, case_name(scan))
        b = q.segment_array(vol.array, spacing, case_name(scan))
        results.append(CaseAgreement(case_name(scan), agreement(b.mask, a.mask), a.windows))
        plural = "" if a.windows == 1 else "s"
        echo(f"  int8 vs fp32 on {case_name(scan)}: mask Dice {results[-1].dice:.4f} ({a.windows} window{plural})")
    worst = min(results, key=lambda r: r.dice)
    if worst.dice < min_agreement:
        raise Int8Disagrees(f"int8 masks disagree with fp32 on {worst.case}: Dice {worst.dice:.4f} < "
                            f"{min_agreement} (--min-int8-agreement); nothing was written (calibrate on more "
                            f"scans, or export fp32 only with --openvino)")
    return results
