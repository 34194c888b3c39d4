"""Segment scans with a bundle: read -> normalise -> (resample) -> fused engine -> LCC -> write.

`Segmenter.segment_array` works on arrays (used by evaluation and benchmarks); `segment_file`
adds I/O, atomic writes and a per-case report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.backends.base import Backend
from dtml_deploy.bundle import Bundle
from dtml_deploy.engine.grid import window_count
from dtml_deploy.engine.postprocess import largest_component
from dtml_deploy.engine.sliding import EngineConfig, SlidingWindowEngine
from dtml_deploy.errors import DtmlError, InputError, first_line
from dtml_deploy.fov import cropped_scan_warning
from dtml_deploy.intensity import Policy, prepare
from dtml_deploy.io.formats import input_family
from dtml_deploy.io.outputs import MAPS, Leftovers, OutputSpec, case_outputs, check_free, output_is_file
from dtml_deploy.io.volume import Volume, read_volume, write_all_like
from dtml_deploy.limits import WorkLimits, case_bytes, check_memory, check_voxels, check_windows, seconds_per_window
from dtml_deploy.qc import QCResult, assess, reference_of
from dtml_deploy.resample import resize, spacing_differs, target_shape

__all__ = ["CaseReport", "SegmentOptions", "Segmentation", "Segmenter", "case_error", "case_name", "case_names",
           "fill_report", "output_is_file"]


def case_error(path: Path | str, e: BaseException) -> str:
    """One line for a case that failed: the toolkit's own errors as they are, anything else with its type
    name (an unexpected error stays recognisable as a bug while the batch goes on)."""
    if isinstance(e, DtmlError):
        return first_line(e, limit=10_000)
    if isinstance(e, OSError) and e.strerror:  # an output that cannot be written (disk full, a folder in the way)
        return f"{path}: cannot write its outputs: {e.strerror}" + (f": {e.filename}" if e.filename else "")
    return f"{path}: {first_line(e, limit=200 + len(type(e).__name__) + 2, typed=True)}"


@dataclass(frozen=True)
class SegmentOptions:
    """What to do around the engine."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    lcc: bool = True  # keep the largest connected component (the paper's code does)
    resample: bool = True  # resample to the bundle's spacing and back when the scan's differs
    intensity: Policy = "auto"  # z-score unless the scan is already z-scored (see intensity.py)
    output_format: str = "auto"  # the input's family; see io/formats.py
    limits: WorkLimits = field(default_factory=WorkLimits)
    spacing: tuple[float, float, float] | None = None  # overrides every file's voxel sizes (--spacing)
    preview: bool = False  # also draw <case>_preview.png (needs matplotlib: the viz extra)


@dataclass
class Segmentation:
    """Results on the scan's own grid."""

    mask: np.ndarray
    prob: np.ndarray | None
    sdm: np.ndarray | None
    uncertainty: np.ndarray | None
    agreement: float | None
    windows: int
    seconds: dict[str, float]
    resampled: bool
    intensity: str = "zscore"
    qc: QCResult | None = None  # with both heads and a bundle that carries a QC reference
    warnings: list[str] = field(default_factory=list)  # about the input, for the console and the report


@dataclass
class CaseReport:
    """One line of the JSON report."""

    input: str
    status: str  # ok | failed | skipped
    output: str | None = None
    preview: str | None = None
    error: str | None = None
    shape: list[int] | None = None
    spacing: list[float] | None = None
    windows: int | None = None
    agreement: float | None = None
    foreground_voxels: int | None = None
    resampled: bool | None = None
    intensity: str | None = None
    geometry_guessed: list[str] | None = None  # what the file lacked and was assumed (h5: spacing, orientation)
    qc: dict[str, Any] | None = None  # score, threshold, flagged, parts, features (see dtml_deploy/qc.py)
    warnings: list[str] | None = None  # about the input (a cropped raw scan: dtml_deploy/fov.py)
    removed: list[str] | None = None  # files an older run left in the case's output set, removed by --overwrite
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def case_name(path: Path) -> str:
    """'scan.nii.gz' -> 'scan' (also .nrrd/.mha/...); '<ID>/mri_norm2.h5' (UA-MT) and '<ID>/lgemri.nrrd'
    (the LA challenge) -> '<ID>'; a DICOM slice -> its series' readable name (dicom_series.series_name)."""
    from dtml_deploy.io.dicom_series import is_dicom_file, series_name
    from dtml_deploy.io.formats import CHALLENGE_IMAGE, strip_suffix
    from dtml_deploy.io.volume import has_volume_suffix

    if path.name in ("mri_norm2.h5", CHALLENGE_IMAGE):
        return path.parent.name
    if not has_volume_suffix(path) and (path.is_dir() or is_dicom_file(path)):
        return series_name(path) if path.is_file() else path.name
    return strip_suffix(path.name)


