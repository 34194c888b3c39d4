"""The public Python API: one object holds a loaded model and its resolved settings.

    from dtml_deploy import Predictor
    p = Predictor.load()                                # the shipped model, default settings
    r = p.segment("scan.nii.gz")                        # or p.segment(array, affine=...) / spacing=(x, y, z)
    r.mask, r.prob, r.qc.score, r.qc.flagged            # numpy on the input's grid; the QC result
    r.save("out/")                                      # a folder, or the mask's file name

`dtml segment`, `dtml evaluate --model`, `dtml benchmark` and validation during training all stand on
this class, so a script and the command cannot disagree. It never prints: the batch reports through a
`SegmentEvents` object the caller passes (the CLI draws progress bars with it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.backends.base import Backend, create_backend
from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import BackendUnavailable, InputError
from dtml_deploy.io.outputs import RunPlan
from dtml_deploy.io.volume import Volume
from dtml_deploy.protocol import PROTOCOL_SETTINGS, resolve_protocol
from dtml_deploy.qc import QCResult
from dtml_deploy.ranks import Ranks, ShardSettings
from dtml_deploy.segment import CaseReport, Segmentation, Segmenter, fill_report
from dtml_deploy.settings import ROUTES, PredictorSettings, artifact_from_folder, engine_for

DEFAULT_MODEL = Path(__file__).parent / "default_model"
# Makes the ONNX graph a run without an artifact needs: (bundle, bundle folder, precision) -> its path.
Exporter = Callable[[Bundle, Path, str], Path]
EXPORTER_ENTRY_POINT = ("dtml.exporters", "onnx")  # where an installed dtml names its exporter


class SegmentEvents:
    """What a batch tells its caller; every method is a no-op here (subclass what you show)."""

    def case_started(self, index: int, name: str) -> None:
        """Case `index` (its readable `name`) begins on this rank."""

    def windows(self, index: int, done: int, total: int) -> None:
        """Case `index` has run `done` of its `total` windows."""

    def case_finished(self, index: int, name: str, report: CaseReport) -> None:
        """A case's report (rank 0 only, for every rank's cases, in the order they arrive)."""

    def batch_finished(self, stopped: str | None, ranks: int, unfinished: int) -> None:
        """Rank 0, at the end: why the job stopped early (None: it did not), how many ranks took part, how
        many cases were not segmented because it stopped."""


@dataclass
class Prediction:
    """One segmented scan: arrays on the input's grid, its QC and its report; `save` writes it."""

    volume: Volume
    segmentation: Segmentation
    report: dict[str, Any]
    _segmenter: Segmenter = field(repr=False)

    @property
    def mask(self) -> np.ndarray:
        return self.segmentation.mask

    @property
    def prob(self) -> np.ndarray | None:
        return self.segmentation.prob

    @property
    def sdm(self) -> np.ndarray | None:
        return self.segmentation.sdm

    @property
    def uncertainty(self) -> np.ndarray | None:
        return self.segmentation.uncertainty

    @property
    def qc(self) -> QCResult | None:
        return self.segmentation.qc

    def save(self, out: str | Path, overwrite: bool = False) -> list[Path]:
        """Write the mask (in the input's family), the maps the settings keep and the preview into the
        folder `out`, or the mask as the file `out` (by its suffix); returns the written paths."""
        paths = self._segmenter.output_paths(self.volume, Path(out), overwrite)
        report = CaseReport(input=str(self.volume.path), status="failed")
        self._segmenter.save(self.volume, self.segmentation, paths, report, overwrite=overwrite)
        self.report = report.to_dict()
        return list(paths.values())


