"""A MetaImage header (.mha, .mhd): `Key = Value` lines up to `ElementDataFile`, which ends it (with
`LOCAL` the data follows in the same file). Keys are case-sensitive, as MetaIO reads them: a line
`elementspacing = 2 2 2`, or a `Comment` that mentions ElementSpacing, declares no spacing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dtml_deploy.errors import InputError
from dtml_deploy.io.geometry import check_spacing
from dtml_deploy.io.headers import ImageHeader, check_axes, header_lines

_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
               "MET_DOUBLE": 8}
_DIRECTION_KEYS = ("TransformMatrix", "Rotation", "Orientation")  # MetaIO's synonyms


def parse_meta(path: Path, geometry: bool = True) -> ImageHeader:
    """The fields of a MetaImage header and the geometry they declare (see the module docstring); with
    `geometry` False (the caller gives the spacing) the voxel axes are neither read nor checked."""
    lines, end = header_lines(path, b"ElementDataFile")
    fields: dict[str, str] = {}
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        cut = min((i for i in (text.find("="), text.find(":")) if i >= 0), default=-1)
        if cut < 0:
            raise InputError(f"{path}: cannot read MetaImage (line {n} is not 'Key = Value': {text[:60]!r})")
        fields[text[:cut].strip()] = text[cut + 1:].strip()
    if "ElementDataFile" not in fields:
        raise InputError(f"{path}: cannot read MetaImage (no ElementDataFile line, which ends the header)")
    if "NDims" not in fields:
        raise InputError(f"{path}: cannot read MetaImage (no NDims in the header)")
    if fields["NDims"] != "3":
        raise InputError(f"{path}: expected a 3D image, the MetaImage header says NDims = {fields['NDims']}")
    sizes = tuple(int(v) for v in _numbers(fields, "DimSize", path, int))
    kind = fields.get("ElementType", "")
    if kind not in _TYPE_BYTES:
        raise InputError(f"{path}: MetaImage ElementType {kind or '(missing)'!r} is not a numeric type")
    channels = int(_numbers(fields, "ElementNumberOfChannels", path, int, 1)[0]) \
        if "ElementNumberOfChannels" in fields else 1
    encoding = ("gzip" if fields.get("CompressedData", "False").lower() == "true" else
                "raw" if fields.get("BinaryData", "True").lower() == "true" else "text")
    data_file, offset = _data(fields["ElementDataFile"], path, end, fields.get("HeaderSize"))
    origin_key = next((k for k in ("Offset", "Position", "Origin") if k in fields), None)  # MetaIO's synonyms
    origin = tuple(_numbers(fields, origin_key, path)) if origin_key else (0.0, 0.0, 0.0)
    return ImageHeader(path, "mha", (channels, *sizes) if channels > 1 else sizes, _TYPE_BYTES[kind],
                       _axes(fields, path) if geometry else None, encoding, data_file, offset, origin, fields)


def _numbers(fields: dict[str, str], key: str, path: Path, cast: type = float, count: int = 3) -> list[float]:
    """`count` numbers of field `key` (present), or an `InputError` quoting it."""
    if key not in fields:
        raise InputError(f"{path}: MetaImage header has no {key}")
    try:
        values = [cast(v) for v in fields[key].split()]
    except ValueError:
        values = []
    if len(values) != count or (cast is int and min(values) < 1):
        what = "positive integers" if cast is int else "numbers"
        raise InputError(f"{path}: MetaImage {key} = {fields[key]!r} must be {count} {what}")
    return values


def _axes(fields: dict[str, str], path: Path) -> np.ndarray | None:
    """Voxel axes: the direction (TransformMatrix, column by column; identity when absent) scaled by
    ElementSpacing (ElementSize when there is no ElementSpacing, as ITK reads it); None without either."""
    key = "ElementSpacing" if "ElementSpacing" in fields else "ElementSize" if "ElementSize" in fields else None
    if key is None:
        return None
    spacing = check_spacing(_numbers(fields, key, path), path, f"header's {key}")  # ITK drops a minus sign
    name = next((k for k in _DIRECTION_KEYS if k in fields), None)
    if name is None:
        return check_axes(np.diag(spacing), path, key)
    direction = np.array(_numbers(fields, name, path, float, 9)).reshape(3, 3).T
    return check_axes(direction * np.asarray(spacing), path, f"the direction matrix ({name})")


def _data(name: str, path: Path, header_end: int, header_size: str | None) -> tuple[Path | None, int | None]:
    """Where the data is: LOCAL (after the header, or its last bytes for HeaderSize = -1), one file
    beside the header, or a list or pattern of files (none to check)."""
    if name == "LOCAL":
        return path, -1 if header_size == "-1" else header_end
    if name.startswith("LIST") or "%" in name or len(name.split()) > 1:
        return None, None
    file = Path(name) if Path(name).is_absolute() else path.parent / name
    skip = int(header_size) if header_size and header_size.isdigit() else 0
    return file, -1 if header_size == "-1" else skip
