"""``DatabaseWorkflowLock``: the lock kept in the repo's own database, for many workers without Redis.

- The lease is a row of ``asyncflow_lock (key, holder, expires_at)`` (migration 3), kept by the repo
  (:class:`~asyncflow.store.protocol.KeepsLeases`: PostgreSQL, SQLite, memory).
- Acquire: one statement (PostgreSQL: ``INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE expired``,
  timed by the database's clock; SQLite: the same in ``BEGIN IMMEDIATE``) with a random holder token
  (``secrets.token_hex``). A key whose holder died is free once its lease expires: within one TTL.
  An acquire cancelled or timed out while its statement is in flight has its row deleted once that
  statement is done (a statement may land after its caller gave up on it).
- Renewal: the shared :class:`~asyncflow.lock._renewal.Renewer` (one timer per lock object): about
  every ``ttl / 3`` one statement extends every due lease still held by its token. A renewal that fails,
  times out or finds the row gone or taken marks the lease lost (``lease.lost``, ``lease.lost_event``,
  ``lease.raise_if_lost()``); a lease whose renewal stopped counts as lost once its validity ends.
- Release: delete the row if it still holds this lease's token, in ``finally``; a release interrupted
  by a second cancellation is finished in a background task (the delete is idempotent).
- Every database call is bounded by ``op_timeout`` seconds: past it, or on a ``StoreError``, acquiring
  raises ``LockFailedError`` (the cause attached).

The lock and the fence work together: a pass whose lease was lost cannot write anyway (its steps name
an older lease epoch), so the lock's job is to keep passes from overlapping, not to be perfect.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from asyncflow._text import shown
from asyncflow.errors import LockFailedError, ParamInvalidError, StoreError
from asyncflow.lock._deadline import Deadlines, check_op_timeout
from asyncflow.lock._reentrant import ReentrantLock
from asyncflow.lock._renewal import RenewableLease, Renewer
from asyncflow.store.protocol import KeepsLeases

__all__ = ["DEFAULT_PREFIX", "DatabaseLease", "DatabaseWorkflowLock"]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "asyncflow:lock:"
_ERRORS: tuple[type[BaseException], ...] = (StoreError, OSError, TimeoutError)


class DatabaseLease(RenewableLease):
    """A lease on a :class:`DatabaseWorkflowLock` key: a row of ``asyncflow_lock`` with its token."""

    __slots__ = ("_ms", "_name", "_token")

    def __init__(
        self, renewer: Renewer[DatabaseLease], key: str, ttl: float, name: str, token: str, sent: float
    ) -> None:
        super().__init__(key, ttl, renewer, sent)
        self._name = name
        self._token = token
        self._ms = max(1, int(ttl * 1000))

    @property
    def row_key(self) -> str:
        """The row's key: ``<prefix><key>``."""
        return self._name


