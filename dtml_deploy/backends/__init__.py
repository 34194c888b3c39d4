"""Inference backends behind one interface; `create_backend` picks by name."""

from dtml_deploy.backends.base import Backend, BackendOptions, available_backends, create_backend

__all__ = ["Backend", "BackendOptions", "available_backends", "create_backend"]
