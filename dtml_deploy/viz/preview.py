"""A case preview: three orthogonal slices through the mask's centroid, drawn to anatomical orientation.

Every view is first composed as an RGB array straight from the volumes (`compose`): the image in grey
within a percentile window, the heads' disagreement |p_seg - p_dis| blended in as a red-to-yellow heat
(exactly zero where the heads agree), and the mask's outline (and a reference label's) in pure colours
that neither the grey nor the heat can produce. matplotlib then only places the views, with each
pixel's height-to-width ratio taken from the voxel spacing, and labels their edges (R/L, A/P, S/I).

Display convention: arrays are reoriented to RAS first; axial and coronal views show the patient's
right on the screen's left (radiological), the sagittal view anterior on the left, superior (axial:
anterior) at the top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from dtml_deploy.viz.figure import figure_png, new_figure, verbatim

OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
# view name -> (slice axis, row axis, column axis) of the RAS array
VIEWS: dict[str, tuple[int, int, int]] = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}


@dataclass(frozen=True)
class PreviewStyle:
    """How a preview looks; each default lives here."""

    window: tuple[float, float] = (1.0, 99.0)  # image percentiles mapped to black and white
    outline_rgb: tuple[float, float, float] = (0.0, 1.0, 1.0)  # cyan: the predicted mask
    label_rgb: tuple[float, float, float] = (1.0, 0.0, 1.0)  # magenta: the reference label
    heat_alpha: float = 0.6  # opacity of the disagreement overlay at full strength
    heat_full: float = 0.5  # |p_seg - p_dis| at which the overlay is at full strength
    view_px: int = 360  # smallest height of a view in pixels (more when the slices have more voxels)
    px_per_voxel: float = 1.0  # at least this many pixels per voxel (1: no voxel, no outline pixel dropped)
    max_px_per_mm: float = 8.0  # cap for tiny volumes
    dpi: int = 100


THUMBNAIL = PreviewStyle(view_px=110, px_per_voxel=0.0, dpi=80)  # small: outlines drawn thicker instead


@dataclass
class View:
    """One slice in display orientation: rows top to bottom, columns left to right."""

    name: str
    index: int  # slice index along the RAS axis the view cuts
    image: np.ndarray | None
    mask: np.ndarray
    label: np.ndarray | None
    uncertainty: np.ndarray | None
    pixel_mm: tuple[float, float]  # (row, column) spacing
    edges: dict[str, str]  # left, right, top, bottom -> orientation letter

    @property
    def extent_mm(self) -> tuple[float, float]:
        """(height, width) of the view in millimetres."""
        return self.mask.shape[0] * self.pixel_mm[0], self.mask.shape[1] * self.pixel_mm[1]


def to_ras(arrays: Sequence[np.ndarray | None], affine: np.ndarray,
           spacing: Sequence[float]) -> tuple[list[np.ndarray | None], tuple[float, ...], tuple[str, ...]]:
    """Reorient arrays (same grid) to RAS; returns them, the spacing per RAS axis and the axis codes
    of the reoriented grid (from its affine)."""
    from nibabel.orientations import aff2axcodes, apply_orientation, inv_ornt_aff, io_orientation

    ornt = io_orientation(affine)
    shape = next(a.shape for a in arrays if a is not None)
    out = [None if a is None else np.ascontiguousarray(apply_orientation(a, ornt)) for a in arrays]
    sp = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        sp[int(target)] = float(spacing[axis])
    codes = tuple(aff2axcodes(affine @ inv_ornt_aff(ornt, shape)))
    return out, tuple(sp), codes


def centre_of(mask: np.ndarray) -> tuple[int, int, int]:
    """The mask's centroid (rounded to a voxel); the volume's centre when the mask is empty."""
    if not mask.any():
        return tuple(n // 2 for n in mask.shape)  # type: ignore[return-value]
    return tuple(int(np.rint(c)) for c in ndi.center_of_mass(mask > 0))  # type: ignore[return-value]


def _display(a: np.ndarray | None, axis: int, index: int) -> np.ndarray | None:
    """The slice with its remaining axes (u, v) shown as rows = v reversed, columns = u reversed."""
    if a is None:
        return None
    s = np.take(a, index, axis=axis)
    return np.ascontiguousarray(s[::-1, ::-1].T)


def slice_views(mask: np.ndarray, affine: np.ndarray, spacing: Sequence[float], image: np.ndarray | None = None,
                uncertainty: np.ndarray | None = None, label: np.ndarray | None = None) -> list[View]:
    """Axial, coronal and sagittal views through the mask's centroid, in display orientation."""
    (m, img, unc, lab), sp, codes = to_ras([mask, image, uncertainty, label], affine, spacing)
    assert m is not None
    centre = centre_of(m)
    views = []
    for name, (cut, row, col) in VIEWS.items():
        # A column runs from the positive end of its axis on the left to the negative end on the right;
        # rows likewise from top to bottom (see _display): the letters follow from the axis codes.
        edges = {"left": codes[col], "right": OPPOSITE[codes[col]], "top": codes[row],
                 "bottom": OPPOSITE[codes[row]]}
        views.append(View(name, centre[cut], _display(img, cut, centre[cut]), _display(m, cut, centre[cut]) > 0,
                          None if lab is None else _display(lab, cut, centre[cut]) > 0,
                          _display(unc, cut, centre[cut]), (sp[row], sp[col]), edges))
    return views


