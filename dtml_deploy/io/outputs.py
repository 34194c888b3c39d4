"""Where `dtml segment` writes, planned before any inference.

A case's output set is its mask plus, as asked, `<case>_prob`, `_sdm`, `_uncertainty` (in the mask's
format), `<case>_preview.png` and `<case>_seg.dcm`. `plan_run` lays out every case's set and refuses,
before any work and with both names, a path that two cases would write (`x`'s `_prob` vs a case named
`x_prob`; one name from two folders; `a.nii` and `a.nii.gz`) or that is an input. `stale_outputs` finds
the files an older run left in a set that this run does not write, so that `--overwrite` replaces the
whole set (io/atomic.py) and a folder never mixes runs; only files recognised as such maps, previews or
SEGs are touched, never an input or another case's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dtml_deploy.errors import InputError
from dtml_deploy.io.formats import FILE_FORMATS, format_for_family, map_suffix
from dtml_deploy.io.reports import IMAGE_SUFFIXES, PNG, PNG_SOFTWARE, path_key
from dtml_deploy.io.volume import has_volume_suffix

MAPS: tuple[str, ...] = ("prob", "sdm", "uncertainty")
ROLES = {"mask": "mask", "prob": "probability map", "sdm": "distance map", "uncertainty": "uncertainty map",
         "preview": "preview", "dicom_seg": "DICOM SEG"}
# Suffixes that name a file dtml does not write as a mask: `-o` with one of them is refused, not made a folder.
NOT_MASK_SUFFIXES = (*IMAGE_SUFFIXES, PNG, ".jpg", ".jpeg", ".tif", ".tiff", ".json", ".csv", ".html", ".txt",
                     ".npy", ".npz", ".mgz", ".img", ".hdr", ".vtk", ".gz", ".zip")
_SEG_SOP_CLASS = b"1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage


@dataclass(frozen=True)
class OutputSpec:
    """What a run writes per case besides the mask."""

    maps: tuple[str, ...] = ()  # of MAPS
    preview: bool = False
    output_format: str = "auto"  # see io/formats.py


def output_is_file(path: Path) -> bool:
    """True when `-o PATH` names one mask file (.nii.gz, .nii, .nrrd, .mha), False for a folder; a name
    ending in a suffix dtml cannot write a mask as (.mhd, .nhdr, .h5, .dcm, .png, ...) is refused."""
    name = Path(path).name.lower()
    if name.endswith(tuple(FILE_FORMATS)):
        if name in FILE_FORMATS:
            raise InputError(f"{path}: -o names a mask file with no name before its suffix")
        return True
    wrong = next((s for s in NOT_MASK_SUFFIXES if name.endswith(s)), None)
    if wrong:
        raise InputError(f"{path}: dtml cannot write a mask as {wrong}; -o takes a folder or a file ending in "
                         f"{', '.join(FILE_FORMATS)}")
    return False


def path_family(path: Path) -> str:
    """The input family a path will read as (io/formats.py): nifti (also h5) | nrrd | mha | dicom."""
    name = Path(path).name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "mha"
    return "nifti" if has_volume_suffix(path) else "dicom"


def input_companions(src: Path) -> list[Path]:
    """The files besides `src` that reading it uses: the DICOM files of a slice's folder, the data file
    a `.nhdr`/`.mhd` header names (none for a file that cannot be read: that case fails by itself)."""
    name = src.name.lower()
    if path_family(src) == "dicom":  # its slices, not the masks or SEGs a run may have left beside them
        from dtml_deploy.io.dicom_series import is_dicom_file

        folder = src if src.is_dir() else src.parent
        return [f for f in folder.iterdir() if not has_volume_suffix(f) and is_dicom_file(f)
                and not _is_own(f, "dicom_seg")] if folder.is_dir() else []
    if not name.endswith((".nhdr", ".mhd")) or not src.is_file():
        return []
    found = []
    with open(src, "rb") as f:
        for raw in f.read(1 << 16).decode("latin-1").splitlines():
            key, sep, value = raw.partition("=" if name.endswith(".mhd") else ":")
            if sep and key.strip().lower() in ("elementdatafile", "data file", "datafile") and value.strip():
                found.append(src.parent / value.strip())
    return found


def case_outputs(src: Path, name: str, family: str, out: Path, spec: OutputSpec) -> dict[str, Path]:
    """The output set of the case `name` read from `src` (of `family`): role -> path."""
    if output_is_file(out):  # -o mask.nii.gz: the mask is that file, maps go beside it in its format
        suffix = next(x for x in FILE_FORMATS if out.name.lower().endswith(x))
        if spec.output_format not in ("auto", FILE_FORMATS[suffix]):
            raise InputError(f"{out}: --format {spec.output_format} disagrees with the file's suffix")
        out_dir, name = out.parent, out.name[: -len(suffix)]
        ext = out.name[len(name):]  # as the user spelled it
        paths = {"mask": out}
    else:
        fmt = format_for_family(family, spec.output_format, src)
        out_dir, ext = out, map_suffix(fmt)
        paths = {"mask": out_dir / f"{name}{ext}"}
        if fmt == "dicom-seg":
            paths["dicom_seg"] = out_dir / f"{name}_seg.dcm"
    for m in MAPS:
        if m in spec.maps:
            paths[m] = out_dir / f"{name}_{m}{ext}"
    if spec.preview:
        paths["preview"] = out_dir / f"{name}_preview.png"
    return paths


@dataclass
class RunPlan:
    """Every case's output set (None where the case will fail by itself), and what each planned path is."""

    cases: list[dict[str, Path] | None] = field(default_factory=list)
    taken: dict[str, str] = field(default_factory=dict)  # path_key -> "the mask of <input>", "the input <p>"

    def claim(self, path: Path, what: str) -> None:
        key = path_key(path)
        if key in self.taken:
            raise InputError(f"{path}: would be both {what} and {self.taken[key]}; rename an input or choose "
                             "another -o")
        self.taken[key] = what


