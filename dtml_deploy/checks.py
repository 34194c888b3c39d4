"""Range checks for configuration values: each failure names the field and the rule it breaks."""

from __future__ import annotations

import math
from typing import Any


def is_number(x: Any) -> bool:
    """An int or float, not a bool (bools are ints in Python but never a sensible hyper-parameter)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def require(ok: bool, name: str, rule: str, value: Any) -> None:
    """Raise `ValueError('<name> must be <rule>, got <value>')` unless `ok`."""
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def finite(x: Any) -> bool:
    return is_number(x) and math.isfinite(x)


def int_at_least(name: str, value: Any, low: int) -> None:
    require(is_int(value) and value >= low, name, f"an integer >= {low}", value)


def finite_in(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
              high_open: bool = False) -> None:
    """`value` finite and within [low, high] (either end open on request)."""
    ok = finite(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    lo = f"{'(' if low_open else '['}{low:g}"
    hi = "inf)" if high == math.inf else f"{high:g}{')' if high_open else ']'}"
    require(ok, name, f"a finite number in {lo}, {hi}", value)
