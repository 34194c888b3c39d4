"""Which parser reads a NRRD or MetaImage header. Kept apart from headers.py, which holds what both
parsers use, so that the parsers and that shared part do not import each other."""

from __future__ import annotations

from pathlib import Path

from dtml_deploy.errors import InputError
from dtml_deploy.io.headers import ImageHeader
from dtml_deploy.io.meta_header import parse_meta
from dtml_deploy.io.nrrd_header import parse_nrrd


def read_header(path: Path, geometry: bool = True) -> ImageHeader:
    """The parsed header of a .nrrd/.nhdr/.mha/.mhd file (an `InputError` naming what is wrong); with
    `geometry` False its spacing and direction are left unread (the caller gives the spacing)."""
    path = Path(path)
    try:
        if path.name.lower().endswith((".nrrd", ".nhdr")):
            return parse_nrrd(path, geometry)
        return parse_meta(path, geometry)
    except OSError as e:
        raise InputError(f"{path}: cannot read the header ({e.strerror or e})") from None