class Predictor:
    """A bundle, a backend and the resolved settings, ready to segment scans, arrays and batches."""

    def __init__(self, bundle: Bundle, settings: PredictorSettings, model: Path | None = None,
                 ranks: Ranks = Ranks(), backend: Backend | None = None) -> None:
        """`settings` must be resolved for `bundle` (`PredictorSettings.resolve`); use `Predictor.load`.
        `backend`: one already made for these settings (a server's backend shared by its jobs)."""
        self.bundle, self.settings, self.model, self.ranks = bundle, settings, model, ranks
        self.chosen = ""  # which model of an export folder runs and why (Predictor.load); '' otherwise
        if backend is None:
            backend = create_backend(settings.backend, bundle, settings.runtime, settings.engine.channels)
        self.segmenter = Segmenter(bundle, backend, settings.segment)

    @classmethod
    def load(cls, model: str | Path | Bundle | None = None, settings: PredictorSettings | None = None, *,
             ranks: Ranks = Ranks(), exporter: Exporter | None = None, **given: Any) -> Predictor:
        """Load a bundle folder (None: the shipped model; or a `Bundle` in memory) with `settings`, or with
        keyword settings named as `PredictorSettings`' fields (`backend=`, `device=`, `precision=`,
        `head=`, `tta=`, `protocol=`, ...). The settings are resolved once, here. `--backend onnx` without
        an artifact uses `exporter` (default: the installed exporter) to find or make the graph."""
        if settings is not None and given:
            raise ValueError("pass settings= or keyword settings, not both")
        settings = settings or PredictorSettings.build(**given)
        if isinstance(model, Bundle):
            bundle, folder = model, None
        else:
            folder = Path(model) if model is not None else default_model()
            bundle = Bundle.load(folder)
        settings, chosen = artifact_from_folder(settings, ranks)
        settings = settings.resolve(bundle, ranks)
        if settings.backend == "onnx" and settings.runtime.artifact is None:
            if folder is None:
                raise BackendUnavailable("--backend onnx with a bundle in memory needs an artifact (an .onnx)")
            graph = (exporter or installed_exporter())(bundle, folder, str(settings.runtime.precision))
            settings = replace(settings, runtime=replace(settings.runtime, artifact=graph))
        predictor = cls(bundle, settings, folder, ranks)
        predictor.chosen = chosen
        return predictor

    def with_settings(self, **given: Any) -> Predictor:
        """A Predictor on this one's loaded backend with other segmentation settings (`head=`, `tta=`,
        `overlap=`, `keep_prob=`, `preview=`, `output_format=`, ...): what a server gives each job. What
        the backend was made with (backend, device, precision, batch, artifact, protocol) stays; a setting
        that needs a network output this backend does not compute is refused."""
        fixed = sorted(k for k in given if k in ("backend", "protocol") or ROUTES.get(k) == ("runtime",))
        if fixed:
            raise ValueError(f"{fixed[0]} is fixed when the model is loaded; load another Predictor to change it")
        given = {k: v for k, v in given.items() if v is not None}
        resolve_protocol(self.settings.protocol, **{k: given[k] for k in PROTOCOL_SETTINGS if k in given})
        settings = self.settings.with_values(**given)
        settings = replace(settings, segment=replace(settings.segment, engine=engine_for(settings.engine,
                                                                                         self.bundle)))
        backend = self.segmenter.backend
        missing = [c for c in settings.engine.channels if c not in backend.outputs]
        if missing:
            raise ValueError(f"these settings need the network outputs {missing}, which this model was not "
                             f"loaded to compute; load it with them")
        return Predictor(self.bundle, settings, self.model, self.ranks, backend)

    def describe(self) -> str:
        """What actually runs (backend, device, precision, batch, extras)."""
        return self.segmenter.backend.describe()

    def segment(self, source: str | Path | np.ndarray, *, affine: np.ndarray | None = None,
                spacing: Sequence[float] | None = None, name: str = "image",
                progress: Callable[[int, int], None] | None = None) -> Prediction:
        """Segment a scan file or folder (any input `dtml segment` takes) or a 3D array given with its
        `affine` (4x4, voxel -> mm) or `spacing` (mm per voxel, in the array's axis order)."""
        if isinstance(source, np.ndarray):
            vol = array_volume(source, affine, spacing, name)
        else:
            if affine is not None or spacing is not None:
                raise ValueError("affine= and spacing= go with an array; a file carries its own geometry")
            vol = self.segmenter.read(Path(source))
        seg = self.segmenter.segment_volume(vol, progress)
        report = CaseReport(input=str(vol.path), status="ok")
        fill_report(report, vol, seg)
        return Prediction(vol, seg, report.to_dict(), self.segmenter)

    def segment_files(self, inputs: Sequence[str | Path], output_dir: str | Path, overwrite: bool = False,
                      progress: SegmentEvents | None = None,
                      shard: ShardSettings = ShardSettings()) -> list[CaseReport] | None:
        """Segment every input into `output_dir` (or the one file it names); a failing case becomes a
        'failed' report and the rest go on. Under torchrun the cases are shared among the ranks: rank 0
        returns every report in input order, the other ranks None."""
        from dtml_deploy.batch import segment_batch

        return segment_batch(self, [Path(p) for p in inputs], Path(output_dir), overwrite,
                             progress or SegmentEvents(), shard)

    def plan(self, inputs: Sequence[str | Path], output_dir: str | Path) -> RunPlan:
        """The outputs `segment_files` would write, laid out without any work (colliding paths refused)."""
        from dtml_deploy.batch import plan_outputs

        return plan_outputs(self.segmenter, [Path(p) for p in inputs], Path(output_dir))

    def record(self) -> dict[str, Any]:
        """What a report says ran: backend, model, bundle hash and the engine's settings."""
        eng, opts = self.settings.engine, self.settings.segment
        return {"backend": self.describe(), "model": str(self.model), "bundle_hash": self.bundle.content_hash,
                "engine": {"protocol": self.settings.protocol,
                           "overlap": None if eng.grid.stride is not None else eng.grid.overlap,
                           "stride": eng.grid.stride, "blend": eng.blend, "head": eng.head,
                           "batch": self.settings.runtime.batch, "lcc": opts.lcc, "tta": eng.tta,
                           "precision": self.settings.runtime.precision}}


