"""Retry back-off of a node's retryable failures (:class:`RetryPolicy`)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._numbers import finite
from ._text import shown
from .errors import ParamInvalidError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How long a node waits after its n-th consecutive retryable failure.

    The delay is ``min(initial_interval * backoff ** (n - 1), max_interval)`` seconds, moved by up to
    ``±jitter`` (relative, ``0 <= jitter < 1``) and never above ``max_interval``. Every field is a
    finite number of seconds (or factor) >= 0; ``backoff`` is at least 1. Bad values raise
    :class:`~asyncflow.errors.ParamInvalidError` naming the field.
    """

    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 60.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem is not None:
            raise ParamInvalidError(f"RetryPolicy.{problem}")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th consecutive retryable failure (1 = the first)."""
        exponent = max(failures - 1, 0)
        try:
            delay = min(self.initial_interval * self.backoff**exponent, self.max_interval)
        except OverflowError:
            delay = self.max_interval
        if self.jitter:
            spread = (rng or random).uniform(-self.jitter, self.jitter)
            delay = min(delay * (1.0 + spread), self.max_interval)
        return max(delay, 0.0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetryPolicy:
        """Parse the JSON shape (the field names as keys, each optional); bad input raises
        :class:`~asyncflow.errors.ParamInvalidError`."""
        if not isinstance(d, Mapping):
            raise ParamInvalidError(f"retry must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ParamInvalidError(f"retry has unknown key(s) {', '.join(map(repr, unknown))}")
        return cls(**{str(k): v for k, v in d.items()})

    def to_dict(self) -> dict[str, float]:
        """The JSON shape."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _problem(policy: RetryPolicy) -> str | None:
    """What is wrong with a policy's fields (``"field ..."``), or ``None``."""
    for name in ("initial_interval", "backoff", "max_interval", "jitter"):
        value = getattr(policy, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not finite(value):
            return f"{name} must be a finite number, got {type(value).__name__} {shown(value)}"
        if value < 0:
            return f"{name} must not be negative, got {shown(value)}"
    if policy.backoff < 1:
        return f"backoff must be at least 1, got {shown(policy.backoff)}"
    if policy.jitter >= 1:
        return f"jitter must be below 1, got {shown(policy.jitter)}"
    return None
