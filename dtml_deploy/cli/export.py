"""`dtml export`: a bundle to verified ONNX and, with --trt, a TensorRT engine; with --openvino an OpenVINO IR
(and with --int8 an int8 IR checked against it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dtml_deploy.cli.common import ModelOpt, PrecisionName, bundle_path, default_of, user_errors
from dtml_export.pipeline import ExportRequest

ONNX_PRECISIONS = ("fp32", "fp16")


def _default(name: str) -> Any:
    """An ExportRequest field's default (the one home of the export's defaults)."""
    return default_of(ExportRequest, name)


def _calibration_scans(items: list[str], expand: Any) -> tuple[Path, ...]:
    """--calibration values expanded as `segment` expands its inputs; one that finds nothing is refused."""
    scans: list[Path] = []
    for item in items:
        found = expand([item])
        if not found:
            raise ValueError(f"--calibration {item}: matches no scan")
        scans.extend(found)
    return tuple(scans)


def export_cmd(
    model: ModelOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the artifacts")] = Path("dtml-export"),
    precision: Annotated[list[PrecisionName] | None, typer.Option(
        help="ONNX precision(s) to export: fp32 and/or fp16 (repeat the option)")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = _default("opset"),
    dynamic_spatial: Annotated[bool, typer.Option(help="Dynamic spatial axes (default: fixed to the patch)")]
        = _default("dynamic_spatial"),
    verify: Annotated[bool, typer.Option(help="Check onnxruntime against PyTorch; fail beyond tolerance")]
        = _default("verify"),
    real_case: Annotated[Path | None, typer.Option(help="A real scan whose central patch joins the check")]
        = _default("real_case"),
    trt: Annotated[bool, typer.Option("--trt", help="Also build a TensorRT engine (needs tensorrt and a GPU)")]
        = _default("trt"),
    trt_precision: Annotated[PrecisionName, typer.Option(
        help="TensorRT engine precision (fp16 or fp32)")] = PrecisionName("fp16" if _default("trt_fp16") else "fp32"),
    min_batch: Annotated[int, typer.Option(help="TensorRT profile: smallest batch")] = _default("min_batch"),
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile: batch to optimise for")] = _default("opt_batch"),
    max_batch: Annotated[int, typer.Option(help="TensorRT profile: largest batch")] = _default("max_batch"),
    workspace_gb: Annotated[float, typer.Option(help="TensorRT builder workspace limit (GB)")]
        = _default("workspace_gb"),
    timing_cache: Annotated[Path | None, typer.Option(
        help="TensorRT timing cache file, reused across builds")] = _default("timing_cache"),
    openvino: Annotated[bool, typer.Option("--openvino", help="Also write the OpenVINO IR model-fp32.xml/.bin "
                                           "(needs dtml[openvino])")] = _default("openvino"),
    int8: Annotated[bool, typer.Option("--int8", help="Also quantise to model-int8.xml/.bin with NNCF (implies "
                                       "--openvino; needs --calibration)")] = _default("int8"),
    calibration: Annotated[list[str] | None, typer.Option(
        help="Real scans that calibrate --int8 and check it against fp32: files, folders or globs as segment "
             "takes (repeat the option)")] = None,
    calibration_cases: Annotated[int, typer.Option(help="Use at most this many calibration scans")]
        = _default("calibration_cases"),
    calibration_windows: Annotated[int, typer.Option(help="Windows per calibration scan, spread over its grid")]
        = _default("calibration_windows"),
    min_int8_agreement: Annotated[float, typer.Option(
        help="Refuse the int8 model when a calibration scan's mask Dice with fp32 falls below this")]
        = _default("min_int8_agreement"),
    measure: Annotated[bool, typer.Option(help="With --openvino: time the folder's CPU models beside torch here "
                                          "(speed.json, which --backend auto ranks them by)")] = _default("measure"),
) -> None:
    """Export a bundle to verified ONNX (fp32/fp16); --trt adds a TensorRT engine + sidecar, --openvino an
    OpenVINO IR, --int8 an int8 IR quantised on real scans and checked against fp32."""
    with user_errors():
        from dtml_deploy.cli.segment import expand_inputs
        from dtml_export.pipeline import run_export

        if trt_precision.value not in ONNX_PRECISIONS:
            raise ValueError("--trt-precision must be fp16 or fp32")
        precisions = tuple(p.value for p in precision) if precision else _default("precisions")
        if any(p not in ONNX_PRECISIONS for p in precisions):
            raise ValueError("ONNX export supports fp32 and fp16")
        req = ExportRequest(bundle=bundle_path(model), out_dir=output, precisions=precisions, opset=opset,
                            dynamic_spatial=dynamic_spatial, verify=verify, real_case=real_case, trt=trt,
                            trt_fp16=trt_precision.value == "fp16", min_batch=min_batch, opt_batch=opt_batch,
                            max_batch=max_batch, workspace_gb=workspace_gb, timing_cache=timing_cache,
                            openvino=openvino, int8=int8,
                            calibration=_calibration_scans(calibration or [], expand_inputs),
                            calibration_cases=calibration_cases, calibration_windows=calibration_windows,
                            min_int8_agreement=min_int8_agreement, measure=measure)
        run_export(req, typer.echo)