def default_model() -> Path:
    """The shipped model's folder (a one-line error when this copy has none)."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise InputError("no default model is installed with this copy of dtml; pass --model BUNDLE_DIR")
    return DEFAULT_MODEL


def installed_exporter() -> Exporter:
    """The exporter an installed dtml declares (entry point `dtml.exporters: onnx`), found at run time so
    the core never imports export/."""
    from importlib.metadata import entry_points

    group, name = EXPORTER_ENTRY_POINT
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        raise BackendUnavailable("--backend onnx without --artifact needs dtml's exporter, which is not installed "
                                 "here; pass an .onnx as the artifact, or pip install 'dtml[onnx]'")
    return found[0].load()


def array_volume(array: np.ndarray, affine: np.ndarray | None, spacing: Sequence[float] | None,
                 name: str) -> Volume:
    """A Volume for an in-memory array, its geometry from `affine` or `spacing` (exactly one)."""
    from dtml_deploy.io.geometry import check_affine, check_spacing

    if (affine is None) == (spacing is None):
        raise InputError(f"{name}: give the array's geometry as affine= or spacing= (one of them)")
    data = np.asarray(array)
    if data.ndim != 3 or min(data.shape) < 1:
        raise InputError(f"{name}: expected a 3D array, got shape {tuple(data.shape)}")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise InputError(f"{name}: expected a real-valued array, got dtype {data.dtype}")
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise InputError(f"{name}: affine must be 4x4, got shape {affine.shape}")
        check_affine(affine, name)
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    vox = check_spacing(tuple(spacing), name, "spacing=")  # type: ignore[arg-type]
    if affine is None:
        affine = np.diag([*vox, 1.0])
    image = data.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise InputError(f"{name}: the array has non-finite values (NaN or inf)")
    return Volume(image, vox, affine, Path(name), source_shape=tuple(data.shape))