class DatabaseWorkflowLock(ReentrantLock[DatabaseLease]):
    """A non-blocking, re-entrant, renewing lock per key, kept in ``repo``'s database.

    ``repo`` is a ``SQLAlchemyWorkflowRepo`` (PostgreSQL or SQLite, migrated to version 3) or a
    ``MemoryWorkflowRepo``; every process using the same database shares the lock. The lock never
    closes the repo. ``op_timeout`` bounds every database call.
    """

    def __init__(self, repo: KeepsLeases, *, prefix: str = DEFAULT_PREFIX, op_timeout: float = 5.0) -> None:
        if not isinstance(repo, KeepsLeases):
            raise ParamInvalidError(
                f"DatabaseWorkflowLock needs a repo that keeps leases (SQLAlchemyWorkflowRepo or "
                f"MemoryWorkflowRepo), got {type(repo).__name__}"
            )
        check_op_timeout(op_timeout)
        if not isinstance(prefix, str):
            raise ParamInvalidError(f"prefix must be a string, got {shown(prefix)}")
        super().__init__()
        self._repo = repo
        self._prefix = prefix
        self._op_timeout = float(op_timeout)
        self._deadline = Deadlines(self._op_timeout)
        self._renewer: Renewer[DatabaseLease] = Renewer(
            self._renew, name=f"asyncflow-database-lock-renewer-{self._lock_id}"
        )
        self._background: set[asyncio.Task[None]] = set()

    @property
    def repo(self) -> KeepsLeases:
        """The repo whose database keeps the leases."""
        return self._repo

    async def _acquire(self, key: str, ttl: float) -> DatabaseLease:
        self._check_open(key)
        name = self._prefix + key
        token = secrets.token_hex(16)
        sent = time.monotonic()
        # a task of its own: a cancelled or timed-out acquire's statement may still land (a batch goes
        # on without its caller), so its row is deleted once the statement is done, not before
        acquire = asyncio.ensure_future(self._repo.acquire_lease(name, token, max(1, int(ttl * 1000))))
        try:
            with self._deadline():
                acquired = await asyncio.shield(acquire)
        except asyncio.CancelledError:
            self._spawn_release(name, token, after=acquire, ttl=ttl)  # do not leave the row behind
            raise
        except _ERRORS as exc:
            if isinstance(exc, TimeoutError):
                self._spawn_release(name, token, after=acquire, ttl=ttl)
                raise LockFailedError(
                    f"lock {key!r}: the database did not answer within {self._op_timeout} s"
                ) from exc
            raise LockFailedError(f"lock {key!r}: the database failed: {exc}") from exc
        if not acquired:
            raise LockFailedError(f"lock {key!r} is held by another holder")
        lease = DatabaseLease(self._renewer, key, ttl, name, token, sent)
        self._renewer.track(lease)
        return lease

    async def _release(self, lease: DatabaseLease) -> None:
        if lease._released:
            return
        lease._released = True
        self._renewer.untrack(lease)
        if self._closed:  # aclose() already released what was held
            return
        try:
            await self._delete(lease._name, lease._token)
        except asyncio.CancelledError:
            self._spawn_release(lease._name, lease._token)  # finish it: the delete is idempotent
            raise

    async def _delete(self, name: str, token: str) -> None:
        """Delete ``name``'s row if it still holds ``token``; failures are logged, never raised."""
        try:
            with self._deadline():
                deleted = await self._repo.release_lease(name, token)
        except _ERRORS as exc:
            logger.warning("lock release of %r failed (the lease expires on its own): %r", name, exc)
        else:
            if not deleted:
                logger.debug("lock %r had expired or changed hands before its release", name)

    def _spawn_release(
        self, name: str, token: str, *, after: asyncio.Future[bool] | None = None, ttl: float = 0.0
    ) -> None:
        """Delete ``name``'s row of ``token`` in the background; ``after``: once that acquire is done
        (waited for at most ``ttl``, when its row would expire anyway)."""
        if self._closed:
            if after is not None:
                after.cancel()
            return
        task = asyncio.get_running_loop().create_task(
            self._release_after(name, token, after, ttl), name=f"asyncflow-database-lock-cleanup-{name}"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_after(
        self, name: str, token: str, acquire: asyncio.Future[bool] | None, ttl: float
    ) -> None:
        if acquire is not None:
            await asyncio.wait((acquire,), timeout=ttl)
            if not acquire.done():
                acquire.cancel()
            elif not acquire.cancelled() and acquire.exception() is None and not acquire.result():
                return  # the key was not taken: no row of this token to delete
        await self._delete(name, token)

    async def _renew(self, batch: list[DatabaseLease]) -> None:
        """Extend every lease of ``batch`` that still holds its token, in one call."""
        sent = time.monotonic()
        budget = min(self._op_timeout, min(lease._valid_until for lease in batch) - sent)
        try:
            if budget <= 0:
                raise TimeoutError("the leases' validity ran out before the renewal could be sent")
            async with asyncio.timeout(budget):
                results = await self._repo.renew_leases([(x._name, x._token, x._ms) for x in batch])
        except _ERRORS as exc:
            for lease in batch:
                self._renewer.lose(lease, f"renewal failed: {exc!r}", exc)
            return
        for lease, renewed in zip(batch, results, strict=True):
            if renewed:
                self._renewer.renewed(lease, sent)
            else:
                self._renewer.lose(lease, "renewal found the lease expired or taken by another holder")

    async def aclose(self) -> None:
        """Stop renewing and release the leases still held (they become lost); the repo stays open."""
        if self._closed:
            return
        await super().aclose()
        try:
            held = await self._renewer.aclose()
            for lease in held:
                lease._mark_lost("the lock was closed")
            for lease in held:
                await self._delete(lease._name, lease._token)
            if self._background:
                await asyncio.wait(self._background)
        finally:
            self._deadline.close()
