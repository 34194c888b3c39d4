"""What a run folder may hold before training starts: a run is never replaced or continued by accident.

A fresh run refuses a folder that already holds a checkpoint, a bundle or a log unless `overwrite`
is asked for; a resumed run must match the checkpoint's configuration (only `iterations` may change,
and only upwards).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from dtml_deploy.errors import DtmlError
from dtml_training.config import RunPaths, TrainConfig


def existing_outputs(paths: RunPaths) -> list[str]:
    """Names of the run outputs present in the folder."""
    return [p.name for p in (paths.checkpoint, paths.bundle, paths.log) if p.exists()]


def check_run_folder(paths: RunPaths, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh run over an existing one (without `overwrite`) and contradictory flags."""
    if resume and overwrite:
        raise DtmlError("--resume continues the run in the folder and --overwrite replaces it; pass only one")
    if paths.out.exists() and not paths.out.is_dir():
        raise DtmlError(f"{paths.out}: exists and is not a folder")
    found = existing_outputs(paths)
    if found and not resume and not overwrite:
        raise DtmlError(f"{paths.out} already holds a training run ({', '.join(found)}); "
                        "continue it with --resume or replace it with --overwrite")


def clear_run(paths: RunPaths) -> None:
    """Remove a previous run's outputs (for `overwrite`), so no old bundle sits beside a new checkpoint."""
    for p in (paths.checkpoint, paths.bundle):
        if p.is_dir():
            shutil.rmtree(p)
    paths.log.unlink(missing_ok=True)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def resume_start(meta: dict[str, Any], cfg: TrainConfig, checkpoint: Path) -> int:
    """The iteration to resume at, after checking the checkpoint was made by this configuration."""
    try:
        saved = TrainConfig.from_dict(meta["config"]).to_dict()
    except (KeyError, TypeError, ValueError) as e:
        raise DtmlError(f"{checkpoint}: the checkpoint's configuration is unreadable ({e})") from None
    old, new = _flat(saved), _flat(cfg.to_dict())
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if k != "iterations" and old.get(k) != new.get(k)]
    if changed:
        raise DtmlError(f"{checkpoint}: the checkpoint was made with a different configuration "
                        f"({'; '.join(changed[:4])}); only --iterations may change on resume")
    start = int(meta["iteration"])
    if start >= cfg.iterations:
        raise DtmlError(f"{checkpoint}: the checkpoint is at iteration {start}, so --iterations "
                        f"{cfg.iterations} leaves nothing to train; pass a larger --iterations")
    return start
