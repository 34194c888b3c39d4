"""Which backend a request runs on, refusing options that backend would silently drop.

`--artifact` names a file (it runs on its format's backend) or an export folder (`dtml export -o DIR`):
from a folder the backend and file are picked by `pick_from_folder`: the fastest among the artifacts present
whose runtime is installed, by the folder's own timing on this machine (`speed.json`, written by `dtml export
--openvino`: dtml_deploy/speed_record.py) or else by the repository's measured order (`CPU_RANKING`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from dtml_deploy.artifacts import FORMATS, format_for_path
from dtml_deploy.speed_record import SPEED_FILE, SpeedRecord, read_record, row_applies

# Fastest first, whole scans on the CPU (benchmarks/openvino_speed.py -> benchmarks/results/openvino_speed_cpu.json,
# default grid, median of 3 interleaved rounds on a 2-core Xeon: openvino int8 2.9x torch fp32, openvino fp32
# level with it, 1.01x). The test of this module checks the order against that file. Each entry: (backend,
# precision of its artifact); torch needs none, so it ends the list. A folder timed by `dtml export` on the
# machine that runs it (speed.json) is ranked by that measurement instead.
CPU_RANKING: tuple[tuple[str, str], ...] = (("openvino", "int8"), ("openvino", "fp32"), ("torch", "fp32"))
CUDA_RANKING: tuple[tuple[str, str], ...] = (("trt", "fp16"), ("trt", "fp32"), ("torch", "fp16"))
RANKING_SOURCE = "benchmarks/results/openvino_speed_cpu.json"


@dataclass(frozen=True)
class Choice:
    """A backend picked from an export folder, the file it runs (None: the bundle itself) and why."""

    backend: str
    artifact: Path | None
    reason: str
    precision: str | None = None  # torch's measured precision when it won (None: the settings' own)


def _installed(backend: str) -> bool:
    return backend == "torch" or all(importlib.util.find_spec(p) is not None for p in FORMATS[backend].run_packages)


def pick_from_folder(folder: Path, backend: str, device_type: str, precision: str | None = None) -> Choice:
    """The fastest (backend, artifact) in `folder` for `device_type` whose runtime is installed: by the folder's
    own measurement (`speed.json`, written by `dtml export --openvino` on this machine) when it applies, else
    by the repository's ranking. `backend` other than auto restricts the choice to that backend (a ValueError
    when it has no file there); a `precision` given restricts torch's measured rows to it."""
    record, why_not = read_record(folder) if device_type == "cpu" else (None, "")
    if record is not None:
        measured = _pick_measured(Path(folder), record, backend, precision)
        if measured is not None:
            return measured
    choice = _pick_ranked(Path(folder), backend, device_type)
    return Choice(choice.backend, choice.artifact, f"{choice.reason}; {why_not}" if why_not else choice.reason)


def _pick_measured(folder: Path, record: SpeedRecord, backend: str, precision: str | None) -> Choice | None:
    """The fastest row of `record` that can run here now, or None when none of its rows can."""
    wanted = (r for r in sorted(record.rows, key=lambda r: r.ms_per_window) if backend in ("auto", r.backend)
              and (r.backend != "torch" or precision in (None, r.precision)) and _installed(r.backend))
    best = next((r for r in wanted if row_applies(r, folder)), None)  # hashes only the files it reaches
    if best is None:
        return None
    torch_row = next((r for r in record.rows if r.backend == "torch" and r.precision == "fp32"), None)
    than = (f", {torch_row.ms_per_window / best.ms_per_window:.1f}x torch fp32"
            if torch_row is not None and best is not torch_row else "")
    where = f" ({folder / best.artifact})" if best.artifact else ""
    return Choice(best.backend, folder / best.artifact if best.artifact else None,
                  f"{best.label}{where}: {best.ms_per_window:.0f} ms per window{than}, the fastest measured "
                  f"on this machine ({folder / SPEED_FILE}: {record.summary()})",
                  best.precision if best.backend == "torch" else None)


def _pick_ranked(folder: Path, backend: str, device_type: str) -> Choice:
    """The first entry of the repository's ranking for `device_type` with a usable file in `folder`."""
    ranking = CUDA_RANKING if device_type == "cuda" else CPU_RANKING
    passed_over = []
    for name, precision in ranking:
        if backend not in ("auto", name):
            continue
        if name == "torch":
            why = f"; {', '.join(passed_over)}" if passed_over else ""
            return Choice("torch", None, f"torch {precision} (no faster artifact usable in {folder}{why})")
        path = folder / FORMATS[name].filename(precision)
        if not path.is_file():
            continue
        if not _installed(name):
            passed_over.append(f"{path.name} skipped: pip install 'dtml[{FORMATS[name].extra}]' to run it")
            continue
        return Choice(name, path, f"{name} {precision} ({path}), the fastest measured on the {device_type} "
                                  f"({RANKING_SOURCE})")
    present = sorted(p.name for f in FORMATS.values() for p in folder.glob(f"model-*{f.suffix}"))
    for p in present:  # another precision of the asked backend (e.g. model-fp32.xml): run it as named
        fmt = format_for_path(Path(p))
        if backend in ("auto", fmt.backend) and _installed(fmt.backend):
            return Choice(fmt.backend, folder / p, f"{fmt.backend} ({folder / p}), the only usable "
                                                   f"artifact in {folder}")
    raise ValueError(f"--artifact {folder}: no artifact for --backend {backend} there "
                     f"(found: {', '.join(present) or 'none'}); make one with `dtml export -o {folder}`")


def resolve_backend(backend: str, artifact: Path | None, *, compile: bool = False,
                    cuda_graphs: bool | None = None, cudnn_fusion: bool | None = None) -> str:
    """The backend to create: `auto` with `--artifact` runs the artifact's own backend (an .onnx on
    onnx, an .engine on trt, an .xml on openvino); `--artifact` with `--backend torch`, and torch-only
    switches with another backend, are refused (ValueError) instead of being ignored."""
    if artifact is not None:
        fmt = format_for_path(artifact)
        if backend == "torch":
            raise ValueError(f"--artifact {artifact} needs --backend {fmt.backend} (or auto); "
                             "the torch backend runs the bundle itself")
        if backend == "auto":
            backend = fmt.backend
    if backend != "torch" and backend != "auto":
        torch_only = [flag for flag, on in (("--compile", compile), ("--cuda-graphs", cuda_graphs),
                                            ("--cudnn-fusion", cudnn_fusion)) if on]
        if torch_only:
            raise ValueError(f"{torch_only[0]} is an option of the torch backend; --backend {backend} cannot "
                             "honour it")
    return backend
