"""A NRRD header (.nrrd, .nhdr) as its format defines it: the `NRRD000N` magic line, then `#` comments,
`key:=value` pairs (free text, never geometry) and `field: value` lines (field names in any case), up to
an empty line (data attached after it) or the end of a detached header. Only fields count: a comment or
a key that mentions `spacings` declares nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dtml_deploy.errors import InputError
from dtml_deploy.io.geometry import check_spacing
from dtml_deploy.io.headers import ImageHeader, check_axes, header_lines

_MAGIC = re.compile(r"NRRD000[1-9]")
# Every field the format defines (aliases folded to one name); anything else is an error, as in ITK.
_ALIASES = {"datafile": "data file", "lineskip": "line skip", "byteskip": "byte skip", "blocksize": "block size",
            "axismins": "axis mins", "axismaxs": "axis maxs", "centerings": "centers", "oldmin": "old min",
            "oldmax": "old max", "sampleunits": "sample units"}
_FIELDS = {"content", "number", "type", "block size", "dimension", "space", "space dimension", "sizes", "spacings",
           "thicknesses", "axis mins", "axis maxs", "space directions", "centers", "kinds", "labels", "units",
           "min", "max", "old min", "old max", "endian", "encoding", "line skip", "byte skip", "sample units",
           "space units", "space origin", "measurement frame", "data file"}
_TYPES = {1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
          2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
              "unsigned short", "unsigned short int", "uint16", "uint16_t"),
          4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
          8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
              "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
              "double")}
_TYPE_BYTES = {name: n for n, names in _TYPES.items() for name in names}
_ENCODINGS = {"raw": "raw", "txt": "text", "text": "text", "ascii": "text", "hex": "text", "gz": "gzip",
              "gzip": "gzip", "bz2": "bzip2", "bzip2": "bzip2"}
_SPACES = {"right-anterior-superior", "ras", "left-anterior-superior", "las", "left-posterior-superior", "lps",
           "scanner-xyz", "3d-right-handed", "3d-left-handed"}


def parse_nrrd(path: Path, geometry: bool = True) -> ImageHeader:
    """The fields of a NRRD header and the geometry they declare (see the module docstring); with
    `geometry` False (the caller gives the spacing) the voxel axes are neither read nor checked."""
    lines, end = header_lines(path)
    if not lines or not _MAGIC.fullmatch(lines[0].strip()):
        raise InputError(f"{path}: cannot read NRRD (no NRRD magic line)")
    fields: dict[str, str] = {}
    for n, text in enumerate(lines[1:], start=2):
        if text.startswith("#") or ":=" in text:
            continue
        name, sep, value = text.partition(":")
        name = _ALIASES.get(name.strip().lower(), name.strip().lower())
        if not sep or name not in _FIELDS:
            raise InputError(f"{path}: line {n} of the NRRD header is neither a field, a key:=value pair nor "
                             f"a comment: {text[:60]!r}")
        fields[name] = value.strip()
    dim = _int(fields, "dimension", path)
    sizes = _ints(fields, "sizes", path)
    if len(sizes) != dim or min(sizes) < 1:
        raise InputError(f"{path}: NRRD 'sizes' {fields['sizes']!r} must be {dim} positive integers ('dimension')")
    kind = fields.get("type", "").lower()
    if kind not in _TYPE_BYTES:
        raise InputError(f"{path}: NRRD 'type' {fields.get('type', '(missing)')!r} is not a numeric type")
    encoding = _ENCODINGS.get(fields.get("encoding", "").lower())
    if encoding is None:
        raise InputError(f"{path}: NRRD 'encoding' {fields.get('encoding', '(missing)')!r} is not one of "
                         "raw, ascii, hex, gzip, bzip2")
    if _TYPE_BYTES[kind] > 1 and encoding != "text" and "endian" not in fields:
        raise InputError(f"{path}: NRRD type {kind!r} stored as {encoding} needs an 'endian' field")
    data_file, offset = _data(fields, path, end)
    axes = _axes(fields, dim, path) if geometry else None
    origin = tuple(_vector(fields["space origin"].strip("() "), path)) if "space origin" in fields else (0.0,) * 3
    return ImageHeader(path, "nrrd", sizes, _TYPE_BYTES[kind], axes, encoding, data_file, offset, origin, fields)


def _int(fields: dict[str, str], name: str, path: Path) -> int:
    try:
        return int(fields[name])
    except KeyError:
        raise InputError(f"{path}: NRRD header has no '{name}' field") from None
    except ValueError:
        raise InputError(f"{path}: NRRD '{name}' {fields[name]!r} is not an integer") from None


def _ints(fields: dict[str, str], name: str, path: Path) -> tuple[int, ...]:
    if name not in fields:
        raise InputError(f"{path}: NRRD header has no '{name}' field")
    try:
        return tuple(int(v) for v in fields[name].split())
    except ValueError:
        raise InputError(f"{path}: NRRD '{name}' {fields[name]!r} are not integers") from None


def _axes(fields: dict[str, str], dim: int, path: Path) -> np.ndarray | None:
    """Voxel axes from `space directions` (one vector or `none` per axis) or `spacings` (NaN marks a
    non-spatial axis); None when neither is given. A 3D scan needs exactly three spatial axes."""
    if "space directions" in fields:
        if "space" not in fields and "space dimension" not in fields:
            raise InputError(f"{path}: NRRD 'space directions' needs a 'space' or 'space dimension' field")
        if "space" in fields and fields["space"].lower() not in _SPACES:
            raise InputError(f"{path}: NRRD space {fields['space']!r} is not a 3D space")
        if fields.get("space dimension", "3") != "3":
            raise InputError(f"{path}: expected a 3D image, got a {fields['space dimension']}D image of size "
                             f"{fields.get('sizes')} (NRRD 'space dimension')")
        units = set(re.findall(r'"([^"]*)"', fields.get("space units", '"mm"')))
        if units - {"mm", ""}:
            raise InputError(f"{path}: NRRD 'space units' {fields['space units']} are not millimetres (ITK would "
                             "read them as mm); convert the header to mm")
        tokens = re.findall(r"\(([^)]*)\)|(none)", fields["space directions"])
        vectors = [_vector(v, path) for v, none in tokens if not none]
        if len(tokens) != dim or len(vectors) != 3 or any(len(v) != 3 for v in vectors):
            raise InputError(f"{path}: NRRD 'space directions' {fields['space directions']!r} must give a 3-vector "
                             f"for each of 3 spatial axes and 'none' for the others ({dim} axes)")
        return check_axes(np.array(vectors, dtype=np.float64).T, path, "'space directions'")
    if "spacings" in fields:
        try:
            values = [float(v) for v in fields["spacings"].split()]
        except ValueError:
            raise InputError(f"{path}: NRRD 'spacings' {fields['spacings']!r} are not numbers") from None
        spatial = values if dim == 3 else [v for v in values if v == v]  # a component axis has NaN
        if len(values) != dim or len(spatial) != 3:
            raise InputError(f"{path}: NRRD 'spacings' {fields['spacings']!r} must give 3 voxel sizes ({dim} axes)")
        check_spacing(spatial, path, "header's 'spacings'")  # ITK would drop a minus sign and read NaN as 1
        return check_axes(np.diag(spatial), path, "'spacings'")
    return None


def _vector(text: str, path: Path) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{path}: NRRD space direction ({text}) is not a vector of numbers") from None


def _data(fields: dict[str, str], path: Path, header_end: int) -> tuple[Path | None, int | None]:
    """Where the data is and at which byte: attached after the header, or `data file` (relative to the
    header); a list or pattern of files gives no single file to check."""
    try:
        skip, lines_skipped = int(fields.get("byte skip", "0")), int(fields.get("line skip", "0")) > 0
    except ValueError:
        raise InputError(f"{path}: NRRD 'byte skip' or 'line skip' is not an integer") from None
    name = fields.get("data file")
    if name is None:
        return path, None if lines_skipped else (-1 if skip == -1 else header_end + skip)
    if name.startswith("LIST") or len(name.split()) > 1:
        return None, None
    file = Path(name) if Path(name).is_absolute() else path.parent / name
    return file, None if lines_skipped else skip
