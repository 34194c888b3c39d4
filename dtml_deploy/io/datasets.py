"""Where training cases come from, and the labeled/unlabeled split.

Four layouts:
- LA2018 NIfTI: `<root>/images/<ID>.nii.gz`, `<root>/labels/<ID>.nii.gz`, `<root>/splits.json`;
- UA-MT h5: `<root>/<ID>/mri_norm2.h5` (datasets `image`, `label`) listed in `<root>/train.list`;
- the LA challenge download (`la2018-challenge`): `<root>/<ID>/lgemri.nrrd` + `laendo.nrrd`, preprocessed
  on the fly as the h5 files were (challenge.py);
- a generic pair of folders: `--data IMAGES_DIR --labels LABELS_DIR`, matched by file name.

The split returns `LabeledCase`s, which carry a label reference, and `UnlabeledCase`s, which do not:
code holding an unlabeled case has no way to reach its label, so a semi-supervised run cannot read it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dtml_deploy.errors import DataError
from dtml_deploy.io.cases import ArrayRef, LabeledCase, UnlabeledCase, read_case_list
from dtml_deploy.io.scan import NIFTI_SUFFIXES

__all__ = ["ArrayRef", "DataSource", "LabeledCase", "Split", "UnlabeledCase", "find_la2018", "make_split",
           "open_source", "read_case_list"]


@dataclass(frozen=True)
class DataSource:
    """A data set: ordered case ids and how to find each one's image and label."""

    root: Path
    layout: str  # la2018 | h5 | folders | la2018-challenge
    case_ids: tuple[str, ...]
    splits: dict[str, list[str]]
    labels_dir: Path | None = None
    suffix: str = ".nii.gz"
    labeled_pool: tuple[str, ...] | None = None  # cases that have a label; None: every case
    notes: tuple[str, ...] = ()  # what the root holds besides its cases (skipped; callers print them)

    def image_ref(self, case_id: str) -> ArrayRef:
        if self.layout == "la2018-challenge":
            from dtml_deploy.io.challenge import case_ref

            return case_ref(self.root, case_id, "image")
        if self.layout == "h5":
            return ArrayRef(self.root / case_id / "mri_norm2.h5", "image")
        folder = self.root / "images" if self.layout == "la2018" else self.root
        return ArrayRef(folder / f"{case_id}{self.suffix}")

    def _label_ref(self, case_id: str) -> ArrayRef:
        if self.layout == "la2018-challenge":
            from dtml_deploy.io.challenge import case_ref

            return case_ref(self.root, case_id, "label")
        if self.layout == "h5":
            return ArrayRef(self.root / case_id / "mri_norm2.h5", "label")
        folder = self.root / "labels" if self.layout == "la2018" else self.labels_dir
        if folder is None:
            raise DataError(f"{self.root}: no labels folder configured")
        return ArrayRef(folder / f"{case_id}{self.suffix}")

    def labeled(self, case_id: str) -> LabeledCase:
        return LabeledCase(case_id, self.image_ref(case_id), self._label_ref(case_id))

    def unlabeled(self, case_id: str) -> UnlabeledCase:
        return UnlabeledCase(case_id, self.image_ref(case_id))


def _listed(listed: list[str], found: list[str], list_file: Path, root: Path) -> list[str]:
    """The ids of a case-list file, each checked to have an image."""
    if not listed:
        raise DataError(f"{list_file}: the case list is empty")
    missing = [i for i in listed if i not in set(found)]
    if missing:
        raise DataError(f"{list_file}: {len(missing)} listed case(s) have no image in {root} "
                        f"(first: {missing[0]!r})")
    return listed


