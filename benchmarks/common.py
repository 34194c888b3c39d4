"""Helpers shared by the benchmark scripts: locating data, the machine's description, table printing."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def find_data() -> Path | None:
    """LA2018 root from DTML_DATA or ../shared/data, or None (dtml_deploy.io.datasets.find_la2018)."""
    from dtml_deploy.io.datasets import find_la2018

    return find_la2018()


def machine() -> str:
    """One line naming the hardware the numbers come from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (CPU)"


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` restricted to `columns`."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)
