"""What every lock shares: the lease object, the re-entrancy marker and the ``hold()`` block.

A lock implementation subclasses :class:`ReentrantLock` and supplies ``_acquire`` (take the key or raise
``LockFailedError`` at once) and ``_release`` (give back only its own lease); ``hold()`` adds the
re-entrancy rules on top, the same for every backend. A lock that needs no round trip (the local one)
also supplies ``_take`` and ``_give_back``, the same without a coroutine, and sets ``_sync``.

Re-entrancy lives in one ``contextvars.ContextVar`` that maps ``(lock id, key)`` to the held lease. A task
created inside the block copies the context, so it counts as inside; an unrelated task does not. The
marker is checked against the lease it names: a child task that outlives the block (its copied marker
points at a released lease) acquires normally, and re-entering a lost lease raises ``LockFailedError``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar, Token
from types import MappingProxyType, TracebackType
from typing import Generic, Self, TypeVar

from asyncflow._numbers import finite
from asyncflow._text import shown
from asyncflow.errors import LockFailedError, ParamInvalidError

__all__ = ["Lease", "ReentrantLock"]

logger = logging.getLogger(__name__)

_EMPTY: Mapping[tuple[int, str], Lease] = MappingProxyType({})
_HELD: ContextVar[Mapping[tuple[int, str], Lease]] = ContextVar("asyncflow_lock_held", default=_EMPTY)
_LOCK_IDS = itertools.count(1)
_INF = float("inf")


class Lease:
    """A held key: what ``hold()`` yields (it satisfies the ``LockLease`` Protocol).

    ``lost`` turns true when the implementation detects the loss (renewal failed or found the key taken,
    a new holder took over an expired lease) or once the lease's validity ran out without renewal. The
    holder must then stop writing: the engine calls ``raise_if_lost()`` before every write, and
    ``lost_event`` is set when the loss is detected, for code that prefers to wait on it.
    """

    __slots__ = ("_key", "_lost_cause", "_lost_event", "_lost_reason", "_released", "_ttl")

    def __init__(self, key: str, ttl: float) -> None:
        self._key = key
        self._ttl = ttl
        self._lost_reason: str | None = None
        self._lost_cause: BaseException | None = None
        self._lost_event: asyncio.Event | None = None
        self._released = False

    @property
    def key(self) -> str:
        """The lock key (without any backend prefix)."""
        return self._key

    @property
    def ttl(self) -> float:
        """The lease time in seconds: how long the key outlives its last renewal."""
        return self._ttl

    @property
    def released(self) -> bool:
        """True once the ``hold()`` block that took the lease has ended."""
        return self._released

    @property
    def lost(self) -> bool:
        """True when the lease can no longer be trusted: stop writing."""
        if self._lost_reason is None and self._validity_ran_out():
            self._mark_lost("its validity ran out without renewal")
        return self._lost_reason is not None

    @property
    def lost_event(self) -> asyncio.Event:
        """An event set when the loss is detected (already set if the lease is lost)."""
        if self._lost_event is None:
            self._lost_event = asyncio.Event()
            if self.lost:
                self._lost_event.set()
        return self._lost_event

    def raise_if_lost(self) -> None:
        """Raise ``LockFailedError`` (the backend error, if any, as ``__cause__``) if the lease was lost."""
        if self._lost_reason is None and not self._validity_ran_out():  # held: one call (every step asks)
            return
        if self.lost:
            raise LockFailedError(f"lock {self._key!r} was lost: {self._lost_reason}") from self._lost_cause

    def _suspend_renewal(self) -> None:
        """Test hook, the same on every lock: stop renewing, as if the holder had crashed.

        The key is then freed within one TTL. The block still releases normally at its end, and that
        release never deletes a later holder's key.
        """
        raise NotImplementedError

    def _validity_ran_out(self) -> bool:
        """Overridden by leases that know their validity deadline."""
        return False

    def _mark_lost(self, reason: str, cause: BaseException | None = None) -> None:
        if self._lost_reason is not None:
            return
        self._lost_reason = reason
        self._lost_cause = cause
        if self._lost_event is not None:
            self._lost_event.set()
        if not self._released:
            logger.warning("lock %r lost while held: %s", self._key, reason)

    def __repr__(self) -> str:
        state = "released" if self._released else ("lost" if self._lost_reason else "held")
        return f"<{type(self).__name__} key={self._key!r} ttl={self._ttl} {state}>"


LeaseT = TypeVar("LeaseT", bound=Lease)


class ReentrantLock(Generic[LeaseT]):
    """Base of the locks: ``hold()``, ``aclose()`` and ``async with``; subclasses acquire and release."""

    _sync = False
    """True on a lock whose ``_take``/``_give_back`` acquire and release at once (no round trip):
    ``hold()`` then calls them instead of awaiting ``_acquire``/``_release`` (no coroutine each)."""

    def __init__(self) -> None:
        self._lock_id = next(_LOCK_IDS)
        self._closed = False

    def hold(self, key: str, ttl: float) -> _Hold[LeaseT]:
        """Hold ``key`` for the block, renewing the lease every ``ttl / 3``; yields the lease.

        Raises ``LockFailedError`` at once if another holder has the key or the backend fails, and
        ``ParamInvalidError`` for an empty key or a TTL that is not a positive number. Re-entrant in the
        same asyncio context (tasks spawned inside the block included): a nested hold yields the outer
        lease and neither renews nor releases it. The lease is released in ``finally``, even on
        cancellation, and only if it is still this holder's.
        """
        if not isinstance(key, str) or not key:
            raise ParamInvalidError(f"lock key must be a non-empty string, got {shown(key)}")
        if type(ttl) is not float or not 0.001 <= ttl < _INF:  # the engine's is a float already checked
            if not isinstance(ttl, int | float) or not finite(ttl) or ttl < 0.001:
                raise ParamInvalidError(
                    f"lock ttl must be a positive number of seconds (>= 0.001), got {shown(ttl)}"
                )
            ttl = float(ttl)
        # _Hold(self, key, ttl), without the class call's __init__ frame (a hold per pass)
        hold: _Hold[LeaseT] = _new_hold(_Hold)
        hold._lock = self
        hold._key = key
        hold._ttl = ttl
        hold._lease = None
        hold._ctx_token = None
        return hold

    @property
    def closed(self) -> bool:
        """True after ``aclose()``."""
        return self._closed

    async def aclose(self) -> None:
        """Close the lock (subclasses extend this); leases still held are lost."""
        self._closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _acquire(self, key: str, ttl: float) -> LeaseT:
        raise NotImplementedError

    async def _release(self, lease: LeaseT) -> None:
        raise NotImplementedError

    def _take(self, key: str, ttl: float) -> LeaseT:
        """``_acquire`` without a coroutine, on a lock with ``_sync`` set."""
        raise NotImplementedError

    def _give_back(self, lease: LeaseT) -> None:
        """``_release`` without a coroutine, on a lock with ``_sync`` set."""
        raise NotImplementedError

    def _check_open(self, key: str) -> None:
        if self._closed:
            raise LockFailedError(f"lock {key!r}: {type(self).__name__} is closed")


class _Hold(AbstractAsyncContextManager[LeaseT]):
    """The ``async with lock.hold(key, ttl)`` block (one per call; not reusable). ``hold()`` makes it
    and sets its fields (those of ``__init__``)."""

    __slots__ = ("_ctx_token", "_key", "_lease", "_lock", "_ttl")

    def __init__(self, lock: ReentrantLock[LeaseT], key: str, ttl: float) -> None:
        self._lock = lock
        self._key = key
        self._ttl = ttl
        self._lease: LeaseT | None = None
        self._ctx_token: Token[Mapping[tuple[int, str], Lease]] | None = None

    async def __aenter__(self) -> LeaseT:
        if self._lease is not None:
            raise RuntimeError("a hold() block cannot be entered twice")
        held = _HELD.get()
        lock, key = self._lock, self._key
        marker = (lock._lock_id, key)
        if held:  # a pass's task starts with nothing held: no look-up, no copy
            outer = held.get(marker)
            if outer is not None and not outer._released:
                outer.raise_if_lost()
                # the marker is only ever set by this lock for this key, so the lease is a LeaseT
                self._lease = outer  # type: ignore[assignment]
                return outer  # type: ignore[return-value]
            lease = lock._take(key, self._ttl) if lock._sync else await lock._acquire(key, self._ttl)
            self._lease = lease
            self._ctx_token = _HELD.set({**held, marker: lease})
            return lease
        lease = lock._take(key, self._ttl) if lock._sync else await lock._acquire(key, self._ttl)
        self._lease = lease
        self._ctx_token = _HELD.set({marker: lease})
        return lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token = self._ctx_token
        if token is None:  # a re-entrant hold: the outer block releases
            return
        self._ctx_token = None
        lease: LeaseT = self._lease  # type: ignore[assignment]  # set with the token
        lock = self._lock
        try:
            _HELD.reset(token)
        except ValueError:  # exited in another context than it was entered in: nothing to undo here
            pass
        finally:
            if lock._sync:
                lock._give_back(lease)
            else:
                await lock._release(lease)


_new_hold = object.__new__
