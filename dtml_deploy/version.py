"""The version of dtml (one place: the package, artifacts and reports read it from here)."""

__version__ = "0.1.0"
