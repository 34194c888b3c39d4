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
from dtml_deploy.engine.postprocess import largest_component
from dtml_deploy.engine.sliding import EngineConfig, SlidingWindowEngine
from dtml_deploy.errors import InputError, OutOfMemory
from dtml_deploy.intensity import Policy, prepare
from dtml_deploy.io.volume import Volume, read_volume, write_all_like
from dtml_deploy.qc import QCResult, assess, reference_of
from dtml_deploy.resample import resize, spacing_differs, target_shape


@dataclass(frozen=True)
class SegmentOptions:
    """What to do around the engine."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    lcc: bool = True  # keep the largest connected component (the paper's code does)
    resample: bool = True  # resample to the bundle's spacing and back when the scan's differs
    intensity: Policy = "auto"  # z-score unless the scan is already z-scored (see intensity.py)


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


@dataclass
class CaseReport:
    """One line of the JSON report."""

    input: str
    status: str  # ok | failed | skipped
    output: str | None = None
    error: str | None = None
    shape: list[int] | None = None
    spacing: list[float] | None = None
    windows: int | None = None
    agreement: float | None = None
    foreground_voxels: int | None = None
    resampled: bool | None = None
    intensity: str | None = None
    qc: dict[str, Any] | None = None  # score, threshold, flagged, parts, features (see dtml_deploy/qc.py)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def case_name(path: Path) -> str:
    """'scan.nii.gz' -> 'scan'; the UA-MT layout '<ID>/mri_norm2.h5' -> '<ID>'."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".h5"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if path.suffix.lower() == ".h5" and name == "mri_norm2":
        return path.parent.name
    return name


class Segmenter:
    """Binds a bundle, a backend and options; segments arrays or files."""

    def __init__(self, bundle: Bundle, backend: Backend, options: SegmentOptions) -> None:
        self.bundle = bundle
        self.backend = backend
        self.options = options
        self.engine = SlidingWindowEngine(backend, bundle.model.patch_size, options.engine)

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
        if resampled:
            t = time.perf_counter()
            x = resize(x, target_shape(x.shape, spacing, model_spacing))  # type: ignore[arg-type]
            seconds["resample"] = time.perf_counter() - t
            # The mask is thresholded after resampling back, so the engine must hand over probabilities.
            engine = SlidingWindowEngine(self.backend, self.bundle.model.patch_size,
                                         replace(engine_cfg, keep_prob=True))
        res = engine.run(x, progress)
        seconds.update(res.seconds)
        qc = self._assess(x, res, seconds)
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
        return Segmentation(mask, prob, sdm, unc, res.agreement, res.n_windows, seconds, resampled, intensity, qc)

    def _assess(self, x: np.ndarray, res: Any, seconds: dict[str, float]) -> QCResult | None:
        """The QC score on the network's grid, when both heads ran and the bundle is calibrated."""
        ref = reference_of(self.bundle.meta)
        if ref is None or res.p_seg is None or res.p_dis is None:
            return None
        t = time.perf_counter()
        cfg = self.options.engine
        qc = assess(x, res.p_seg, res.p_dis, cfg.head, ref, cfg.threshold, self.bundle.model.spacing,
                    self.options.lcc, res.tta_spread)
        seconds["qc"] = time.perf_counter() - t
        return qc

    def segment_file(self, path: Path, out_dir: Path, overwrite: bool = False,
                     progress: Any = None) -> CaseReport:
        """Segment one file into `out_dir/<case>.nii.gz` (+ optional maps) and report. Bad input, running
        out of memory and unwritable outputs become a 'failed' report, so a batch goes on."""
        path = Path(path)
        report = CaseReport(input=str(path), status="failed")
        try:
            t = time.perf_counter()
            vol = read_volume(path, default_spacing=self.bundle.model.spacing)
            read_s = time.perf_counter() - t
            outputs = self._output_paths(vol, Path(out_dir))
            for p in outputs.values():
                if p.exists() and not overwrite:
                    raise InputError(f"{p}: exists (use --overwrite to replace it)")
            seg = self.segment_array(vol.array, vol.spacing if vol.header is not None else None,
                                     str(path), progress)
            t = time.perf_counter()
            maps = {"mask": (seg.mask, np.uint8), "prob": (seg.prob, np.float32), "sdm": (seg.sdm, np.float32),
                    "uncertainty": (seg.uncertainty, np.float32)}
            # One unit: a case's mask and maps all appear, or none does (a rerun finds nothing stale).
            write_all_like(vol, [(p, *maps[k]) for k, p in outputs.items() if maps[k][0] is not None])
            seg.seconds["read"] = read_s
            seg.seconds["write"] = time.perf_counter() - t
            report.status = "ok"
            report.output = str(outputs["mask"])
            report.shape = list(vol.shape)
            report.spacing = [float(s) for s in vol.spacing]
            report.windows = seg.windows
            report.agreement = seg.agreement
            report.foreground_voxels = int(seg.mask.sum())
            report.resampled = seg.resampled
            report.intensity = seg.intensity
            report.qc = seg.qc.to_dict() if seg.qc is not None else None
            report.seconds = {k: round(v, 4) for k, v in seg.seconds.items()}
        except (InputError, OutOfMemory) as e:
            report.error = str(e)
        except OSError as e:  # an output that cannot be written (disk full, a folder in the way, ...)
            report.error = f"{path}: cannot write its outputs: {e.strerror or e}" + (
                f": {e.filename}" if e.filename else "")
        return report

    def _output_paths(self, vol: Volume, out_dir: Path) -> dict[str, Path]:
        name = case_name(vol.path)
        cfg = self.options.engine
        paths = {"mask": out_dir / f"{name}.nii.gz"}
        if cfg.keep_prob:
            paths["prob"] = out_dir / f"{name}_prob.nii.gz"
        if cfg.keep_sdm:
            paths["sdm"] = out_dir / f"{name}_sdm.nii.gz"
        if cfg.keep_uncertainty:
            paths["uncertainty"] = out_dir / f"{name}_uncertainty.nii.gz"
        src = vol.path.resolve()
        for p in paths.values():
            if p.resolve() == src:
                raise InputError(f"{p}: output would overwrite the input; choose another -o")
        return paths
