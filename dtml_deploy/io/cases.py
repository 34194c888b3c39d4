"""What a data set is made of: references to arrays on disk, labeled and unlabeled cases, case lists.

The plain types every layout reader shares (datasets.py, challenge.py), kept below both of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtml_deploy.errors import DataError


@dataclass(frozen=True)
class ArrayRef:
    """One array on disk: a NIfTI file, or one dataset of an h5 file."""

    path: Path
    dataset: str | None = None  # h5 dataset name (for the challenge layout: image | label); None for NIfTI
    preprocess: str | None = None  # "la2018-challenge": z-score / binarise, then crop (io/refs.py reads it)
    crop: tuple[int, int, int, int] | None = None  # x0, x1, y0, y1 of that crop
    problem: str | None = None  # why the crop cannot be made (its case's label is unusable): raised on read


@dataclass(frozen=True)
class LabeledCase:
    case_id: str
    image: ArrayRef
    label: ArrayRef


@dataclass(frozen=True)
class UnlabeledCase:
    case_id: str
    image: ArrayRef


def read_case_list(path: Path) -> list[str]:
    """Case ids of a list file, one per line (UA-MT's `<ID>/mri_norm2.h5` lines give `<ID>`)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: case list file does not exist")
    return [ln.strip().split("/")[0] for ln in path.read_text().splitlines() if ln.strip()]
