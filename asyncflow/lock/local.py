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
from typing import Any

from asyncflow.clock import SYSTEM_CLOCK, Clock
from asyncflow.errors import LockFailedError
from asyncflow.lock._reentrant import Lease, ReentrantLock

__all__ = ["HANDOFF_MAX_AGE", "Handoffs", "LocalLease", "LocalWorkflowLock"]

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


HANDOFF_MAX_AGE = 0.25
"""Seconds an offered row stays usable (:class:`Handoffs`): a pass that takes the key later reads the
instance. It bounds what a write the lock does not see (a cancel from another process: the dashboard,
the CLI) can miss; a driver's pass takes its row 10-50 ms after the claim (``hot_path``, c=32)."""


class Handoffs:
    """What a driver's claim read of instances nobody has run yet, handed to the pass that takes the key
    next, so that the pass needs no read of its own (``LocalWorkflowLock.handoffs``).

    A claim that finds an instance as it was created (no node row, never leased, never written) returns
    its row; the driver offers it here under the instance's key between :meth:`begin` (before the claim
    is sent) and :meth:`end` (after its rows came back), and the driver's pass :meth:`take` s it once it
    holds the key. The pass runs the first node before it writes anything, so the row must still be the
    instance's then. Every holder of the key is in this process (the lock's contract), so

    * a key held when the claim's rows come back, or given back while the claim was on its way (the
      holder may have written after the claim read the row), is not offered;
    * an offered row is withdrawn when any holder gives the key back (:meth:`released`), so a pass, an
      event or a restart that held the key after the claim leaves the next pass to read the instance;
      a cancel (which does not hold the key) counts as a give-back of what it canceled;
    * a row is taken only by a pass on the repo its claim read (``owner``: services on two databases may
      share a lock, and their instance ids, hence keys, overlap), and at most :data:`HANDOFF_MAX_AGE`
      seconds after the claim: a write from another process (a cancel) that lands in between is not
      seen here, and its fence (the lease epoch, the status) refuses the pass's first write, after the
      first node ran.

    Rows are kept only for instances the driver claimed and has not started: it withdraws the ones it
    gives back (:meth:`drop`)."""

    __slots__ = ("_base", "_clock", "_held", "_marks", "_released", "_rows")

    def __init__(self, held: dict[str, Any], clock: Clock) -> None:
        self._held = held  # the lock's table of held keys (expired, not yet taken over leases included)
        self._clock = clock
        self._rows: dict[str, tuple[object, Any, float]] = {}  # key: (owner, row, offered at)
        self._marks: list[tuple[int, float]] = []  # the marks of the claims on their way
        self._released: list[str] = []  # keys given back since the oldest of those claims began
        self._base = 0  # the mark of _released[0]

    def begin(self) -> tuple[int, float]:
        """A claim is about to be sent: the mark :meth:`end` takes (where the give-backs since then
        start, and when the claim began: a row's age counts from there)."""
        mark = (self._base + len(self._released), self._clock.monotonic())
        self._marks.append(mark)
        return mark

    def end(self, mark: tuple[int, float], rows: dict[str, Any], owner: object = None) -> None:
        """The claim begun at ``mark`` came back with ``rows`` (by key) read from ``owner`` (the repo):
        offer those no holder touched meanwhile. Called once per :meth:`begin`, ``{}`` when the claim
        failed. What is remembered of the give-backs goes back to the oldest claim still on its way
        (claims of several drivers that overlap without end keep no more than that)."""
        try:
            if rows:
                start, began = mark
                released = set(self._released[start - self._base :])
                held, offered = self._held, self._rows
                for key, row in rows.items():
                    if key not in held and key not in released:
                        offered[key] = (owner, row, began)
        finally:
            marks = self._marks
            marks.remove(mark)
            oldest = min(marks)[0] if marks else self._base + len(self._released)
            if oldest > self._base:
                del self._released[: oldest - self._base]
                self._base = oldest

    def take(self, key: str, owner: object = None) -> Any:
        """The row offered under ``key`` (once) by a claim on ``owner`` that began at most
        :data:`HANDOFF_MAX_AGE` ago; else ``None`` (a row of another owner is dropped: its pass reads).
        Called by the holder of the key."""
        rows = self._rows
        offered = rows.pop(key, None) if rows else None
        if offered is None or offered[0] is not owner:
            return None
        return offered[1] if self._clock.monotonic() - offered[2] <= HANDOFF_MAX_AGE else None

    def drop(self, key: str) -> None:
        """Withdraw what is offered under ``key`` (its claim was given back, or its pass never began)."""
        self._rows.pop(key, None)

    def released(self, key: str) -> None:
        """A holder gave ``key`` back (or lost it): withdraw its row; remembered while claims are out."""
        if self._rows:
            self._rows.pop(key, None)
        if self._marks:
            self._released.append(key)

    def clear(self) -> None:
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)


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
        # a driver's claim hands rows to its passes only where every give-back goes through _give_back
        self.handoffs: Handoffs | None = Handoffs(self._held, self._clock) if self._sync else None

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
            if self.handoffs is not None:
                self.handoffs.released(key)
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
        handoffs = self.handoffs
        if handoffs is not None and (handoffs._rows or handoffs._marks):
            handoffs.released(key)

    async def aclose(self) -> None:
        """Close the lock: later ``hold()`` calls fail, and the leases still held are lost."""
        if self._closed:
            return
        await super().aclose()
        held = list(self._held.values())
        self._held.clear()
        if self.handoffs is not None:
            self.handoffs.clear()
        for lease in held:
            lease._mark_lost("the lock was closed")