def fill_report(report: CaseReport, vol: Volume, seg: Segmentation) -> None:
    """The per-case facts of a segmented volume (shape, spacing, windows, QC, timings) into `report`."""
    report.geometry_guessed = list(vol.guessed) or None
    report.shape = list(vol.shape)
    report.spacing = [float(s) for s in vol.spacing]
    report.windows = seg.windows
    report.agreement = seg.agreement
    report.foreground_voxels = int(seg.mask.sum())
    report.resampled = seg.resampled
    report.intensity = seg.intensity
    report.qc = seg.qc.to_dict() if seg.qc is not None else None
    report.warnings = seg.warnings or None
    report.seconds = {k: round(v, 4) for k, v in seg.seconds.items()}


def case_names(paths: list[Path]) -> list[str]:
    """`case_name` of each input, except that DICOM series sharing a name (every patient's 'S7_LGE' in one
    archive, or a scan file's name) get their PatientID, or a short SeriesInstanceUID digest, appended."""
    from dtml_deploy.io.dicom_series import distinct_series_names, is_dicom_file
    from dtml_deploy.io.volume import has_volume_suffix

    names = [case_name(p) for p in paths]
    dicom = [not has_volume_suffix(p) and is_dicom_file(p) for p in paths]
    shared = [i for i, n in enumerate(names) if dicom[i] and names.count(n) > 1]
    taken = {n for n, d in zip(names, dicom) if not d}  # a scan file of the same name keeps it
    for i, name in zip(shared, distinct_series_names([paths[i] for i in shared], [names[i] for i in shared],
                                                     taken)):
        names[i] = name
    return names


