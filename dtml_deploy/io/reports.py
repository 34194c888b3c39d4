"""Report and picture files (`--json`, `--csv`, `--report`, `--plot`, `dtml plot -o`): checked before the work
starts, written atomically, and a failure is one line naming the file, never a traceback (outputs written
before it stay).

A report path may not be an input or another output of the same run (`taken`), and may replace an existing
file only when that file is a report of the same kind, as an earlier run wrote it: a scan, a label, a
training log or another command's report is refused with both names (segment's `--overwrite` lets it
replace a file that is none of this run's inputs or outputs). Empty files hold nothing to lose.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dtml_deploy.errors import InputError
from dtml_deploy.io.atomic import atomic_write_text, path_key

# Names a report or picture never takes: what dtml reads or writes as an image.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".h5", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
PNG = ".png"
PNG_SOFTWARE = b"Software\x00dtml"  # the tEXt chunk figure_png writes into every picture dtml draws
_SNIFF_BYTES = 4096
_MAX_JSON_BYTES = 256 * 2**20  # a larger "report" is not one dtml wrote; do not parse it


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(_SNIFF_BYTES)
    except OSError:
        return b""


def _json_keys(path: Path) -> set[str]:
    if path.stat().st_size > _MAX_JSON_BYTES or not _head(path).lstrip().startswith(b"{"):
        return set()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    return set(doc) if isinstance(doc, dict) else set()


@dataclass(frozen=True)
class ReportKind:
    """A kind of file a command writes: what it is called in messages, and how an earlier one is recognised."""

    what: str
    recognise: Callable[[Path], bool]
    picture: bool = False  # a PNG: the name must end in .png


SEGMENT_JSON = ReportKind("the JSON report", lambda p: {"cases", "engine", "bundle_hash"} <= _json_keys(p))
EVALUATE_JSON = ReportKind("the JSON report", lambda p: {"summary", "cases"} <= _json_keys(p))
BENCHMARK_JSON = ReportKind("the JSON report", lambda p: {"machine", "request", "rows"} <= _json_keys(p))
EVALUATE_CSV = ReportKind("the CSV report", lambda p: _head(p).split(b"\n", 1)[0].split(b",")[0].strip() == b"case")
EVALUATE_HTML = ReportKind("the HTML report", lambda p: b"<title>dtml evaluation</title>" in _head(p))
PICTURE = ReportKind("the picture", lambda p: _head(p).startswith(b"\x89PNG") and PNG_SOFTWARE in _head(p),
                     picture=True)


def check_report_path(path: Path, what: str) -> None:
    """Refuse a report path that cannot be a file: an existing folder, or a file where a folder must be."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; {what} needs a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{path}: {parent} is a file, not a folder; {what} cannot be written there")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: the folder {parent} is not writable; {what} cannot be written there")


def check_report_target(path: Path, kind: ReportKind, taken: Mapping[str, str] | None = None,
                        overwrite: bool | None = None, what: str | None = None) -> None:
    """Refuse, before any work, a path `kind` cannot be written to: see the module docstring. `taken` maps
    `path_key`s to what the run reads or writes there; `overwrite` is None for a command without --overwrite."""
    path, what = Path(path), what or kind.what
    check_report_path(path, what)
    other = (taken or {}).get(path_key(path))
    if other is not None:
        raise InputError(f"{path}: {what} would overwrite {other}; choose another name")
    name = path.name.lower()
    if kind.picture and not name.endswith(PNG):
        raise InputError(f"{path}: {what} is written as PNG; give a name ending in .png (or a folder)")
    wrong = next((s for s in (*IMAGE_SUFFIXES, PNG) if name.endswith(s) and not kind.picture), None)
    if wrong:
        raise InputError(f"{path}: {what} would be named like an image ({wrong}); choose another name")
    if path.is_file() and path.stat().st_size > 0 and not overwrite and not kind.recognise(path):
        hint = " or pass --overwrite" if overwrite is False else ""
        raise InputError(f"{path}: exists and is not {what} of an earlier run; not replaced (choose another "
                         f"name{hint})")


def check_distinct(targets: Sequence[tuple[Path | None, str]]) -> None:
    """Refuse one path given for two outputs of a command (`--json r --csv r`), naming both options."""
    seen: dict[str, str] = {}
    for path, option in targets:
        if path is None:
            continue
        key = path_key(path)
        if key in seen:
            raise InputError(f"{path}: given for both {seen[key]} and {option}; each needs its own file")
        seen[key] = option


def picture_target(given: str | Path, default_name: str) -> Path:
    """A picture option's path: a folder (an existing one, or a name ending in '/') gets `default_name`
    inside it; anything else is the file itself (check_report_target refuses a suffix other than .png)."""
    text = str(given)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return Path(text) / default_name
    return Path(text)


def write_report_text(path: Path, text: str, what: str) -> None:
    """`atomic_write_text`, with an unwritable destination reported as one `InputError` line."""
    try:
        atomic_write_text(Path(path), text)
    except OSError as e:
        raise InputError(f"{path}: cannot write {what}: {e.strerror or type(e).__name__}") from None
