"""Argument checks shared by every public class: a clear ``ValueError`` naming the argument and its value.

A ``bool`` is never accepted where a number is asked for (``True`` is an ``int`` in Python).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

__all__ = ["check_bool", "check_choice", "check_int", "check_number", "is_number"]


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number (an ``int`` or ``float`` that is not a ``bool``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int >= minimum`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}{' or None' if allow_none else ''}, got {value!r}")


def check_number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in the interval from ``low`` to ``high``.

    Args:
        name: the argument's name, as the user wrote it.
        value: the value given.
        low, high: the bounds (``-inf``/``inf``: none).
        low_open, high_open: whether a bound itself is excluded.
        allow_none: accept ``None`` as well.
    """
    if value is None and allow_none:
        return
    ok = is_number(value) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        if low == 0 and math.isinf(high):
            kind = "a positive number" if low_open else "a number >= 0"
        else:
            kind = f"a number in {left}{low:g}, {high:g}{right}"
        raise ValueError(f"`{name}` must be {kind}{' or None' if allow_none else ''}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}")


def check_choice(name: str, value: Any, choices: Collection[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")
