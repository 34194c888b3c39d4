"""Reading a run's `train_log.jsonl`, also while the run is still writing it.

The logger appends whole lines, but a reader can catch the last one half written: an incomplete last
line is left for later (`LogTail`) or ignored (`read_log`), never an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _parse(lines: list[str]) -> list[dict[str, Any]]:
    rows = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short (the writer was interrupted mid-line)
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every complete row of a JSONL log (a partial last line is skipped)."""
    text = Path(path).read_text(errors="replace")
    return _parse(text.split("\n"))


class LogTail:
    """Hands out the rows appended to a log since the last call.

    Starts at the end of what the file holds now (`from_start=False`), so an older run's rows in a file
    that the trainer is about to replace are not taken for this run's. A replaced or truncated file
    (new inode, or shorter than what was read) is read from its beginning.
    """

    def __init__(self, path: Path, from_start: bool = False) -> None:
        self.path = Path(path)
        self._inode: int | None = None
        self._offset = 0
        if not from_start and self.path.exists():
            st = self.path.stat()
            self._inode, self._offset = st.st_ino, st.st_size

    def read_new(self) -> list[dict[str, Any]]:
        """Complete rows written since the last call; an unfinished last line waits for the next one."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_ino != self._inode or st.st_size < self._offset:
                self._inode, self._offset = st.st_ino, 0
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        return _parse(data[: end + 1].decode("utf-8", errors="replace").split("\n"))
