"""``WorkflowLock``: the per-instance lease Protocol."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

__all__ = ["LockLease", "WorkflowLock"]


@runtime_checkable
class LockLease(Protocol):
    """What ``hold()`` yields: lets the holder learn that its lease was lost.

    A lease is lost when renewal fails or finds the key owned by someone else. From then on the
    holder must stop writing: the engine calls ``raise_if_lost()`` before every write.
    """

    @property
    def key(self) -> str: ...

    @property
    def lost(self) -> bool: ...

    @property
    def lost_event(self) -> asyncio.Event:
        """Set when the loss is detected, for code that prefers to wait on it."""

    def raise_if_lost(self) -> None:
        """Raise ``LockFailedError`` if the lease was lost."""


@runtime_checkable
class WorkflowLock(Protocol):
    """A non-blocking, re-entrant, renewing lock per key."""

    def hold(self, key: str, ttl: float) -> AbstractAsyncContextManager[LockLease]:
        """Hold ``key`` for the block.

        Raises ``LockFailedError`` at once if another holder has it (or the backend fails).
        Re-entrant within the same asyncio context, including tasks spawned inside the block (a
        ``contextvars`` marker); those yield the outer lease and do not release it. The lease is renewed
        every ``ttl / 3`` while held, and released in ``finally`` (even on cancellation), only by its
        own token.
        """
