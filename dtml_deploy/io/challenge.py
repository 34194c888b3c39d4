"""The 2018 LA challenge download read directly: `<root>/<CASEID>/lgemri.nrrd` and `laendo.nrrd`.

Training and evaluation see each case as the public UA-MT h5 files present it, with that preprocessing
applied on the fly: the image is z-scored over the whole scan (float64 statistics, float32 result),
then cropped in x and y to the atrium's bounding box widened on each side by a margin of 10 to 19
voxels, plus half the shortfall when the box is narrower than 112 voxels (so a 112x112 patch fits),
clipped to the scan; z is kept whole. The label is `laendo == 255` on the same crop (0/255 files;
0/1 files are taken as they are, anything else is an error). The released files drew the four margins
at random; here they are drawn from a generator seeded by the case id, so every run crops alike.

Unlabeled cases: the released crop of every case was guided by its label. The data source, which may
read labels, computes that box (four integers) and gives it to the unlabeled case's image reference;
the label's voxels never reach training. An unlabeled case without `laendo.nrrd` is used whole in x-y.

`dtml segment <root>` reads each `lgemri.nrrd` whole (inference uses no label), z-scored over the
whole scan like the training images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from dtml_deploy.config import IntensityConfig
from dtml_deploy.errors import DataError, DtmlError
from dtml_deploy.intensity import normalise
from dtml_deploy.io.cases import ArrayRef, read_case_list
from dtml_deploy.io.geometry import GridTolerance
from dtml_deploy.io.header_reader import read_header
from dtml_deploy.io.headers import ImageHeader
from dtml_deploy.io.itk_io import ItkGeometry
from dtml_deploy.io.volume import Volume, read_volume

LAYOUT = "la2018-challenge"
IMAGE, LABEL = "lgemri.nrrd", "laendo.nrrd"


@dataclass(frozen=True)
class CropConfig:
    """UA-MT's released crop: per-side margin drawn from [margin[0], margin[1]), minimum x-y size."""

    margin: tuple[int, int] = (10, 20)
    min_size: tuple[int, int] = (112, 112)  # the paper's patch in x and y


def challenge_ids(root: Path, list_file: Path | None = None) -> list[str]:
    """Case ids of a challenge root (folders holding lgemri.nrrd), sorted or in list-file order."""
    ids = sorted(p.parent.name for p in Path(root).glob(f"*/{IMAGE}"))
    if ids and list_file is not None:
        return read_case_list(Path(list_file))
    return ids


def stray_notes(folder: Path, used: Sequence[Path] = ()) -> list[str]:
    """Notes for what a command skips in a challenge folder: in a root (holding <ID>/lgemri.nrrd), each
    entry that is neither a case nor holds one of the scans `used`; in a case folder, its label (only
    lgemri.nrrd is a scan). Nothing for other folders."""
    folder = Path(folder)
    if (folder / IMAGE).is_file():
        return [f"note: {folder / LABEL}: the case's label, not segmented"] if (folder / LABEL).is_file() else []
    cases = {p.parent.name for p in folder.glob(f"*/{IMAGE}")}
    if not cases:
        return []
    taken = cases | {Path(u).relative_to(folder).parts[0] for u in used if Path(u).is_relative_to(folder)}
    return [f"note: {p}: {f'a folder without {IMAGE}' if p.is_dir() else 'not a case folder'}; skipped (the "
            f"challenge layout is <ID>/{IMAGE} with <ID>/{LABEL})"
            for p in sorted(folder.iterdir()) if p.name not in taken and not p.name.startswith(".")]


def binary_label(array: np.ndarray, path: Path) -> np.ndarray:
    """laendo values {0, 255} -> {0, 1} uint8; {0, 1} kept; anything else is a `DataError`."""
    values = np.unique(array)
    if np.isin(values, (0.0, 255.0)).all():
        return (array == 255).astype(np.uint8)
    if np.isin(values, (0.0, 1.0)).all():
        return array.astype(np.uint8)
    raise DataError(f"{path}: label values {values[:6].tolist()} are neither 0/255 nor 0/1")


