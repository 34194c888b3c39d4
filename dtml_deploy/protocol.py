"""Inference protocols: named sets of settings that are measured together.

`dtml` is the toolkit's default (each value taken from the core dataclass that owns it); `paper` is the
released code's test loop (stride 18/18/4, constant blending, fp32, M_s's head, largest component), so
`--protocol paper` reproduces the paper's numbers in one flag.

Explicit settings: under `dtml` a value the user gives replaces the default. Under `paper` a value that
differs from the paper's is refused, because the result would no longer be the paper's protocol and
its numbers would be reported under the wrong name; a value equal to the paper's is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from dtml_deploy.engine.grid import PAPER_STRIDE, GridSpec
from dtml_deploy.engine.sliding import EngineConfig
from dtml_deploy.segment import SegmentOptions


@dataclass(frozen=True)
class InferenceProtocol:
    """Window grid, blending, precision, head, post-processing and TTA of one protocol."""

    name: str
    overlap: float | None  # None: not part of this protocol (it uses a fixed stride)
    stride: tuple[int, int, int] | None
    blend: str
    precision: str | None  # None: the device's default (fp16 on CUDA, fp32 on the CPU)
    head: str
    lcc: bool
    tta: bool


_ENGINE, _SEGMENT = EngineConfig(), SegmentOptions()
DTML = InferenceProtocol("dtml", overlap=_ENGINE.grid.overlap, stride=None, blend=_ENGINE.blend, precision=None,
                head=_ENGINE.head, lcc=_SEGMENT.lcc, tta=_ENGINE.tta)
PAPER = InferenceProtocol("paper", overlap=None, stride=PAPER_STRIDE, blend="constant", precision="fp32", head="seg",
                 lcc=True, tta=False)
PROTOCOLS: dict[str, InferenceProtocol] = {"dtml": DTML, "paper": PAPER}
# The settings a protocol fixes (PredictorSettings fields of these names).
PROTOCOL_SETTINGS: tuple[str, ...] = ("overlap", "stride", "blend", "precision", "head", "lcc", "tta")
_FLAGS = {"overlap": "--overlap", "stride": "--stride", "blend": "--blend", "precision": "--precision",
          "head": "--head", "lcc": "--lcc/--no-lcc", "tta": "--tta/--no-tta"}


def _shown(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return _FLAGS[key].split("/")[0 if value else 1]
    if isinstance(value, tuple):
        return f"{_FLAGS[key]} {' '.join(map(str, value))}"
    return f"{_FLAGS[key]} {value}"


def resolve_protocol(name: str, **explicit: Any) -> InferenceProtocol:
    """Protocol `name` with the settings the user gave explicitly (None: not given); see the module
    docstring for the rule. Raises ValueError for an unknown protocol or a contradiction."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {name!r}")
    unknown = set(explicit) - {f.name for f in fields(InferenceProtocol)} - {"name"}
    if unknown:
        raise ValueError(f"unknown protocol settings: {sorted(unknown)}")
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in explicit.items() if v is not None}
    base = PROTOCOLS[name]
    if name == "paper":
        for key, value in given.items():
            ours = getattr(base, key)
            if value != ours:
                uses = _shown(key, ours) if ours is not None else f"no {_FLAGS[key]}"
                raise ValueError(f"--protocol paper uses {uses}; {_shown(key, value)} contradicts it "
                                 "(drop it, or use --protocol dtml)")
        return base
    if "stride" in given:  # a fixed stride replaces the overlap fraction
        given.setdefault("overlap", base.overlap)
    return replace(base, **given)


def protocol_fields(p: InferenceProtocol) -> dict[str, Any]:
    """A protocol's settings as `PredictorSettings.build` keywords (the overlap is unused under a stride)."""
    return {"overlap": GridSpec().overlap if p.overlap is None else p.overlap, "stride": p.stride,
            "blend": p.blend, "precision": p.precision, "head": p.head, "lcc": p.lcc, "tta": p.tta}
