"""Lease renewal for the shared-backend locks: one timer per lock object, not one task per hold.

While anything is held, a renewal round runs about every ``ttl / 3``: it hands every lease that is due
(within half an interval of its due time, so that leases share a round trip) to the lock's ``renew``
callback, in batches. The callback renews them and calls :meth:`Renewer.renewed` or
:meth:`Renewer.lose` for each; it should bound its wait by the earliest validity in the batch. A lease
whose validity already ran out (the event loop was blocked for that long) is lost, not renewed.

A timer that fires with nothing due is a no-op and is left to lapse, so the hot path (one hold per
workflow pass) creates neither a timer nor a task.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from asyncflow.lock._reentrant import Lease

__all__ = ["RenewableLease", "Renewer", "validity"]

logger = logging.getLogger(__name__)


def validity(ttl: float) -> float:
    """How long a lease is trusted after a renewal was sent: the TTL less a clock-drift margin."""
    return max(0.0, ttl - (ttl * 0.01 + 0.002))


class RenewableLease(Lease):
    """A lease that a :class:`Renewer` keeps alive.

    It is trusted until its last renewal (taken at the moment the request was sent) plus the TTL, less
    a clock-drift margin of 1 % + 2 ms, so the holder stops trusting it before the backend can expire it.
    """

    __slots__ = ("_due", "_expiry_handle", "_interval", "_renewer", "_valid_until")

    def __init__(self, key: str, ttl: float, renewer: Renewer[Any], sent: float) -> None:
        super().__init__(key, ttl)
        self._renewer = renewer
        self._interval = ttl / 3
        self._due = sent + self._interval  # next renewal
        self._valid_until = sent + validity(ttl)  # the backend may free it soon after, without renewal
        self._expiry_handle: asyncio.TimerHandle | None = None

    def _suspend_renewal(self) -> None:
        self._renewer.suspend(self)

    def _validity_ran_out(self) -> bool:
        return time.monotonic() >= self._valid_until


L = TypeVar("L", bound=RenewableLease)


class Renewer(Generic[L]):
    """Keeps the tracked leases of one lock renewed through ``renew(batch)``."""

    def __init__(self, renew: Callable[[list[L]], Awaitable[None]], *, name: str, batch: int = 500) -> None:
        self._renew = renew
        self._name = name
        self._batch = batch
        self._leases: dict[L, None] = {}  # insertion-ordered set of the leases to renew
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf
        self._round: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __contains__(self, lease: L) -> bool:
        return lease in self._leases

    def track(self, lease: L) -> None:
        """Start renewing ``lease``."""
        self._leases[lease] = None
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new event loop: the old timer and round are gone
            self._loop = loop
            self._timer = None
            self._timer_due = math.inf
            self._round = None
        if self._round is None and lease._due < self._timer_due:
            self._schedule(lease._due)

    def untrack(self, lease: L) -> bool:
        """Stop renewing ``lease`` (and forget a suspended lease's expiry); False if it was not tracked."""
        if lease._expiry_handle is not None:
            lease._expiry_handle.cancel()
            lease._expiry_handle = None
        if lease in self._leases:
            del self._leases[lease]
            return True
        return False

    def renewed(self, lease: L, sent: float) -> None:
        """Record a successful renewal sent at ``sent`` (ignored if the lease was untracked meanwhile)."""
        if lease in self._leases:
            lease._valid_until = sent + validity(lease._ttl)
            lease._due = sent + lease._interval

    def lose(self, lease: L, reason: str, cause: BaseException | None = None) -> None:
        """Stop renewing ``lease`` and mark it lost (ignored if it was untracked meanwhile)."""
        if self.untrack(lease):
            lease._mark_lost(reason, cause)

    def suspend(self, lease: L) -> None:
        """The crash-simulation hook: stop renewing; the lease is marked lost when its validity ends."""
        if lease._released or not self.untrack(lease):
            return
        delay = max(0.0, lease._valid_until - time.monotonic())
        lease._expiry_handle = asyncio.get_running_loop().call_later(delay, _expire, lease)

    async def aclose(self) -> list[L]:
        """Stop renewing; return the leases that were still tracked (now untracked)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._round is not None:
            self._round.cancel()
            await asyncio.wait([self._round])
        held = list(self._leases)
        self._leases.clear()
        return held

    def _schedule(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_later(max(0.0, due - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = math.inf
        if self._closed or self._round is not None or not self._leases:
            return
        if not any(self._is_due(lease, time.monotonic()) for lease in self._leases):
            self._schedule(min(lease._due for lease in self._leases))
            return
        task = asyncio.get_running_loop().create_task(self._run_round(), name=self._name)
        if not task.done():  # an eager task factory may have run the whole round (its end cleared _round)
            self._round = task

    @staticmethod
    def _is_due(lease: RenewableLease, now: float) -> bool:
        return lease._due - lease._interval / 2 <= now

    async def _run_round(self) -> None:
        try:
            now = time.monotonic()
            due = [lease for lease in self._leases if self._is_due(lease, now)]
            for lease in [lease for lease in due if lease._valid_until <= now]:
                # too late to renew (the loop was blocked): the backend may already have freed it
                self.lose(lease, "its validity ran out before it could be renewed")
            due = [lease for lease in due if lease._valid_until > now]
            for start in range(0, len(due), self._batch):
                batch = due[start : start + self._batch]
                try:
                    await self._renew(batch)
                except Exception as exc:  # a bug or an odd reply: never keep an unrenewed lease
                    logger.exception("lock renewal failed unexpectedly")
                    for lease in batch:
                        self.lose(lease, f"renewal failed: {exc!r}", exc)
        finally:
            self._round = None
            if not self._closed and self._leases:
                self._schedule(min(lease._due for lease in self._leases))


def _expire(lease: RenewableLease) -> None:
    lease._expiry_handle = None
    if not lease._released and lease.lost:  # reading ``lost`` marks it and sets ``lost_event``
        logger.debug("lock %r: an unrenewed lease expired", lease.key)
