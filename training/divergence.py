"""Stopping a run whose losses or weights stopped being finite, before anything non-finite is saved.

The loss values are checked where the logger already fetches them from the device (one transfer per
flush, see logs.py), so the check adds no per-iteration synchronisation; the weights are checked
(one reduction) right before every checkpoint and the bundle are written.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dtml_deploy.errors import DtmlError


class TrainingDiverged(DtmlError):
    """A loss term or a weight became NaN or infinite; nothing non-finite was saved."""


def nonfinite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the floating parameters and buffers of `module` holding NaN or inf."""
    state = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
    if not state:
        return []
    ok = torch.stack([torch.isfinite(v).all() for v in state.values()]).cpu()
    return [name for name, good in zip(state, ok.tolist()) if not good]


def on_any_rank(flag: bool, device: torch.device) -> bool:
    """`flag` or'ed over the ranks of a distributed run (all ranks must call this together)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
