"""The one place the service calls into inference: the model loaded once, a job's scan segmented into its
folder, through the `dtml_deploy.Predictor` every command stands on.

The backend is wrapped once in the cross-job batcher (batching.py); each job gets a light `Segmenter` on
that shared backend with the server's settings and the job's own options (JOB_OPTIONS, through
`Predictor.with_settings`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dtml_deploy.engine.blending import BLENDS
from dtml_deploy.engine.sliding import HEADS
from dtml_deploy.errors import InputError, first_line
from dtml_deploy.io.formats import OUTPUT_FORMATS
from dtml_deploy.predictor import Predictor
from dtml_deploy.segment import CaseReport, Segmenter
from dtml_deploy.serve.batching import SharedBackend, WindowBatcher

# Options a job may set (form fields or JSON "options"), as the PredictorSettings field each sets and the
# values it takes (a tuple of choices, or a type). Those that would change the networks' outputs or the
# device are the server's (`dtml serve` options), fixed for every job.
JOB_OPTIONS: dict[str, tuple[str, Any]] = {
    "head": ("head", HEADS), "blend": ("blend", BLENDS), "format": ("output_format", OUTPUT_FORMATS),
    "overlap": ("overlap", float), "tta": ("tta", bool), "lcc": ("lcc", bool), "preview": ("preview", bool),
    "save_prob": ("keep_prob", bool), "save_sdm": ("keep_sdm", bool), "save_uncertainty": ("keep_uncertainty", bool),
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
    """A job's options as PredictorSettings fields; an unknown name or bad value is one line."""
    out = {}
    for name, raw in given.items():
        if name not in JOB_OPTIONS:
            raise InputError(f"unknown option {name!r}; a job may set {', '.join(JOB_OPTIONS)}")
        field_name, kind = JOB_OPTIONS[name]
        out[field_name] = _parse(name, kind, raw)
    return out


class Model:
    """A bundle loaded once with the server's settings; its backend runs windows of all jobs together."""

    def __init__(self, predictor: Predictor) -> None:
        self.bundle = predictor.bundle
        self.batcher = WindowBatcher(predictor.segmenter.backend)
        self.backend = SharedBackend(self.batcher)
        self.predictor = Predictor(predictor.bundle, predictor.settings, predictor.model, backend=self.backend)
        self.segmenter({})  # the server's own settings must make a segmenter: fail at start, not per job

    def describe(self) -> str:
        return self.backend.describe()

    def segmenter(self, options: Mapping[str, Any]) -> Segmenter:
        """A segmenter on the shared backend with the server's settings changed by a job's `options`
        (PredictorSettings fields, as parse_job_options gives)."""
        try:
            return self.predictor.with_settings(**options).segmenter
        except ValueError as e:
            if "network outputs" in str(e):
                raise InputError(f"{first_line(e)}; start `dtml serve` with them") from None
            raise

    def segment(self, scan: Path, out_dir: Path, options: Mapping[str, Any],
                progress: Callable[[int, int], None] | None = None) -> CaseReport:
        """Segment one scan into `out_dir` (as `dtml segment -o out_dir` would); failures are in the report."""
        try:
            segmenter = self.segmenter(options)
        except (InputError, ValueError) as e:
            return CaseReport(input=str(scan), status="failed", error=first_line(e, limit=10_000))
        return segmenter.segment_file(scan, out_dir, overwrite=False, progress=progress)

    def close(self) -> None:
        self.batcher.close()