def _labeled_pool(ids: list[str], labels_dir: Path, suffix: str, root: Path) -> tuple[str, ...]:
    """The images that have a label file of the same name; an empty or unmatched folder is an error."""
    labels = sorted(p.name for p in labels_dir.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
    if not labels:
        raise DataError(f"{labels_dir}: the labels folder holds no .nii/.nii.gz files")
    names = set(labels)
    pool = tuple(i for i in ids if f"{i}{suffix}" in names)
    if not pool:
        raise DataError(f"none of the {len(labels)} label files in {labels_dir} has the name of an image in "
                        f"{root} (labels like {labels[0]!r}, images like {ids[0] + suffix!r})")
    return pool


def open_source(root: Path, labels_dir: Path | None = None, list_file: Path | None = None) -> DataSource:
    """Detect the layout of `root` and list its cases (in list-file order)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder does not exist")
    if labels_dir is not None:
        if not Path(labels_dir).is_dir():
            raise DataError(f"{labels_dir}: labels folder does not exist")
        ids = sorted(p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
                     for p in root.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        if not ids:
            raise DataError(f"{root}: no .nii/.nii.gz images found")
        suffixes = {".nii.gz" if p.name.endswith(".nii.gz") else ".nii" for p in root.iterdir()
                    if p.name.endswith(NIFTI_SUFFIXES)}
        if len(suffixes) != 1:
            raise DataError(f"{root}: mixes .nii and .nii.gz files")
        suffix = suffixes.pop()
        if list_file is not None:
            ids = _listed(read_case_list(Path(list_file)), ids, Path(list_file), root)
        pool = _labeled_pool(ids, Path(labels_dir), suffix, root)
        return DataSource(root, "folders", tuple(ids), {"train": ids}, Path(labels_dir), suffix, pool)
    if (root / "images").is_dir():
        splits_path = root / "splits.json"
        splits: dict[str, list[str]] = {}
        if splits_path.is_file():
            try:
                raw = json.loads(splits_path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"{splits_path}: not valid JSON ({e})") from None
            splits = {k: list(v) for k, v in raw.items() if isinstance(v, list)}
        if list_file is not None:
            found = [p.name[: -len(".nii.gz")] for p in (root / "images").glob("*.nii.gz")]
            ids = _listed(read_case_list(Path(list_file)), found, Path(list_file), root / "images")
        elif "train" in splits:
            ids = splits["train"]
        else:
            ids = sorted(p.name[: -len(".nii.gz")] for p in (root / "images").glob("*.nii.gz"))
        if not ids:
            raise DataError(f"{root}: no cases found in images/")
        splits.setdefault("train", ids)
        return DataSource(root, "la2018", tuple(ids), splits)
    from dtml_deploy.io.challenge import LAYOUT, challenge_ids, stray_notes

    challenge = challenge_ids(root, list_file)
    if challenge:
        return DataSource(root, LAYOUT, tuple(challenge), {"train": challenge}, notes=tuple(stray_notes(root)))
    lst = Path(list_file) if list_file is not None else root / "train.list"
    if lst.is_file():
        ids = read_case_list(lst)
        if not ids:
            raise DataError(f"{lst}: the case list is empty")
        return DataSource(root, "h5", tuple(ids), {"train": ids})
    raise DataError(f"{root}: unrecognised layout (expected images/ + labels/, <ID>/mri_norm2.h5 + "
                    "train.list, <ID>/lgemri.nrrd, or --labels DIR for a folder pair)")


@dataclass(frozen=True)
class Split:
    labeled: tuple[LabeledCase, ...]
    unlabeled: tuple[UnlabeledCase, ...]
    validation: tuple[LabeledCase, ...]


def make_split(source: DataSource, n_labeled: int, n_unlabeled: int | None, n_val: int = 0,
               labeled_ids: Sequence[str] | None = None) -> Split:
    """The paper's split: labeled = `labeled_<n>` of splits.json if present, else the first n cases;
    unlabeled = the rest (or its first `n_unlabeled`); validation = the last `n_val` of the rest,
    removed from training. Validation labels are read only for validation."""
    ids = list(source.case_ids)
    if labeled_ids is None:
        labeled_ids = _default_labeled(source, n_labeled)
    labeled_ids = list(labeled_ids)
    if not labeled_ids:
        raise DataError("the labeled list is empty: every recipe needs at least one labeled case")
    unknown = [i for i in labeled_ids if i not in ids]
    if unknown:
        raise DataError(f"labeled cases not in the data set: {unknown[:5]}")
    rest = [i for i in ids if i not in set(labeled_ids)]
    if n_val:
        if n_val > len(rest):
            raise DataError(f"asked for {n_val} validation cases, but only {len(rest)} of the {len(ids)} cases "
                            f"are left after the {len(labeled_ids)} labeled ones")
        val_ids, rest = rest[len(rest) - n_val:], rest[: len(rest) - n_val]
    else:
        val_ids = []
    unl_ids = rest if n_unlabeled is None else rest[:n_unlabeled]
    if n_unlabeled is not None and len(unl_ids) < n_unlabeled:
        raise DataError(f"asked for {n_unlabeled} unlabeled cases, but only {len(rest)} of the {len(ids)} cases "
                        f"are left after {len(labeled_ids)} labeled and {len(val_ids)} validation cases")
    return Split(tuple(source.labeled(i) for i in labeled_ids),
                 tuple(source.unlabeled(i) for i in unl_ids),
                 tuple(source.labeled(i) for i in val_ids))


def _default_labeled(source: DataSource, n: int) -> list[str]:
    """splits.json's `labeled_<n>` when present, else the first `n` cases that have labels."""
    named = source.splits.get(f"labeled_{n}")
    if named is not None:
        if len(named) != n:
            raise DataError(f"{source.root}: splits.json's labeled_{n} lists {len(named)} cases, not {n}")
        return list(named)
    pool = list(source.labeled_pool if source.labeled_pool is not None else source.case_ids)
    if len(pool) < n:
        have = (f"only {len(pool)} of its {len(source.case_ids)} images have a label"
                if source.labeled_pool is not None else f"the data set has {len(pool)} cases")
        raise DataError(f"asked for {n} labeled cases, but {have}")
    return pool[:n]


def find_la2018() -> Path | None:
    """The LA2018 folder (holding images/ and labels/), or None when absent.

    Looks in $DTML_DATA (a data root holding LA2018/, or LA2018 itself), then in ../shared/data next to
    this source checkout (the developers' layout). Tests and benchmarks find the full data set this way.
    """
    checkout = Path(__file__).resolve().parents[2]
    for base in (os.environ.get("DTML_DATA"), checkout.parent / "shared" / "data"):
        if not base:
            continue
        for cand in (Path(base), Path(base) / "LA2018"):
            if (cand / "images").is_dir() and (cand / "labels").is_dir():
                return cand
    return None
