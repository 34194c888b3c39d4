"""Checkpoints without pickle: tensors in safetensors, scalars in JSON, written atomically.

A checkpoint holds the weights (BatchNorm statistics included), the SGD momentum buffers, the RNG
states and the iteration; the data stream needs nothing (see data/sampler.py). Resuming from it on
the CPU continues bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dtml_deploy.errors import DtmlError, first_line
from dtml_deploy.io.atomic import atomic_dir


def _optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[f"{prefix}.{i}"] = buf.detach().cpu().contiguous()
    return out


def save_checkpoint(path: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                    iteration: int, extra: dict[str, Any]) -> None:
    """Write `path/` = state.safetensors + state.json, replacing any previous checkpoint atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, opt in optimizers.items():
        tensors.update(_optimizer_tensors(f"opt.{name}", opt))
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"iteration": iteration, **extra}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The JSON half of a checkpoint (iteration, config, data fingerprint), read without the tensors."""
    if not (path / "state.json").is_file() or not (path / "state.safetensors").is_file():
        raise DtmlError(f"{path}: no checkpoint to resume from")
    try:
        meta = json.loads((path / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DtmlError(f"{path / 'state.json'}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("iteration"), int) or not isinstance(
            meta.get("config"), dict):
        raise DtmlError(f"{path / 'state.json'}: not a dtml checkpoint (no iteration or config)")
    return meta


def load_checkpoint(path: Path, model: torch.nn.Module,
                    optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore model, optimizers and RNG states in place; returns the JSON metadata.
    Every failure (unreadable file, missing or misshapen tensors) is one `DtmlError` naming the file."""
    meta = read_checkpoint_meta(path)
    tensor_file = path / "state.safetensors"
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise DtmlError(f"{tensor_file}: unreadable checkpoint ({first_line(e)})") from None
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    # torch forgives a missing BatchNorm counter; a checkpoint must hold everything it saved
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(model_state)), sorted(set(model_state) - expected)
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise DtmlError(f"{tensor_file}: the checkpoint's weights do not fit this network ({what}; "
                        f"{len(missing)} missing, {len(extra)} unexpected)")
    try:
        model.load_state_dict(model_state)
    except RuntimeError as e:
        raise DtmlError(f"{tensor_file}: the checkpoint's weights do not fit this network "
                        f"({first_line(e)})") from None
    bad = [k for k, v in model_state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DtmlError(f"{tensor_file}: the checkpoint holds non-finite weights ({bad[0]})")
    if "rng.torch" not in tensors:
        raise DtmlError(f"{tensor_file}: the checkpoint has no random-number state (rng.torch)")
    for name, opt in optimizers.items():
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            key = f"opt.{name}.{i}"
            if key in tensors:
                opt.state[p]["momentum_buffer"] = tensors[key].to(p.device)
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])
    return meta


