"""What `dtml export` measured on its machine: milliseconds per window of each model it wrote, beside torch.

`dtml export --openvino` times every CPU-runnable model of its folder and torch on the machine it runs on and
writes `speed.json` there. `--backend auto --artifact FOLDER` ranks the folder's models by that record when it
was measured on the same kind of machine (CPU model and logical cores) for the very files present (their
SHA-256); otherwise by the repository's measured ranking (dtml_deploy/backend_choice.py), and says why.
A CPU with other instructions (VNNI, AMX, bf16) or more cores can rank the runtimes differently, which is
why the folder's own measurement comes first.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dtml_deploy.io.atomic import atomic_write_text
from dtml_deploy.io.digest import file_sha256

SPEED_FILE = "speed.json"
SCHEMA = 1


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what `platform` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def host_id() -> str:
    """The machine as a speed ranking depends on it: CPU model and logical cores."""
    return f"{cpu_name()}, {os.cpu_count()} logical cores"


def weights_digest(artifact: Path) -> str:
    """SHA-256 of the file a model's speed belongs to: an IR's `.bin` (its `.xml` names it), else the file."""
    path = Path(artifact)
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else path
    return file_sha256(weights)


@dataclass(frozen=True)
class Timing:
    """One measured row: `backend` running `artifact` (a file name in the folder; '' = the bundle itself)."""

    backend: str
    precision: str
    artifact: str
    ms_per_window: float
    sha256: str = ""

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass(frozen=True)
class SpeedRecord:
    """Every row timed by one export, on `host`, `batch` windows of the bundle's patch per forward."""

    host: str
    batch: int
    rows: tuple[Timing, ...]
    runtimes: dict[str, str] = field(default_factory=dict)  # package -> version, for the reader
    schema: int = SCHEMA

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeedRecord:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"schema {d.get('schema')!r}, this dtml reads {SCHEMA}")
        rows = tuple(Timing(**r) for r in d["rows"])
        if any(not r.ms_per_window > 0 for r in rows):
            raise ValueError("a row without a positive ms_per_window")
        return cls(host=str(d["host"]), batch=int(d["batch"]), rows=rows, runtimes=dict(d.get("runtimes", {})))

    def summary(self) -> str:
        """'openvino int8 410 ms, torch fp32 1350 ms, ...' fastest first."""
        fastest_first = sorted(self.rows, key=lambda r: r.ms_per_window)
        return ", ".join(f"{r.label} {r.ms_per_window:.0f} ms" for r in fastest_first)


def write_record(folder: Path, record: SpeedRecord) -> Path:
    """`folder/speed.json`, written atomically."""
    path = Path(folder) / SPEED_FILE
    atomic_write_text(path, record.to_json())
    return path


def read_record(folder: Path) -> tuple[SpeedRecord | None, str]:
    """The folder's record when it applies here, or None and why not ('' when there is no record)."""
    path = Path(folder) / SPEED_FILE
    if not path.is_file():
        return None, ""
    try:
        record = SpeedRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{path} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if record.host != host_id():
        return None, f"{path} was measured on another machine ({record.host})"
    return record, ""


def row_applies(row: Timing, folder: Path) -> bool:
    """The row's file is present and is the very file that was timed (torch's row needs no file)."""
    if not row.artifact:
        return True
    path = Path(folder) / row.artifact
    return path.is_file() and (not row.sha256 or weights_digest(path) == row.sha256)
