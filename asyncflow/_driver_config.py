"""The driver's configuration (:class:`DriverConfig`), counters (:class:`DriverStats`) and waits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._numbers import finite
from ._text import shown
from .clock import Clock, SystemClock
from .errors import ParamInvalidError

__all__ = ["DriverConfig", "DriverStats", "bounded", "merge_config", "seconds", "wait_for_wake"]


def seconds(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float of seconds, or ``ParamInvalidError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not finite(value):
        raise ParamInvalidError(f"{name} must be a finite number of seconds, got {shown(value)}")
    if value < 0 or (positive and value == 0):
        raise ParamInvalidError(f"{name} must be {'positive' if positive else '>= 0'}, got {shown(value)}")
    return float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParamInvalidError(f"DriverConfig.{name} must be an int >= 1, got {shown(value)}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class DriverConfig:
    """How a :class:`WorkflowDriver` claims and runs instances (all times in seconds).

    ``concurrency`` caps simultaneous passes; ``batch_size`` (default ``concurrency``) caps one claim;
    ``claim_lease`` (default the service's ``lock_ttl``) is how long a claimed instance is hidden from
    other drivers; ``poll_interval`` is the wait before a not-ready node is checked again and the
    longest idle sleep. ``stop_grace`` is the grace of ``async with`` exits, ``stop_deadline`` how long
    cancelled passes may take to wind down. ``listen`` enables PostgreSQL LISTEN/NOTIFY wake-ups. A pass
    that raises backs its instance off ``error_backoff_base * 2**(n-1)`` (capped at
    ``error_backoff_max``, ``±error_backoff_jitter`` relative) after its n-th consecutive error.
    """

    concurrency: int = 64
    poll_interval: float = 1.0
    workflow_types: Sequence[str] | None = None
    batch_size: int | None = None
    claim_lease: float | None = None
    stop_grace: float = 10.0
    stop_deadline: float = 5.0
    listen: bool = True
    error_backoff_base: float = 1.0
    error_backoff_max: float = 60.0
    error_backoff_jitter: float = 0.1

    def __post_init__(self) -> None:
        _count("concurrency", self.concurrency)
        if self.batch_size is not None:
            _count("batch_size", self.batch_size)
        seconds("DriverConfig.poll_interval", self.poll_interval, positive=True)
        if self.claim_lease is not None:
            seconds("DriverConfig.claim_lease", self.claim_lease, positive=True)
        for name in ("stop_grace", "stop_deadline", "error_backoff_base", "error_backoff_max"):
            seconds(f"DriverConfig.{name}", getattr(self, name))
        if seconds("DriverConfig.error_backoff_jitter", self.error_backoff_jitter) >= 1:
            raise ParamInvalidError("DriverConfig.error_backoff_jitter must be below 1")
        if not isinstance(self.listen, bool):
            raise ParamInvalidError(f"DriverConfig.listen must be a bool, got {shown(self.listen)}")
        types = self.workflow_types
        if types is not None:
            if isinstance(types, str) or not all(isinstance(t, str) and t for t in types):
                raise ParamInvalidError("DriverConfig.workflow_types must be a sequence of non-empty str")
            object.__setattr__(self, "workflow_types", tuple(types))


@dataclass(slots=True)
class DriverStats:
    """What a driver did (live counters). ``completed``/``failed`` count instances its passes ended.

    ``passes`` counts passes that returned, ``errors`` passes (and claims) that raised, ``lock_skips``
    passes skipped because another runner held the instance, ``cancelled`` passes cut by ``stop()``;
    ``claims``/``claimed`` claim queries and the instances they returned, ``claim_seconds`` the time
    they took in all, ``idle_polls`` next-due queries, ``notifications`` PostgreSQL wake-ups received.
    """

    passes: int = 0
    completed: int = 0
    failed: int = 0
    errors: int = 0
    lock_skips: int = 0
    cancelled: int = 0
    claims: int = 0
    claimed: int = 0
    idle_polls: int = 0
    notifications: int = 0
    claim_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The counters as a plain dict."""
        return dataclasses.asdict(self)


_SHORTCUTS = {"concurrency": 64, "poll_interval": 1.0, "workflow_types": None}


def merge_config(config: DriverConfig | None, options: Mapping[str, Any]) -> DriverConfig:
    """The driver's config: ``options`` alone, or ``config`` with the options that were given.

    ``concurrency``/``poll_interval``/``workflow_types`` count as given when they differ from their
    defaults (they are the driver's keyword arguments); any other option always overrides.
    """
    names = {f.name for f in dataclasses.fields(DriverConfig)}
    unknown = set(options) - names
    if unknown:
        raise ParamInvalidError(f"unknown WorkflowDriver option(s): {', '.join(sorted(unknown))}")
    if config is None:
        return DriverConfig(**options)
    if not isinstance(config, DriverConfig):
        raise ParamInvalidError(f"config must be a DriverConfig, got {type(config).__name__}")
    changes = {k: v for k, v in options.items() if k not in _SHORTCUTS or v != _SHORTCUTS[k]}
    return dataclasses.replace(config, **changes)


async def wait_for_wake(event: asyncio.Event, clock: Clock, timeout_s: float | None) -> bool:
    """Wait for ``event`` (True) or ``timeout_s`` seconds of ``clock`` (False; ``None``: no timeout).

    A fake clock's ``sleep`` moves its time, so tests of polling run in fake time.
    """
    if event.is_set():
        return True
    if timeout_s is None:
        await event.wait()
        return True
    if timeout_s <= 0:
        await asyncio.sleep(0)  # never spin without letting the passes run
        return event.is_set()
    if isinstance(clock, SystemClock):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await event.wait()
        return event.is_set()
    waker = asyncio.ensure_future(event.wait())
    sleeper = asyncio.ensure_future(clock.sleep(timeout_s))
    try:
        await asyncio.wait((waker, sleeper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waker, sleeper):
            task.cancel()
        await asyncio.gather(waker, sleeper, return_exceptions=True)
    return event.is_set()


async def bounded(aw: Awaitable[Any], timeout_s: float) -> str | None:
    """Run ``aw`` for at most ``timeout_s`` seconds, even while the caller is being cancelled.

    Returns ``None`` on success, else what went wrong (its exception text, or "timed out"). The
    operation is cancelled on timeout, and if the caller is cancelled again meanwhile.
    """
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait((task,), timeout=timeout_s)
    finally:
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        return "timed out"
    error = task.exception()
    return None if error is None else f"{type(error).__name__}: {error}"
