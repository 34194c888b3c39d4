"""The one settings tree of a prediction, and its single resolution.

`PredictorSettings` holds the core's own option types, unchanged and unrenamed: the backend's name,
the protocol's name, `SegmentOptions` (which holds `EngineConfig`, which holds `GridSpec`, and
`WorkLimits`) and `BackendOptions`. `build(protocol=..., **given)` is how the CLI and the Python API
make one: each keyword goes to the one part that has a field of that name, and the protocol's rule
(dtml_deploy/protocol.py) is applied to the settings it fixes. `resolve(bundle)` then fixes, once, what
depends on the machine and the bundle (device, precision, batch, CUDA extras, backend, the heads a
single-network bundle has); everything below receives the resolved tree and resolves nothing itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dtml_deploy.backend_choice import pick_from_folder, resolve_backend
from dtml_deploy.backends.base import BackendOptions, auto_backend, resolve_device
from dtml_deploy.bundle import Bundle
from dtml_deploy.engine.grid import GridSpec
from dtml_deploy.engine.sliding import EngineConfig
from dtml_deploy.limits import WorkLimits
from dtml_deploy.protocol import DTML, PROTOCOL_SETTINGS, protocol_fields, resolve_protocol
from dtml_deploy.ranks import Ranks, rank_device
from dtml_deploy.segment import SegmentOptions

# Where each keyword of `build` lives: the path of dataclass fields from the tree's root.
_PARTS: dict[type, tuple[str, ...]] = {SegmentOptions: ("segment",), EngineConfig: ("segment", "engine"),
                                       GridSpec: ("segment", "engine", "grid"), WorkLimits: ("segment", "limits"),
                                       BackendOptions: ("runtime",)}


@dataclass(frozen=True)
class PredictorSettings:
    """Everything a prediction is run with. Defaults are the parts' own; see `build` and `resolve`."""

    backend: str = "auto"  # auto | torch | onnx | trt | openvino (dtml_deploy/backends)
    protocol: str = DTML.name  # the named set of settings measured together (dtml_deploy/protocol.py)
    segment: SegmentOptions = field(default_factory=SegmentOptions)  # engine, grid, post-processing, limits
    runtime: BackendOptions = field(default_factory=BackendOptions)  # device, precision, batch, artifact

    @classmethod
    def build(cls, protocol: str | None = DTML.name, **given: Any) -> PredictorSettings:
        """Settings from keywords named as the parts' fields (`head=`, `device=`, `overlap=`, `max_windows=`,
        ...); None means "the default". The protocol's settings are resolved with the ones given."""
        protocol = protocol or DTML.name
        given = {k: v for k, v in given.items() if v is not None}
        unknown = sorted(set(given) - set(ROUTES) - {"backend"})
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}; settings are {', '.join(sorted(ROUTES))}, backend")
        explicit = {k: given.pop(k) for k in PROTOCOL_SETTINGS if k in given}
        given.update(protocol_fields(resolve_protocol(protocol, **explicit)))
        tree = cls(backend=str(given.pop("backend", cls.backend)), protocol=protocol)
        return tree.with_values(**given)

    def with_values(self, **values: Any) -> PredictorSettings:
        """A copy with leaf fields replaced, each routed to the part that owns it."""
        tree: Any = self
        for name, value in values.items():
            tree = _set(tree, (*ROUTES[name], name), value)
        return tree

    @property
    def engine(self) -> EngineConfig:
        return self.segment.engine

    def resolve(self, bundle: Bundle, ranks: Ranks = Ranks()) -> PredictorSettings:
        """The tree with the machine's and the bundle's choices made: concrete device (cuda:LOCAL_RANK
        under torchrun), precision, batch, CUDA extras and backend name; the engine's heads narrowed to
        what the bundle trained. Raises ValueError / BackendUnavailable for a combination that cannot run."""
        resolve_protocol(self.protocol)  # an unknown protocol name is refused here too
        rt = self.runtime
        name = resolve_backend(self.backend, rt.artifact, compile=rt.compile, cuda_graphs=rt.cuda_graphs,
                               cudnn_fusion=rt.cudnn_fusion)
        device = rank_device(rt.device, ranks)
        if name == "auto":
            name = auto_backend(replace(rt, device=device))
        runtime = replace(rt, device=device).resolved(name)
        return replace(self, backend=name, runtime=runtime,
                       segment=replace(self.segment, engine=engine_for(self.engine, bundle)))


def artifact_from_folder(settings: PredictorSettings, ranks: Ranks = Ranks()) -> tuple[PredictorSettings, str]:
    """When the artifact names an export folder: the settings with its fastest usable model (and its backend)
    chosen, and a line saying which and why; otherwise the settings unchanged and ''."""
    rt = settings.runtime
    if rt.artifact is None or not Path(rt.artifact).is_dir():
        return settings, ""
    choice = pick_from_folder(Path(rt.artifact), settings.backend,
                              resolve_device(rank_device(rt.device, ranks)).type, rt.precision)
    picked = replace(settings, backend=choice.backend,
                     runtime=replace(rt, artifact=choice.artifact, precision=rt.precision or choice.precision))
    return picked, f"--backend {settings.backend}: running {choice.reason}"


def engine_for(cfg: EngineConfig, bundle: Bundle) -> EngineConfig:
    """`cfg` for the networks `bundle` trained: a single-network bundle has one head, no QC, no uncertainty."""
    trained = (bundle.meta.get("training") or {}).get("trained", ["seg", "dis"])
    both = "seg" in trained and "dis" in trained
    head = cfg.head
    if not both:
        own = "seg" if "seg" in trained else "sdm"
        head = own if head == "mean" else head  # the mean of a single-network bundle's heads is its one head
        if head != own:
            raise ValueError(f"this bundle trained only {trained}; --head {head} needs the other network")
        if cfg.keep_uncertainty:
            raise ValueError(f"this bundle trained only {trained}; --save-uncertainty needs both networks")
    return replace(cfg, head=head, qc=cfg.qc and both, keep_uncertainty=cfg.keep_uncertainty and both,
                   keep_heads=(cfg.keep_heads or cfg.qc) and both)


def _routes() -> dict[str, tuple[str, ...]]:
    routes: dict[str, tuple[str, ...]] = {}
    for part, path in _PARTS.items():
        for f in fields(part):
            if f.name in ("engine", "grid", "limits"):  # parts of the tree, not settings
                continue
            if f.name in routes:
                raise TypeError(f"setting {f.name!r} is a field of two parts of PredictorSettings")
            routes[f.name] = path
    return routes


def _set(node: Any, path: tuple[str, ...], value: Any) -> Any:
    if len(path) == 1:
        return replace(node, **{path[0]: tuple(value) if isinstance(value, list) else value})
    return replace(node, **{path[0]: _set(getattr(node, path[0]), path[1:], value)})


ROUTES = _routes()
