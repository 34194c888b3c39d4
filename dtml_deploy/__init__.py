"""dtml: Dual-Task Mutual Learning for 3D segmentation, from training to fast inference.

The Python API: `Predictor` (dtml_deploy/predictor.py) and its settings tree `PredictorSettings`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dtml_deploy.version import __version__

__all__ = ["Prediction", "Predictor", "PredictorSettings", "SegmentEvents", "__version__"]

if TYPE_CHECKING:
    from dtml_deploy.predictor import Prediction, Predictor, SegmentEvents
    from dtml_deploy.settings import PredictorSettings


def __getattr__(name: str) -> Any:
    """The API's classes, imported on first use (so `import dtml_deploy.io...` does not load torch)."""
    if name in ("Prediction", "Predictor", "SegmentEvents"):
        import dtml_deploy.predictor as predictor

        return getattr(predictor, name)
    if name == "PredictorSettings":
        from dtml_deploy.settings import PredictorSettings

        return PredictorSettings
    raise AttributeError(f"module 'dtml_deploy' has no attribute {name!r}")