class Segmenter:
    """Binds a bundle, a backend and options; segments arrays or files."""

    def __init__(self, bundle: Bundle, backend: Backend, options: SegmentOptions) -> None:
        self.bundle = bundle
        self.backend = backend
        self.options = options
        engine_cfg = options.engine
        if options.preview and engine_cfg.qc:  # a preview draws the heads' disagreement, saved or not
            engine_cfg = replace(engine_cfg, keep_uncertainty=True)
        self.engine = SlidingWindowEngine(backend, bundle.model.patch_size, engine_cfg)

    def segment_array(self, image: np.ndarray, spacing: tuple[float, float, float] | None = None,
                      name: str = "image", progress: Any = None) -> Segmentation:
        """Segment a raw (un-normalised) 3D image given in `spacing` (None: the bundle's)."""
        seconds: dict[str, float] = {}
        t = time.perf_counter()
        x, intensity = prepare(image, self.bundle.model.intensity, self.options.intensity, name)
        seconds["normalise"] = time.perf_counter() - t
        model_spacing = self.bundle.model.spacing
        resampled = bool(self.options.resample and spacing is not None
                         and spacing_differs(spacing, model_spacing))
        engine_cfg, engine = self.options.engine, self.engine
        work_shape = target_shape(x.shape, spacing, model_spacing) if resampled else x.shape  # type: ignore[arg-type]
        self.check_work(tuple(x.shape), tuple(work_shape), name)
        if resampled:
            t = time.perf_counter()
            x = resize(x, work_shape)
            seconds["resample"] = time.perf_counter() - t
            # The mask is thresholded after resampling back, so the engine must hand over probabilities.
            engine = SlidingWindowEngine(self.backend, self.bundle.model.patch_size,
                                         replace(engine.config, keep_prob=True))
        res = engine.run(x, progress)
        seconds.update(res.seconds)
        qc = self._assess(x, res, seconds, intensity)
        mask, prob, sdm, unc = res.mask, res.prob, res.sdm, res.uncertainty
        if resampled:
            t = time.perf_counter()
            shape = image.shape
            prob = resize(prob, shape)  # type: ignore[arg-type]
            mask = (prob > engine_cfg.threshold).astype(np.uint8)
            sdm = resize(sdm, shape) if sdm is not None else None
            unc = resize(unc, shape) if unc is not None else None
            prob = prob if engine_cfg.keep_prob else None
            seconds["resample"] += time.perf_counter() - t
        if self.options.lcc:
            t = time.perf_counter()
            mask = largest_component(mask)
            seconds["lcc"] = time.perf_counter() - t
        cropped = cropped_scan_warning(image.shape, spacing or model_spacing, intensity)
        return Segmentation(mask, prob, sdm, unc, res.agreement, res.n_windows, seconds, resampled, intensity, qc,
                            [cropped] if cropped else [])

    def _assess(self, x: np.ndarray, res: Any, seconds: dict[str, float], intensity: str) -> QCResult | None:
        """The QC score on the network's grid, when both heads ran and the bundle is calibrated."""
        ref = reference_of(self.bundle.meta)
        if ref is None or res.p_seg is None or res.p_dis is None:
            return None
        t = time.perf_counter()
        cfg = self.options.engine
        qc = assess(x, res.p_seg, res.p_dis, cfg.head, ref, cfg.threshold, self.bundle.model.spacing,
                    self.options.lcc, res.tta_spread, intensity)
        seconds["qc"] = time.perf_counter() - t
        return qc

    def check_work(self, shape: tuple[int, ...], work_shape: tuple[int, ...], name: str) -> None:
        """Refuse, before allocating, a case whose voxels, windows or memory exceed `options.limits`."""
        lim, cfg, patch = self.options.limits, self.options.engine, self.bundle.model.patch_size
        resampled = work_shape != shape
        check_voxels(work_shape, lim, name, "volume resampled to the model's spacing" if resampled else "volume")
        dev, nf = self.backend.device.type, self.bundle.model.net.n_filters
        n = window_count(work_shape, patch, cfg.grid)
        check_windows(n, work_shape, lim, name, seconds_per_window(dev, patch, nf), dev)
        kept = sum((cfg.keep_prob or resampled, cfg.keep_sdm, cfg.keep_uncertainty))
        need = case_bytes(work_shape, kept + (len(cfg.channels) if dev == "cpu" else 0), lim)
        if resampled:
            need += case_bytes(shape, kept, lim)
        batch = min(self.backend.options.batch, n)
        act = 0
        if dev == "cpu":  # a GPU that runs out says so itself (OutOfMemory); the host would swap or be killed
            act = batch * int(np.prod(patch)) * nf * lim.activation_bytes
            act //= 1 if self.backend.options.precision == "fp32" else 2
        check_memory(need + act, name, f"the {'x'.join(map(str, work_shape))} volume with batches of {batch} "
                     f"window(s)", "lower --batch, or check the voxel size")

    def read(self, path: Path) -> Volume:
        """Read one input as `segment_file` does (the bundle's spacing for files without one, --spacing)."""
        return read_volume(Path(path), default_spacing=self.bundle.model.spacing, spacing=self.options.spacing,
                           max_voxels=self.options.limits.max_voxels)

    def segment_volume(self, vol: Volume, progress: Any = None) -> Segmentation:
        """`segment_array` on a read volume (its spacing, unless the file had none)."""
        return self.segment_array(vol.array, None if "spacing" in vol.guessed else vol.spacing, str(vol.path),
                                  progress)

    def segment_file(self, path: Path, out: Path, overwrite: bool = False,
                     progress: Any = None, protected: frozenset[str] = frozenset(),
                     name: str | None = None) -> CaseReport:
        """Segment one file into `out/<case>.nii.gz` (or the file `out`, see `output_is_file`), with the
        optional maps, and report; `name` replaces `case_name(path)` (see `case_names`). Any failure of the
        case (bad input, limits, out of memory, unwritable outputs, an unexpected error) becomes a 'failed'
        report with one line, so a batch goes on. The case's output set is replaced as one unit
        (io/atomic.py); `protected` (path_keys of the run's inputs and planned outputs, io/outputs.py) are
        never removed as an older run's leftovers."""
        path = Path(path)
        report = CaseReport(input=str(path), status="failed")
        try:
            t = time.perf_counter()
            vol = self.read(path)
            read_s = time.perf_counter() - t
            report.geometry_guessed = list(vol.guessed) or None
            paths = self.output_paths(vol, Path(out), overwrite, name, protected)
            seg = self.segment_volume(vol, progress)
            seg.seconds["read"] = read_s
            self.save(vol, seg, paths, report, name, overwrite, protected)
        except Exception as e:  # one case never stops the batch; the line names the error
            report.status = "failed"
            report.error = case_error(path, e)
        return report

    def save(self, vol: Volume, seg: Segmentation, paths: dict[str, Path], report: CaseReport,
             name: str | None = None, overwrite: bool = False, protected: frozenset[str] = frozenset()) -> None:
        """Write a segmented case's outputs (`output_paths`) as one unit and fill its report; with `overwrite`
        the case's whole earlier output set is replaced (io/atomic.py), `protected` files never removed."""
        t = time.perf_counter()
        outputs = dict(paths)
        maps = {"mask": (seg.mask, np.uint8), "prob": (seg.prob, np.float32), "sdm": (seg.sdm, np.float32),
                "uncertainty": (seg.uncertainty, np.float32)}
        # One unit: a case's mask and maps all appear, or none does (a rerun finds nothing stale).
        # Outputs built in memory first (a DICOM SEG, the preview PNG) join the same unit: a refused
        # series or a failed drawing leaves no file behind.
        prepared = [(path, lambda tmp, b=png: tmp.write_bytes(b))
                    for path, png in self._previews(vol, seg, report, outputs, name).items()]
        outputs.pop("preview", None)
        if "dicom_seg" in outputs:
            from dtml_deploy.io.dicom_seg import build_seg, save_seg

            ds = build_seg(vol, seg.mask, self.bundle.content_hash)
            prepared.insert(0, (outputs.pop("dicom_seg"), lambda tmp, d=ds: save_seg(d, tmp, vol, seg.mask)))
        leftovers = Leftovers(paths, protected)
        write_all_like(vol, [(p, *maps[k]) for k, p in outputs.items() if maps[k][0] is not None], prepared,
                       exclusive=not overwrite, remove=leftovers if overwrite else ())
        report.removed = [str(p) for p in leftovers.found] or None
        seg.seconds["write"] = time.perf_counter() - t - seg.seconds.get("preview", 0.0)
        report.status = "ok"
        report.output = str(prepared[0][0] if prepared and "dicom_seg" in paths else outputs["mask"])
        report.preview = str(paths["preview"]) if "preview" in paths else None
        fill_report(report, vol, seg)

    def output_spec(self) -> OutputSpec:
        """What this segmenter writes per case (io/outputs.py plans a run's paths from it)."""
        cfg = self.options.engine
        kept = {"prob": cfg.keep_prob, "sdm": cfg.keep_sdm, "uncertainty": cfg.keep_uncertainty}
        return OutputSpec(maps=tuple(m for m in MAPS if kept[m]), preview=self.options.preview,
                          output_format=self.options.output_format)

    def output_paths(self, vol: Volume, out: Path, overwrite: bool = False, name: str | None = None,
                     protected: frozenset[str] = frozenset()) -> dict[str, Path]:
        """Where a case's outputs go under `out` (a folder, or the mask's file name; `name` replaces
        `case_name(vol.path)`); refused: an output that would replace the input, a DICOM series no SEG can
        reference, and (unless `overwrite`) outputs already there that `protected` does not cover."""
        paths = case_outputs(vol.path, name or case_name(vol.path), input_family(vol), out, self.output_spec())
        src = vol.path.resolve()
        for p in paths.values():
            if p.resolve() == src:
                raise InputError(f"{p}: output would overwrite the input; choose another -o")
        if "dicom_seg" in paths:  # a series no SEG can reference fails before any work
            from dtml_deploy.io.dicom_seg import check_seg_sources

            check_seg_sources(vol)
        if not overwrite:
            check_free(paths, protected)
        return paths

    def _previews(self, vol: Volume, seg: Segmentation, report: CaseReport,
                  outputs: dict[str, Path], name: str | None = None) -> dict[Path, bytes]:
        """The preview PNG (when asked for), drawn before anything is written so it joins the case's unit."""
        if "preview" not in outputs:
            return {}
        from dtml_deploy.viz.preview import case_preview_png

        t = time.perf_counter()
        png = case_preview_png(vol, seg, name or case_name(vol.path), self.options.engine.head, report)
        seg.seconds["preview"] = time.perf_counter() - t
        return {outputs["preview"]: png}
