"""``LocalWorkflowLock``: the lock for one process (one event loop), with no background task.

Acquire and release run without an ``await`` in between their check and their write, so on one event
loop two holders can never exist and a lease is never released twice (the Go local lock's races,
reference §14.10). A lease that is held is treated as renewed continuously: a live holder keeps its key
for as long as its block runs, however long that is. Only a holder that stopped renewing (a simulated
crash: ``lease._suspend_renewal()``) expires, one TTL later by the injected clock; the next ``hold()``
then takes the key over and marks the old lease lost.
"""

from __future__ import annotations

import logging
import math

from asyncflow.clock import SYSTEM_CLOCK, Clock
from asyncflow.errors import LockFailedError
from asyncflow.lock._reentrant import Lease, ReentrantLock

__all__ = ["LocalLease", "LocalWorkflowLock"]

logger = logging.getLogger(__name__)

_INF = math.inf


class LocalLease(Lease):
    """A lease on a :class:`LocalWorkflowLock` key."""

    __slots__ = ("_clock", "_expires_at")

    def __init__(self, key: str, ttl: float, clock: Clock) -> None:
        super().__init__(key, ttl)
        self._clock = clock
        self._expires_at = _INF  # renewed continuously while the holder is alive

    def raise_if_lost(self) -> None:
        """:meth:`Lease.raise_if_lost`; a held lease that was never suspended returns at one test
        (the engine asks before every write)."""
        if self._lost_reason is None and self._expires_at == _INF:
            return
        super().raise_if_lost()

    def _suspend_renewal(self) -> None:
        if self._expires_at == _INF:
            self._expires_at = self._clock.monotonic() + self._ttl

    def _validity_ran_out(self) -> bool:
        # renewed continuously (no deadline) unless suspended: then no clock is read
        return self._expires_at != _INF and self._clock.monotonic() >= self._expires_at


class LocalWorkflowLock(ReentrantLock[LocalLease]):
    """A non-blocking, re-entrant lock per key, for one process and one event loop.

    Two different ``LocalWorkflowLock`` objects do not exclude each other (nor count as re-entrant for
    each other); share one object between the services that must exclude each other. ``clock`` (the
    monotonic part) decides when a suspended lease expires; tests may pass a ``FakeClock``.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        super().__init__()
        self._clock: Clock = clock if clock is not None else SYSTEM_CLOCK
        self._held: dict[str, LocalLease] = {}
        # hold() takes and gives back the key without a coroutine each (_take, _give_back), unless a
        # subclass changed how it acquires or releases
        cls = type(self)
        self._sync = cls._acquire is LocalWorkflowLock._acquire and cls._release is LocalWorkflowLock._release

    @property
    def held_keys(self) -> frozenset[str]:
        """The keys held right now (expired, not yet taken over leases included)."""
        return frozenset(self._held)

    async def _acquire(self, key: str, ttl: float) -> LocalLease:
        return self._take(key, ttl)

    async def _release(self, lease: LocalLease) -> None:
        self._give_back(lease)

    def _take(self, key: str, ttl: float) -> LocalLease:
        if self._closed:
            self._check_open(key)  # raises
        current = self._held.get(key)
        if current is not None:
            if not current.lost:
                raise LockFailedError(f"lock {key!r} is held by another holder")
            current._mark_lost("a new holder took the key over")
            logger.debug("lock %r: took over a lost lease", key)
        lease = LocalLease(key, ttl, self._clock)
        self._held[key] = lease
        return lease

    def _give_back(self, lease: LocalLease) -> None:
        if lease._released:
            return
        lease._released = True
        key = lease._key
        if self._held.get(key) is lease:
            del self._held[key]

    async def aclose(self) -> None:
        """Close the lock: later ``hold()`` calls fail, and the leases still held are lost."""
        if self._closed:
            return
        await super().aclose()
        held = list(self._held.values())
        self._held.clear()
        for lease in held:
            lease._mark_lost("the lock was closed")
