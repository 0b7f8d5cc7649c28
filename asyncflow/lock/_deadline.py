"""A coarse operation timeout that costs one dict entry per operation instead of one timer each.

``asyncio.timeout()`` schedules and cancels a timer per operation; on the lock's hot path (two Redis
round trips per hold) that is a measurable share of the client's CPU. :class:`Deadlines` keeps the
operations in flight in a dict and checks them with one timer, every quarter of the timeout, while any
are in flight. An operation is therefore cut between ``timeout`` and ``1.25 * timeout`` after it
started, with ``TimeoutError`` raised exactly like ``asyncio.timeout()`` does (the task is cancelled,
the cancellation is taken back and turned into ``TimeoutError``; other cancellations propagate).
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

from asyncflow._numbers import finite
from asyncflow._text import shown
from asyncflow.errors import ParamInvalidError

__all__ = ["Deadlines", "check_op_timeout"]


def check_op_timeout(op_timeout: object) -> float:
    """A lock's ``op_timeout``: a finite number of seconds > 0, else ``ParamInvalidError`` (an int
    beyond a float's range too, which ``math.isfinite`` turned into a raw ``OverflowError``)."""
    if (
        isinstance(op_timeout, bool)
        or not isinstance(op_timeout, int | float)
        or not finite(op_timeout)
        or op_timeout <= 0
    ):
        raise ParamInvalidError(f"op_timeout must be a positive number of seconds, got {shown(op_timeout)}")
    return float(op_timeout)


class Deadlines:
    """Bounds ``with deadlines():`` blocks (in tasks of one event loop) to about ``timeout`` seconds."""

    __slots__ = ("_active", "_loop", "_tick", "_timeout", "_timer")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._tick = timeout / 4
        self._active: dict[_Bound, None] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def timeout(self) -> float:
        """The bound in seconds."""
        return self._timeout

    def __call__(self) -> _Bound:
        """A ``with`` block bounded by the timeout; it raises ``TimeoutError`` when cut."""
        return _Bound(self)

    def close(self) -> None:
        """Stop the checking timer (blocks still in flight are no longer bounded)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _add(self, bound: _Bound, loop: asyncio.AbstractEventLoop) -> None:
        self._active[bound] = None
        if self._timer is None or loop is not self._loop:  # none yet, or left behind on an old loop
            self._loop = loop
            self._timer = loop.call_later(self._tick, self._check)

    def _check(self) -> None:
        self._timer = None
        now = time.monotonic()
        for bound in list(self._active):
            if bound._deadline <= now and not bound._expired:
                bound._expired = True
                bound._task.cancel()
        if self._active:
            self._timer = asyncio.get_running_loop().call_later(self._tick, self._check)


class _Bound:
    __slots__ = ("_cancelling", "_deadline", "_expired", "_owner", "_task")

    def __init__(self, owner: Deadlines) -> None:
        self._owner = owner
        self._expired = False

    def __enter__(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a deadline must be used inside an asyncio task")
        self._task = task
        self._cancelling = task.cancelling()
        self._deadline = time.monotonic() + self._owner._timeout
        self._owner._add(self, loop)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        del self._owner._active[self]
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError(f"no answer within {self._owner._timeout} s") from exc