def plan_run(inputs: Sequence[Path], names: Sequence[str], out: Path, spec: OutputSpec) -> RunPlan:
    """Lay out every case's outputs; refuse (InputError, both names) any path two of them share."""
    if output_is_file(out) and len(inputs) > 1:
        raise InputError(f"{out}: -o names one image file, but {len(inputs)} inputs were given; pass a folder")
    plan = RunPlan()
    for src in inputs:
        plan.claim(src, f"the input {src}")
    for src in inputs:  # files read with it (a DICOM slice's series folder, a detached header's data)
        for companion in input_companions(Path(src)):
            plan.taken.setdefault(path_key(companion), f"a file of the input {src}")
    seen: dict[tuple[str, str], Path] = {}
    for src, name in zip(inputs, names, strict=True):
        try:
            paths = case_outputs(Path(src), name, path_family(Path(src)), Path(out), spec)
        except InputError:  # an unusable --format for this input: the case reports it when it runs
            plan.cases.append(None)
            continue
        set_key = (path_key(paths["mask"].parent), name)
        if set_key in seen:
            raise InputError(f"{src}: has the same case name '{name}' as {seen[set_key]}, so their outputs in "
                             f"{paths['mask'].parent} would collide; rename one or segment them into different -o")
        seen[set_key] = Path(src)
        for role, path in paths.items():
            plan.claim(path, f"the {ROLES[role]} of {src}")
        plan.cases.append(paths)
    return plan


def _is_own(path: Path, role: str) -> bool:
    """Whether `path` looks like an output of `role` that dtml wrote (maps are float, masks are not)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if role == "preview":  # previews drawn before PNGs carried dtml's mark say only Matplotlib
        return head.startswith(b"\x89PNG") and (PNG_SOFTWARE in head or b"Software\x00Matplotlib" in head)
    if role == "dicom_seg":
        return head[128:132] == b"DICM" and _SEG_SOP_CLASS in head
    name = path.name.lower()
    if name.endswith(".nrrd"):
        return b"\ntype: float" in head
    if name.endswith(".mha"):
        return b"ElementType = MET_FLOAT" in head
    import nibabel as nib

    try:
        return nib.load(str(path)).get_data_dtype().kind == "f"
    except Exception:  # not a readable NIfTI: not a map dtml wrote
        return False


def stale_outputs(paths: dict[str, Path], protected: set[str] | frozenset[str] = frozenset()) -> list[Path]:
    """Files of the case's output set (its maps in any format, preview, SEG) that exist but this run does
    not write: what an older run left. `protected` (path_keys of the run's inputs and planned outputs)
    are never listed."""
    mask = paths["mask"]
    ext = next((x for x in FILE_FORMATS if mask.name.lower().endswith(x)), "")
    name, folder = mask.name[: len(mask.name) - len(ext)], mask.parent
    candidates = [(folder / f"{name}_{m}{e}", m) for m in MAPS for e in FILE_FORMATS]
    candidates += [(folder / f"{name}_preview.png", "preview"), (folder / f"{name}_seg.dcm", "dicom_seg")]
    keep = set(protected) | {path_key(p) for p in paths.values()}
    return [p for p, role in candidates if p.is_file() and path_key(p) not in keep and _is_own(p, role)]


def check_free(paths: dict[str, Path], protected: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse (without --overwrite) a case whose output set, or an older run's part of it, exists."""
    for p in [*paths.values(), *stale_outputs(paths, protected)]:
        if p.exists():
            raise InputError(f"{p}: exists (use --overwrite to replace it)")


@dataclass
class Leftovers:
    """`stale_outputs` as atomic_paths' `remove`: asked under the folder lock, at the moment the set goes in
    place (another run may have written since inference began); remembers what it found."""

    paths: dict[str, Path]
    protected: set[str] | frozenset[str] = frozenset()
    found: list[Path] = field(default_factory=list)

    def __call__(self) -> list[Path]:
        self.found = stale_outputs(self.paths, self.protected)
        return self.found
