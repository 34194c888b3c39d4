"""The text headers of NRRD (.nrrd/.nhdr) and MetaImage (.mha/.mhd) files, read field by field.

ITK quietly fills in what a header lacks or garbles (1 mm for a missing, NaN or misspelt spacing; the
absolute value of a negative one) and allocates whatever size a header asks for before it finds the data
missing. dtml therefore reads the header itself first (nrrd_header.py, meta_header.py: real fields, not
substrings, however long the header) and refuses, naming the file and the field:
- no spacing (`space directions`/`spacings`, `ElementSpacing`/`ElementSize`), or one that is not finite
  and positive, or voxel axes that are zero or parallel (a singular direction matrix);
- more voxels than `WorkLimits.max_voxels`, or more bytes than the host has free, before reading data;
- a data file that is missing, or raw data shorter than the sizes and type need (gzip data that could not
  hold them even at deflate's best ratio), before ITK reads a byte of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dtml_deploy.errors import InputError
from dtml_deploy.io.geometry import SINGULAR_RTOL, check_spacing
from dtml_deploy.limits import check_memory

# Bytes per voxel on top of the stored scalar while a scan is read: the float32 copy and its reordering.
READ_COPY_BYTES = 8
# Deflate cannot compress better than 1032:1, so gzip data of n bytes holds at most 1032 * n bytes.
DEFLATE_MAX_RATIO = 1032
MAX_HEADER_BYTES = 16 * 2**20  # a header longer than this is not a header (binary data without an end line)


@dataclass(frozen=True)
class ImageHeader:
    """What a NRRD or MetaImage header declares, as parsed (sizes in file order, fastest axis first)."""

    path: Path
    family: str  # nrrd | mha
    sizes: tuple[int, ...]  # every axis, including a component axis
    scalar_bytes: int  # bytes of one stored value
    axes: np.ndarray | None  # 3x3, column k = voxel axis k (direction * spacing); None: no spacing declared
    encoding: str  # raw | gzip | bzip2 | text
    data_file: Path | None  # where the data is (the header's own file when attached); None: several files
    data_offset: int | None  # byte offset of the data in data_file; -1: the last bytes; None: not known
    origin: tuple[float, ...] = (0.0, 0.0, 0.0)  # as written (NRRD 'space origin', MetaImage Offset)
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        return math.prod(self.sizes)

    @property
    def data_bytes(self) -> int:
        return self.voxels * self.scalar_bytes


def header_lines(path: Path, stop: bytes = b"") -> tuple[list[str], int]:
    """The lines of a text header up to `stop` (a line that begins with it, kept) or a blank line (stop
    empty), or the end of the file; and the byte offset just after them."""
    lines: list[str] = []
    with open(path, "rb") as f:
        while True:
            line = f.readline(MAX_HEADER_BYTES)
            if not line:
                break
            if f.tell() > MAX_HEADER_BYTES:
                raise InputError(f"{path}: no end of the header in its first {MAX_HEADER_BYTES >> 20} MiB")
            text = line.rstrip(b"\r\n").decode("latin-1")
            if not stop and text == "" and lines:  # NRRD: an empty line ends the header
                break
            lines.append(text)
            if stop and text.lstrip().startswith(stop.decode()):
                break
        return lines, f.tell()


def check_axes(axes: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Voxel axes (columns) that are finite, non-zero and span 3D; `what` names the header field."""
    if not np.isfinite(axes).all():
        raise InputError(f"{path}: {what} is not finite ({_fmt(axes)}); dtml does not guess geometry")
    check_spacing(np.linalg.norm(axes, axis=0), path, f"header's {what}")
    sv = np.linalg.svd(axes, compute_uv=False)
    if sv[-1] < SINGULAR_RTOL * sv[0]:
        raise InputError(f"{path}: {what} is singular: the voxel axes {_fmt(axes)} do not span 3D (two are "
                         f"parallel); fix the header (or pass --spacing X Y Z to use the voxels alone)")
    return axes


def _fmt(axes: np.ndarray) -> str:
    return " ".join("(" + ",".join(f"{v:g}" for v in col) + ")" for col in np.asarray(axes).T)


def check_header(h: ImageHeader, max_voxels: int, need_spacing: bool = True) -> None:
    """Refuse, before any data is read, a header without spacing (unless `need_spacing` is False: the
    caller gives it), over `max_voxels`, larger than free memory, or whose data is missing or short."""
    if need_spacing and h.axes is None:
        what = ("NRRD header gives no voxel spacing ('space directions' or 'spacings')" if h.family == "nrrd"
                else "MetaImage header gives no ElementSpacing (nor ElementSize)")
        raise InputError(f"{h.path}: {what}; add it (dtml does not guess spacing)")
    if h.voxels > max_voxels:
        raise InputError(f"{h.path}: the header's sizes {'x'.join(map(str, h.sizes))} = {h.voxels:,} voxels, "
                         f"over the limit of {max_voxels:,}")
    _check_data(h)
    check_memory(h.voxels * (h.scalar_bytes + READ_COPY_BYTES), str(h.path), "reading it",
                 "free memory or crop the scan")


def _check_data(h: ImageHeader) -> None:
    """The data file exists and, where its size says so cheaply, holds what the header promises."""
    if h.data_file is None:
        return
    if not h.data_file.is_file():
        key = "ElementDataFile" if h.family == "mha" else "data file"
        raise InputError(f"{h.path}: its data file {h.data_file} ({key}) does not exist")
    if h.data_offset is None:
        return
    have = h.data_file.stat().st_size - max(h.data_offset, 0)
    need = h.data_bytes
    if h.encoding == "raw" and have < need:
        raise InputError(f"{h.path}: the data is truncated: sizes {'x'.join(map(str, h.sizes))} of "
                         f"{h.scalar_bytes}-byte values need {need:,} bytes, {h.data_file.name} holds {have:,}")
    if h.encoding == "gzip" and need > DEFLATE_MAX_RATIO * have + 1024:
        raise InputError(f"{h.path}: the data is truncated: {have:,} bytes of gzip data cannot hold the "
                         f"{need:,} bytes that sizes {'x'.join(map(str, h.sizes))} need")
