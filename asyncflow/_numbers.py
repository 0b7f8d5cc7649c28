"""A finiteness check for numbers a user hands over (seconds, intervals, factors)."""

from __future__ import annotations

import math

__all__ = ["finite"]


def finite(value: float) -> bool:
    """``math.isfinite``, false for an int beyond a float's range too (``10**400``): ``math.isfinite``
    and ``float()`` raise ``OverflowError`` for it, instead of the caller's typed error."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
