"""`dtml benchmark`: every backend and precision timed side by side, with its agreement with torch fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dtml_deploy.cli.common import (
    DeviceOpt,
    ModelOpt,
    ProgressOpt,
    bundle_path,
    default_of,
    fail,
    progress_echo,
    require_viz,
    user_errors,
)
from dtml_export.benchmark import BenchmarkRequest


def _default(name: str) -> Any:
    """A BenchmarkRequest field's default."""
    return default_of(BenchmarkRequest, name)


def batch_values(values: list[str] | None) -> tuple[int, ...]:
    """`--batch 1 --batch 2` and `--batch 1,2` alike."""
    out = []
    for item in values or []:
        for part in item.split(","):
            if not part.strip().isdigit():
                raise ValueError(f"--batch takes whole numbers (repeat it or comma-separate), got {part!r}")
            out.append(int(part))
    return tuple(out)


def benchmark(
    model: ModelOpt = None,
    data: Annotated[list[Path] | None, typer.Option(
        help="Real scan(s) to time; the first also measures agreement (repeat the option; default: a random "
             "144x128x88 volume, agreement not measured)")] = None,
    device: DeviceOpt = _default("device"),
    batch: Annotated[list[str] | None, typer.Option(
        help="Batch sizes to time, repeated or comma-separated (default: 1,2,4 on CPU, 1,8,16 on CUDA; "
             "1 is always timed)")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per batch size (the median is reported)")]
        = _default("repeats"),
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing")] = _default("warmup"),
    json_out: Annotated[Path | None, typer.Option("--json", help="Write machine, request and rows as JSON")] = None,
    min_dice: Annotated[float | None, typer.Option(
        help="Exit 1 when a row's agreement with torch fp32 is below this (CI; needs --data). "
             "Without it, rows below 0.99 are marked but the exit code is 0")] = _default("min_dice"),
    formats: Annotated[str | None, typer.Option(
        help="Comma-separated rows to run (default: all that exist here; torch-compiled only on CUDA): "
             "torch-fp32, torch-bf16, torch-fp16, torch-fp16-graphs, torch-compiled, onnx-fp32, onnx-fp16, "
             "trt-fp16, openvino-fp32, openvino-int8")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Folder for exported artifacts (default: a temporary folder, removed)")]
        = _default("workdir"),
    plot: Annotated[str | None, typer.Option(
        help="Also draw the table as a chart (ms per window, Mvox/s) into this PNG, or into a folder as "
             "benchmark.png (needs dtml[viz])")] = None,
    progress: ProgressOpt = True,
) -> None:
    """Time every backend and precision side by side, with each one's agreement with torch fp32."""
    with user_errors():
        from dtml_deploy.io.reports import BENCHMARK_JSON, PICTURE, check_distinct, check_report_target, picture_target
        from dtml_export import benchmark as bench

        chart = None if plot is None else picture_target(plot, "benchmark.png")
        check_distinct([(json_out, "--json"), (chart, "--plot")])
        if json_out is not None:  # refused before minutes of timing, not after
            check_report_target(json_out, BENCHMARK_JSON)
        if chart is not None:
            check_report_target(chart, PICTURE, what="the chart")
            require_viz("--plot")
        req = BenchmarkRequest(
            bundle=bundle_path(model), data=tuple(data or ()), device=device, batches=batch_values(batch),
            repeats=repeats, warmup=warmup, min_dice=min_dice, formats=bench.parse_formats(formats), workdir=output)
        report = bench.run_benchmark(req, progress_echo(progress))
        typer.echo(bench.format_report(report))
        if bench.nothing_timed(report):  # a benchmark that timed nothing is a failure, not a report
            raise fail(str(bench.nothing_timed(report)), 1)
        if json_out is not None:
            bench.write_json(report, json_out)
        if plot is not None:
            from dtml_deploy.viz.bench_plot import write_benchmark_plot

            write_benchmark_plot(report.to_dict(), chart)
    if min_dice is not None:
        low = bench.below_min_dice(report, min_dice)
        if low:
            raise fail(f"agreement with torch fp32 below --min-dice {min_dice}: {', '.join(low)}", 1)
