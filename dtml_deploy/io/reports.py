"""Report files (`--json`, `--csv`): checked before the work starts, written atomically, and a failure is
one line naming the file, never a traceback (outputs written before it stay)."""

from __future__ import annotations

import os
from pathlib import Path

from dtml_deploy.errors import InputError
from dtml_deploy.io.atomic import atomic_write_text


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


def write_report_text(path: Path, text: str, what: str) -> None:
    """`atomic_write_text`, with an unwritable destination reported as one `InputError` line."""
    try:
        atomic_write_text(Path(path), text)
    except OSError as e:
        raise InputError(f"{path}: cannot write {what}: {e.strerror or type(e).__name__}") from None
