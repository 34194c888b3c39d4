"""Every option's default is its core default: walk each command's click parameters and compare them
with the dataclass field the option sets. An option that sets no core field must be listed as such."""

from __future__ import annotations

from dataclasses import fields
from enum import Enum
from typing import Any

import pytest
import typer.main

from dtml_deploy.backends.base import BackendOptions
from dtml_deploy.cli import app
from dtml_deploy.cli.common import FLAG_NAMES
from dtml_deploy.cli.segment import SegmentJob
from dtml_deploy.engine.grid import GridSpec
from dtml_deploy.engine.sliding import EngineConfig
from dtml_deploy.limits import WorkLimits
from dtml_deploy.protocol import DTML, InferenceProtocol
from dtml_deploy.ranks import ShardSettings
from dtml_deploy.segment import SegmentOptions
from dtml_deploy.serve.settings import ServeSettings
from dtml_deploy.settings import ROUTES, PredictorSettings
from dtml_export.benchmark import BenchmarkRequest
from dtml_export.pipeline import ExportRequest
from dtml_training.config import NOT_OPTIONS, OPTION_HELP, TrainConfig
from dtml_training.losses import ConsistencyConfig

# (core class, field) each option sets, per command; the option name when it differs from the field.
# Each option sets the field of that name (or of its FLAG_NAMES name) in the one part of the settings tree
# that owns it (PredictorSettings' routes).
_PART = {("segment",): SegmentOptions, ("segment", "engine"): EngineConfig, ("segment", "engine", "grid"): GridSpec,
         ("segment", "limits"): WorkLimits, ("runtime",): BackendOptions}
_OPTIONS = ("backend", "artifact", "device", "precision", "overlap", "stride", "batch", "blend", "head", "tta", "qc",
            "lcc", "resample", "intensity", "save_prob", "save_sdm", "save_uncertainty", "output_format", "preview",
            "compile", "cuda_graphs", "cudnn_fusion", "spacing", "max_windows")
_SEGMENT = {o: (PredictorSettings, o) if o == "backend" else (_PART[ROUTES[FLAG_NAMES.get(o, o)]], FLAG_NAMES.get(o, o))
            for o in _OPTIONS}
_SEGMENT["protocol"] = (InferenceProtocol, "name")  # the default protocol: DTML (its fields below)
# Settings a protocol fixes: the option's default is None ("the protocol's"), and the default protocol's
# value must be the core default of the setting.
PROTOCOL_SET = {f.name for f in fields(InferenceProtocol)} - {"name"}
_JOB = {"overwrite": (SegmentJob, "overwrite"), "json_report": (SegmentJob, "json_report"),
        "progress": (SegmentJob, "progress"), "rank_timeout": (ShardSettings, "stall_timeout_s")}
CORE: dict[str, dict[str, tuple[type, str]]] = {
    "segment": {**_SEGMENT, **_JOB},
    "evaluate": {**{k: v for k, v in _SEGMENT.items() if k not in ("qc", "save_prob", "save_sdm", "save_uncertainty",
                                                                  "output_format", "preview", "compile",
                                                                  "cuda_graphs", "cudnn_fusion")},
                 "rank_timeout": (ShardSettings, "stall_timeout_s")},
    "export": {f.name: (ExportRequest, f.name) for f in fields(ExportRequest)
               if f.name not in ("bundle", "out_dir", "precisions", "trt_fp16", "calibration")},
    "serve": {**_SEGMENT,
              **{f.name: (ServeSettings, f.name) for f in fields(ServeSettings)
                 if f.name in ("host", "port", "token_file", "workers", "queue", "max_upload_mb", "store")},
              "drain_seconds": (ServeSettings, "drain_s")},
    "benchmark": {"device": (BenchmarkRequest, "device"), "repeats": (BenchmarkRequest, "repeats"),
                  "warmup": (BenchmarkRequest, "warmup"), "min_dice": (BenchmarkRequest, "min_dice"),
                  "output": (BenchmarkRequest, "workdir")},
}
# Options that set no core field (paths, report files, switches of the command itself), per command.
CLI_ONLY = {
    "segment": {"inputs", "output", "model", "dicomweb", "study", "series", "store"},
    "serve": {"model", "retention_hours"},  # retention_hours: ServeSettings.retention_s in hours (tested below)
    "evaluate": {"pred_dir", "gt_dir", "model", "data", "labels", "cases", "json_out", "csv_out", "report",
                 "ignore_geometry", "progress"},
    "export": {"model", "output", "precision", "trt_precision", "calibration"},  # calibration: globs -> scans
    "benchmark": {"model", "data", "batch", "json_out", "formats", "plot", "progress"},
    "plot": {"run_dir", "output"},
    "train": {"data", "out", "labels", "case_list", "resume", "overwrite", "progress", "tensorboard"},
}


