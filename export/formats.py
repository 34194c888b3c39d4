"""The export formats, as the exporter, the backends, the CLI and the benchmark see them.

The table itself is `dtml_deploy.artifacts.FORMATS` (the runtime backends need it too and must not
import `export/`); this module re-exports it and adds what only exporting needs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dtml_deploy.artifacts import FORMATS, ArtifactFormat, artifact_format, format_for_path
from dtml_deploy.errors import BackendUnavailable

__all__ = ["FORMATS", "ArtifactFormat", "artifact_format", "artifact_path", "format_for_path",
           "missing_packages", "require_packages"]


def missing_packages(fmt: ArtifactFormat, *, run: bool = False) -> list[str]:
    """Packages (import names) absent here that building (or, with `run`, running) `fmt` needs."""
    names = fmt.run_packages if run else fmt.build_packages
    return [n for n in names if importlib.util.find_spec(n) is None]


def require_packages(fmt: ArtifactFormat, *, run: bool = False) -> None:
    """Raise `BackendUnavailable` naming the pip extra when a needed package is absent."""
    missing = missing_packages(fmt, run=run)
    if missing:
        verb = "running" if run else "exporting"
        raise BackendUnavailable(f"{verb} {fmt.name} artifacts needs {', '.join(missing)}; "
                                 f"pip install 'dtml[{fmt.extra}]'")


def artifact_path(out_dir: Path, fmt: ArtifactFormat | str, precision: str) -> Path:
    """Where an export of `fmt` at `precision` goes inside `out_dir` (e.g. `out/model-fp32.onnx`)."""
    fmt = artifact_format(fmt) if isinstance(fmt, str) else fmt
    return Path(out_dir) / fmt.filename(precision)