def intensity_window(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """Grey window from image percentiles (on a subsample of large volumes; percentiles barely move)."""
    flat = np.asarray(image, dtype=np.float32).ravel()
    step = max(1, flat.size // 2_000_000)
    lo, hi = (float(v) for v in np.percentile(flat[::step], percentiles))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it (the slice border counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    if width < 1 or not mask.any():
        return np.zeros_like(mask)
    inner = ndi.binary_erosion(mask, ndi.generate_binary_structure(2, 1), iterations=width, border_value=0)
    return mask & ~inner


def compose(view: View, window: tuple[float, float], style: PreviewStyle = PreviewStyle(),
            outline_width: int = 1) -> np.ndarray:
    """The view as float RGB in [0, 1]: grey image, disagreement heat, label outline, mask outline."""
    if view.image is not None:
        lo, hi = window
        grey = np.clip((view.image.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    else:  # masks only (scoring folders): the label as a dim silhouette
        grey = 0.3 * view.label.astype(np.float32) if view.label is not None else np.zeros(view.mask.shape, np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if view.uncertainty is not None:
        strength = np.clip(view.uncertainty.astype(np.float32) / style.heat_full, 0.0, 1.0)
        heat = np.stack([np.ones_like(strength), strength, np.zeros_like(strength)], axis=-1)
        alpha = (style.heat_alpha * strength)[..., None]
        rgb = np.where(alpha > 0, rgb * (1.0 - alpha) + heat * alpha, rgb)  # untouched where the heads agree
    if view.label is not None:
        rgb[outline(view.label, outline_width)] = style.label_rgb
    rgb[outline(view.mask, outline_width)] = style.outline_rgb
    return rgb


def mask_volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Voxel count times voxel volume (spacing in mm), in millilitres."""
    return float(np.count_nonzero(mask)) * float(np.prod([float(s) for s in spacing[:3]])) / 1000.0


def _scale(views: list[View], style: PreviewStyle) -> float:
    """Pixels per millimetre: at least `view_px` tall, and at least `px_per_voxel` pixels per voxel."""
    height = max(v.extent_mm[0] for v in views)
    finest = min(min(v.pixel_mm) for v in views)
    return min(max(style.view_px / height, style.px_per_voxel / finest), style.max_px_per_mm)


def render(views: list[View], title: str, style: PreviewStyle = PreviewStyle(),
           window: tuple[float, float] = (0.0, 1.0), legend: bool = True) -> Any:
    """A figure with the three views side by side, each with its spacing-true aspect ratio."""
    px_mm = _scale(views, style)
    heights = [v.extent_mm[0] * px_mm for v in views]
    widths = [v.extent_mm[1] * px_mm for v in views]
    gap, top, bottom = 30.0, 48.0 if title else 22.0, 34.0 if legend else 22.0
    fig_w, fig_h = sum(widths) + gap * (len(views) + 1), max(heights) + top + bottom
    fig = new_figure(fig_w / style.dpi, fig_h / style.dpi, style.dpi)
    fig.patch.set_facecolor("black")
    width = max(1, round(1.0 / (px_mm * min(min(v.pixel_mm) for v in views))))  # visible when shrunk
    x = gap
    for v, w, h in zip(views, widths, heights):
        ax = fig.add_axes((x / fig_w, (bottom + (max(heights) - h) / 2) / fig_h, w / fig_w, h / fig_h))
        ax.imshow(compose(v, window, style, width), interpolation="nearest",
                  aspect=v.pixel_mm[0] / v.pixel_mm[1])
        ax.set_axis_off()
        ax.set_title(f"{v.name} {v.index}", color="white", fontsize=9, pad=3)
        # white on a dark box: readable on any grey, and no colour the heat or the outlines use
        kw = {"color": "white", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes,
              "bbox": {"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 1.0}}
        ax.text(0.01, 0.5, v.edges["left"], ha="left", va="center", **kw)
        ax.text(0.99, 0.5, v.edges["right"], ha="right", va="center", **kw)
        ax.text(0.5, 0.99, v.edges["top"], ha="center", va="top", **kw)
        ax.text(0.5, 0.01, v.edges["bottom"], ha="center", va="bottom", **kw)
        x += w + gap
    if title:
        fig.text(0.5, 1 - 8 / fig_h, verbatim(title), ha="center", va="top", color="white", fontsize=10)
    if legend:
        fig.text(0.5, 6 / fig_h, _legend(views, style), ha="center", va="bottom", color="#cccccc", fontsize=7)
    return fig


def _legend(views: list[View], style: PreviewStyle) -> str:
    """Name only what the views draw."""
    items = ["cyan: mask outline"]
    if any(v.label is not None for v in views):
        items.append("magenta: label outline")
    if any(v.uncertainty is not None for v in views):
        items.append(f"red→yellow: |p_seg − p_dis| (full at {style.heat_full:g})")
    return "   ".join(items)


def preview_title(case: str, head: str | None, mask: np.ndarray, spacing: Sequence[float],
                  qc_score: float | None, qc_name: str = "QC") -> str:
    """'<case> · head <h> · mask <v> mL · <QC name> <score>'."""
    parts = [case]
    if head:
        parts.append(f"head {head}")
    parts.append(f"mask {mask_volume_ml(mask, spacing):.2f} mL")
    parts.append(f"{qc_name} {qc_score:.3f}" if qc_score is not None else f"{qc_name} n/a")
    return " · ".join(parts)


def preview_png(mask: np.ndarray, affine: np.ndarray, spacing: Sequence[float], title: str,
                image: np.ndarray | None = None, uncertainty: np.ndarray | None = None,
                label: np.ndarray | None = None, style: PreviewStyle = PreviewStyle()) -> bytes:
    """The whole preview as PNG bytes."""
    views = slice_views(mask, affine, spacing, image, uncertainty, label)
    window = intensity_window(image, style.window) if image is not None else (0.0, 1.0)
    return figure_png(render(views, title, style, window, legend=style.view_px >= PreviewStyle.view_px))


def qc_of(*sources: object) -> tuple[float | None, str]:
    """The case's QC score and its name: `qc_score` where a source carries one, else the heads'
    `agreement` (Dice between the two heads' masks)."""
    sources = tuple(s for s in sources if s is not None)
    for src in sources:
        score = src.get("qc_score") if isinstance(src, dict) else getattr(src, "qc_score", None)
        qc = None if isinstance(src, dict) else getattr(src, "qc", None)  # a Segmentation's QCResult
        score = getattr(qc, "score", score)
        if score is not None:
            return float(score), "QC"
    for src in sources:
        score = src.get("agreement") if isinstance(src, dict) else getattr(src, "agreement", None)
        if score is not None:
            return float(score), "agreement"
    return None, "QC"


def case_preview_png(vol: Any, seg: Any, case: str, head: str, report: object = None,
                     style: PreviewStyle = PreviewStyle()) -> bytes:
    """The preview of one segmented case (`vol`: the input Volume, `seg`: its Segmentation)."""
    score, name = qc_of(report, seg)
    title = preview_title(case, head, seg.mask, vol.spacing, score, name)
    return preview_png(seg.mask, vol.affine, vol.spacing, title, image=vol.array, uncertainty=seg.uncertainty,
                       style=style)
