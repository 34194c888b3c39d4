"""The one place the service calls into inference: the model loaded once, a job's scan segmented into its
folder. (When `dtml_deploy.Predictor` lands, this module is the one to switch to it.)

The backend is wrapped once in the cross-job batcher (batching.py); each job gets a light `Segmenter` on
that shared backend with the server's settings and the job's own options (JOB_OPTIONS).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from dtml_deploy.bundle import Bundle
from dtml_deploy.engine.blending import BLENDS
from dtml_deploy.engine.sliding import HEADS
from dtml_deploy.errors import InputError
from dtml_deploy.io.formats import OUTPUT_FORMATS
from dtml_deploy.limits import WorkLimits
from dtml_deploy.runner import InferenceSettings, build_segmenter, engine_config
from dtml_deploy.segment import CaseReport, Segmenter, SegmentOptions
from dtml_deploy.serve.batching import SharedBackend, WindowBatcher

# Options a job may set (form fields or JSON "options"), as the InferenceSettings field each sets and the
# values it takes (a tuple of choices, or a type). Those that would change the networks' outputs or the
# device are the server's (`dtml serve` options), fixed for every job.
JOB_OPTIONS: dict[str, tuple[str, Any]] = {
    "head": ("head", HEADS), "blend": ("blend", BLENDS), "format": ("output_format", OUTPUT_FORMATS),
    "overlap": ("overlap", float), "tta": ("tta", bool), "lcc": ("lcc", bool), "preview": ("preview", bool),
    "save_prob": ("save_prob", bool), "save_sdm": ("save_sdm", bool), "save_uncertainty": ("save_uncertainty", bool),
}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse(name: str, kind: Any, raw: Any) -> Any:
    text = str(raw).strip().lower() if not isinstance(raw, bool) else raw
    if isinstance(kind, tuple):
        if text not in kind:
            raise InputError(f"option {name}={raw!r}: choose from {', '.join(kind)}")
        return text
    if kind is bool:
        if isinstance(text, bool):
            return text
        if text in _TRUE + _FALSE:
            return text in _TRUE
        raise InputError(f"option {name}={raw!r}: give true or false")
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise InputError(f"option {name}={raw!r}: not a number") from None


def parse_job_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """A job's options as InferenceSettings fields; an unknown name or bad value is one line."""
    out = {}
    for name, raw in given.items():
        if name not in JOB_OPTIONS:
            raise InputError(f"unknown option {name!r}; a job may set {', '.join(JOB_OPTIONS)}")
        field_name, kind = JOB_OPTIONS[name]
        out[field_name] = _parse(name, kind, raw)
    return out


class Model:
    """A bundle loaded once with the server's settings; its backend runs windows of all jobs together."""

    def __init__(self, settings: InferenceSettings, bundle: Bundle) -> None:
        core = build_segmenter(settings, bundle)
        self.settings, self.bundle = settings, bundle
        self.batcher = WindowBatcher(core.backend)
        self.backend = SharedBackend(self.batcher)
        self.segmenter({})  # the server's own settings must make a segmenter: fail at start, not per job

    def describe(self) -> str:
        return self.backend.describe()

    def segmenter(self, options: Mapping[str, Any]) -> Segmenter:
        """A segmenter on the shared backend with the server's settings changed by a job's `options`
        (InferenceSettings fields, as parse_job_options gives)."""
        req = replace(self.settings, **options)
        engine = engine_config(req, self.bundle)
        missing = [c for c in engine.channels if c not in self.backend.outputs]
        if missing:
            raise InputError(f"these options need the network outputs {missing}, which this server does not "
                             f"compute; start `dtml serve` with them")
        limits = WorkLimits() if req.max_windows is None else WorkLimits(max_windows=req.max_windows)
        return Segmenter(self.bundle, self.backend, SegmentOptions(
            engine=engine, lcc=req.lcc, resample=req.resample, intensity=req.intensity,  # type: ignore[arg-type]
            limits=limits, spacing=req.spacing, output_format=req.output_format, preview=req.preview))

    def segment(self, scan: Path, out_dir: Path, options: Mapping[str, Any],
                progress: Callable[[int, int], None] | None = None) -> CaseReport:
        """Segment one scan into `out_dir` (as `dtml segment -o out_dir` would); failures are in the report."""
        try:
            segmenter = self.segmenter(options)
        except (InputError, ValueError) as e:
            return CaseReport(input=str(scan), status="failed", error=str(e).splitlines()[0])
        return segmenter.segment_file(scan, out_dir, overwrite=False, progress=progress)

    def close(self) -> None:
        self.batcher.close()
