"""Helpers shared by the benchmark scripts: locating data, the machine's description, table printing."""

from __future__ import annotations

from pathlib import Path

import torch

from dtml_export.benchmark import machine as export_machine
from dtml_export.benchmark import markdown_table

REPO = Path(__file__).resolve().parent.parent


def find_data() -> Path | None:
    """LA2018 root from DTML_DATA or ../shared/data, or None (dtml_deploy.io.datasets.find_la2018)."""
    from dtml_deploy.io.datasets import find_la2018

    return find_la2018()


def machine() -> str:
    """One line naming the hardware the numbers come from (the GPU when torch sees one)."""
    return export_machine(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# One Markdown table writer for the benchmark scripts and `dtml benchmark`.
table = markdown_table