def _commands() -> dict[str, Any]:
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def _default_of(cls: type, name: str) -> Any:
    (f,) = [f for f in fields(cls) if f.name == name]
    return f.default


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    return tuple(value) if isinstance(value, list) else value


@pytest.mark.parametrize("command", sorted(CLI_ONLY))
def test_every_option_default_is_its_core_default(command: str) -> None:
    params = {p.name: p for p in _commands()[command].params}
    if command == "train":
        core = {name: (TrainConfig if name in {f.name for f in fields(TrainConfig)} else ConsistencyConfig, name)
                for name in OPTION_HELP}
        core["recipe"] = (TrainConfig, "recipe")
    else:
        core = CORE.get(command, {})
    assert set(params) == set(core) | CLI_ONLY[command], "an option is neither a core field nor listed CLI-only"
    for name, (cls, field_name) in core.items():
        expected = DTML.name if cls is InferenceProtocol else _default_of(cls, field_name)
        got = _plain(params[name].default)
        if command != "train" and name in PROTOCOL_SET:
            assert got is None, f"{command} --{name}: the protocol sets it"
            assert getattr(DTML, name) == expected, f"the dtml protocol's {name} is not the core default"
            continue
        if command == "train" and name != "recipe":
            # None keeps the recipe's value; --help shows the core default (the dtml recipe's)
            assert got is None, name
            shown = params[name].show_default
            text = " ".join(map(str, expected)) if isinstance(expected, tuple) else str(expected)
            if isinstance(expected, bool):
                text = ("" if expected else "no-") + name.replace("_", "-")
            assert shown is False if expected is None else str(shown).endswith(text), (name, shown, expected)
        else:
            assert got == expected, f"{command} --{name.replace('_', '-')}: {got!r} != {cls.__name__}.{field_name}"


def test_serve_retention_default_is_the_core_one_in_hours() -> None:
    params = {p.name: p for p in _commands()["serve"].params}
    assert params["retention_hours"].default * 3600 == _default_of(ServeSettings, "retention_s")


def test_export_trt_precision_default_follows_the_request() -> None:
    params = {p.name: p for p in _commands()["export"].params}
    fp16 = _default_of(ExportRequest, "trt_fp16")
    assert _plain(params["trt_precision"].default) == ("fp16" if fp16 else "fp32")


def test_every_train_config_field_is_an_option_or_set_by_the_recipe() -> None:
    train_fields = {f.name for f in fields(TrainConfig)}
    consistency_fields = {f.name for f in fields(ConsistencyConfig)}
    assert set(OPTION_HELP) == (train_fields - set(NOT_OPTIONS)) | consistency_fields
    assert set(NOT_OPTIONS) <= train_fields


def test_choices_are_the_core_tuples() -> None:
    from dtml_deploy.backends.base import BACKENDS, PRECISIONS
    from dtml_deploy.engine.blending import BLENDS
    from dtml_deploy.engine.sliding import HEADS
    from dtml_deploy.intensity import POLICIES
    from dtml_deploy.io.formats import OUTPUT_FORMATS
    from dtml_training.recipes import RECIPES

    seg = {p.name: p for p in _commands()["segment"].params}
    expect = {"backend": BACKENDS, "precision": PRECISIONS, "blend": BLENDS, "head": HEADS, "intensity": POLICIES,
              "output_format": OUTPUT_FORMATS}
    for name, values in expect.items():
        assert _choices(seg[name]) == values, name
    train = {p.name: p for p in _commands()["train"].params}
    assert _choices(train["recipe"]) == tuple(RECIPES)


def _choices(param: Any) -> tuple[str, ...]:
    """The values an enum option accepts (typer keeps the enum on the parameter's type descriptor)."""
    return tuple(m.value for m in param.type_descriptor.annotation)