def crop_box(label: np.ndarray, case_id: str, cfg: CropConfig = CropConfig()) -> tuple[int, int, int, int]:
    """(x0, x1, y0, y1) of the released crop around the label's foreground (see the module docstring)."""
    fg = np.nonzero(label)
    if not fg[0].size:
        raise DataError(f"case {case_id}: the label is empty; the crop around the atrium needs one")
    seed = int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")
    margins = np.random.default_rng(seed).integers(cfg.margin[0], cfg.margin[1], size=4)
    box = []
    for axis in (0, 1):
        lo, hi, n = int(fg[axis].min()), int(fg[axis].max()), label.shape[axis]
        pad = max(cfg.min_size[axis] - (hi - lo), 0) // 2
        box += [max(lo - int(margins[2 * axis]) - pad, 0), min(hi + int(margins[2 * axis + 1]) + pad, n)]
    return tuple(box)  # type: ignore[return-value]


def grid_difference(image: ImageHeader, label: ImageHeader) -> str | None:
    """How a label's grid differs from its image's (size, voxel axes, origin), or None when it does not."""
    if image.sizes != label.sizes:
        return f"size {'x'.join(map(str, label.sizes))} vs the image's {'x'.join(map(str, image.sizes))}"
    if image.axes is not None and label.axes is not None:
        scale = float(np.abs(image.axes).max())
        if not np.allclose(image.axes, label.axes, rtol=0, atol=GridTolerance.rtol * scale):
            return (f"voxel axes {label.axes.T.round(4).tolist()} vs the image's {image.axes.T.round(4).tolist()} "
                    "(spacing or orientation)")
    shift = float(np.abs(np.subtract(image.origin, label.origin)).max())
    if shift > GridTolerance.translation_mm:
        return f"origin {label.origin} vs the image's {image.origin} ({shift:.4g} mm apart)"
    return None


@lru_cache(maxsize=1024)
def _box_of(label_path: str, case_id: str) -> tuple[int, int, int, int] | None:
    """The crop box of a case from its label, which must be binary and on its image's grid (the box is
    found on the label and cut from the image)."""
    path = Path(label_path)
    if not path.is_file():
        return None
    label = read_volume(path)
    image = path.parent / IMAGE
    if image.is_file():  # an unreadable image fails when the case reads it
        why = grid_difference(read_header(image), read_header(path))
        if why:
            raise DataError(f"{path}: the label is not on its image's grid ({why}); give a label on "
                            f"{image.name}'s grid (dtml does not crop or resample labels)")
    return crop_box(binary_label(label.array, path), case_id)


def case_ref(root: Path, case_id: str, role: str) -> ArrayRef:
    """The image or label reference of a case, carrying its crop box (not its label). A label that cannot
    give the box (unreadable, not binary, empty, on another grid) fails this case alone: the reference
    carries the reason and reading it raises it."""
    folder = Path(root) / case_id
    try:
        box, problem = _box_of(str(folder / LABEL), case_id), None
    except DtmlError as e:
        box, problem = None, str(e)
    return ArrayRef(folder / (IMAGE if role == "image" else LABEL), role, LAYOUT, box, problem)


def read_preprocessed(ref: ArrayRef) -> Volume:
    """A case's image (z-scored over the whole scan) or label (0/1), cropped to its box."""
    if ref.problem is not None:
        raise DataError(ref.problem)
    vol = read_volume(ref.path)
    if ref.dataset == "label":
        arr = binary_label(vol.array, ref.path)
    else:
        arr = normalise(vol.array, IntensityConfig(), str(ref.path))
    if ref.crop is None:
        return replace(vol, array=arr.astype(np.float32))
    x0, x1, y0, y1 = ref.crop
    shift = np.eye(4)
    shift[:2, 3] = (x0, y0)
    header = vol.header
    if isinstance(header, ItkGeometry):  # the crop's first voxel, in LPS
        d = np.asarray(header.direction).reshape(3, 3) * np.asarray(header.spacing)
        header = replace(header, origin=tuple(float(v) for v in np.asarray(header.origin) + d @ (x0, y0, 0)))
    arr = np.ascontiguousarray(arr[x0:x1, y0:y1], dtype=np.float32)
    return Volume(arr, vol.spacing, vol.affine @ shift, ref.path, header, arr.shape)
