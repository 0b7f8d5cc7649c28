"""``PostgresAdvisoryLock``: the shared lock for deployments with PostgreSQL and no Redis.

- Acquire: a dedicated pooled connection (autocommit) runs ``pg_try_advisory_lock(id)``, where ``id``
  is the first 8 bytes of BLAKE2b(``<namespace><key>``) as a signed bigint; the connection stays checked
  out for the block. On PostgreSQL 14 and later the same statement sets ``idle_session_timeout`` to the
  TTL, so a holder that stops talking to the server (a frozen or partitioned process) has its session
  ended, and its lock freed, one TTL later; a crashed process frees it at once.
- Renewal: the shared :class:`~asyncflow.lock._renewal.Renewer` runs a ``SELECT 1`` on every held
  connection about every ``ttl / 3``. A check that fails or times out marks the lease lost
  (``lease.lost``, ``lease.lost_event``, ``lease.raise_if_lost()``).
- Release: ``pg_advisory_unlock(id)`` plus restoring ``idle_session_timeout``, then the connection goes
  back to the pool; if that fails, or a second cancellation interrupts it, the connection is
  invalidated instead (closing the session frees its locks). Another holder's lock lives in another
  session, so a late release can never free it.

Every hold uses one connection for its whole block: give the lock its own engine, or a pool large
enough for the holds and the other users of the engine. Two keys whose hashes collide (odds about
2**-64 per pair) would exclude each other.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from asyncflow._text import shown
from asyncflow._urls import check_database_url
from asyncflow.errors import LockFailedError, ParamInvalidError
from asyncflow.lock._deadline import check_op_timeout
from asyncflow.lock._reentrant import ReentrantLock
from asyncflow.lock._renewal import RenewableLease, Renewer

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["DEFAULT_NAMESPACE", "PostgresAdvisoryLock", "PostgresLease", "advisory_lock_id"]

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "asyncflow:lock:"
_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, OSError, TimeoutError)
# Releasing and checking must never raise: besides the errors above, the driver can raise its own
# (asyncpg's ``InternalClientError`` after the server ended an idle session, which older SQLAlchemy
# versions pass through unwrapped). Any of them means the session is unusable: discard it.
_ANY_FAILURE: tuple[type[BaseException], ...] = (Exception,)

_TRY_LOCK = text(
    "SELECT CASE WHEN pg_try_advisory_lock(:id) THEN set_config('idle_session_timeout', :idle, false) END"
)
_TRY_LOCK_NO_IDLE = text("SELECT CASE WHEN pg_try_advisory_lock(:id) THEN 'on' END")
_UNLOCK = text(
    "SELECT pg_advisory_unlock(:id), (SELECT set_config(name, reset_val, false) FROM pg_settings"
    " WHERE name = 'idle_session_timeout')"
)
_UNLOCK_NO_IDLE = text("SELECT pg_advisory_unlock(:id)")
_CHECK = text("SELECT 1")


def advisory_lock_id(name: str) -> int:
    """The signed 64-bit advisory lock id for ``name`` (the namespace is part of ``name``)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresLease(RenewableLease):
    """A lease on a :class:`PostgresAdvisoryLock` key: an advisory lock held by one session."""

    __slots__ = ("_busy", "_conn", "_id")

    def __init__(
        self, renewer: Renewer[PostgresLease], key: str, ttl: float, ident: int, conn: AsyncConnection
    ) -> None:
        super().__init__(key, ttl, renewer, time.monotonic())
        self._id = ident
        self._conn = conn
        self._busy = asyncio.Lock()  # one statement at a time on the session

    @property
    def advisory_id(self) -> int:
        """The advisory lock id in PostgreSQL."""
        return self._id


class PostgresAdvisoryLock(ReentrantLock[PostgresLease]):
    """A non-blocking, re-entrant lock per key on PostgreSQL session-level advisory locks.

    ``engine_or_url`` is an ``AsyncEngine`` (never disposed by the lock) or a
    ``postgresql+asyncpg://`` URL (the lock creates the engine and disposes it in ``aclose()``).
    ``op_timeout`` bounds every statement, and the wait for a pooled connection, with
    ``LockFailedError``.
    """

    def __init__(
        self,
        engine_or_url: AsyncEngine | str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        op_timeout: float = 2.0,
    ) -> None:
        check_op_timeout(op_timeout)
        if not isinstance(namespace, str):
            raise ParamInvalidError(f"namespace must be a string, got {shown(namespace)}")
        super().__init__()
        self._namespace = namespace
        self._op_timeout = float(op_timeout)
        if isinstance(engine_or_url, str):
            from sqlalchemy.engine import make_url
            from sqlalchemy.ext.asyncio import create_async_engine

            check_database_url(engine_or_url)  # a typed error, password hidden
            backend = make_url(engine_or_url).get_backend_name()
            if backend != "postgresql":
                raise ParamInvalidError(f"PostgresAdvisoryLock needs PostgreSQL, not {backend}")
            try:
                self._engine: AsyncEngine = create_async_engine(engine_or_url, pool_timeout=self._op_timeout)
            except ImportError as exc:
                raise ImportError(
                    "PostgresAdvisoryLock needs the 'asyncpg' package: pip install 'asyncflow[postgres]'"
                ) from exc
            self._owns_engine = True
        else:
            self._engine = engine_or_url
            self._owns_engine = False
        if self._engine.dialect.name != "postgresql":
            raise ParamInvalidError(f"PostgresAdvisoryLock needs PostgreSQL, not {self._engine.dialect.name}")
        self._renewer: Renewer[PostgresLease] = Renewer(
            self._check, name=f"asyncflow-postgres-lock-renewer-{self._lock_id}"
        )
        self._background: set[asyncio.Task[None]] = set()

    @property
    def engine(self) -> AsyncEngine:
        """The engine the lock takes its connections from."""
        return self._engine

    async def _acquire(self, key: str, ttl: float) -> PostgresLease:
        self._check_open(key)
        ident = advisory_lock_id(self._namespace + key)
        conn: AsyncConnection | None = None
        try:
            async with asyncio.timeout(self._op_timeout):
                conn = await self._engine.connect()
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                if self._has_idle_timeout(conn):
                    params = {"id": ident, "idle": str(max(1, math.ceil(ttl * 1000)))}
                    got = (await conn.execute(_TRY_LOCK, params)).scalar()
                else:
                    got = (await conn.execute(_TRY_LOCK_NO_IDLE, {"id": ident})).scalar()
                if got is None:
                    held_elsewhere, conn = conn, None
                    await held_elsewhere.close()
        except asyncio.CancelledError:
            if conn is not None:
                self._spawn(self._discard(conn), key)  # it may hold the lock: end the session
            raise
        except _ANY_FAILURE as exc:
            if conn is not None:
                self._spawn(self._discard(conn), key)
            if isinstance(exc, TimeoutError):
                raise LockFailedError(
                    f"lock {key!r}: PostgreSQL did not answer within {self._op_timeout} s"
                ) from exc
            raise LockFailedError(f"lock {key!r}: PostgreSQL failed: {exc}") from exc
        if conn is None:
            raise LockFailedError(f"lock {key!r} is held by another holder")
        if self._closed:  # aclose() ran while this connected: it neither renews nor releases this one
            await self._discard(conn)
            raise LockFailedError(f"lock {key!r}: {type(self).__name__} is closed")
        lease = PostgresLease(self._renewer, key, ttl, ident, conn)
        self._renewer.track(lease)
        return lease

    @staticmethod
    def _has_idle_timeout(conn: AsyncConnection) -> bool:
        version = conn.dialect.server_version_info
        return version is not None and version >= (14,)

    async def _release(self, lease: PostgresLease) -> None:
        if lease._released:
            return
        lease._released = True
        self._renewer.untrack(lease)
        try:
            if self._closed:
                # aclose() released the leases it renewed; one it did not (lost, or its renewal
                # suspended) still holds its session: end it (the pool of an owned engine is disposed)
                await self._discard(lease._conn, lease._busy)
            else:
                await self._unlock(lease)
        except asyncio.CancelledError:
            self._spawn(self._discard(lease._conn, lease._busy), lease.key)
            raise

    async def _unlock(self, lease: PostgresLease) -> None:
        """Unlock and return the connection; on any failure invalidate it instead (never raises)."""
        conn = lease._conn
        async with lease._busy:
            try:
                async with asyncio.timeout(self._op_timeout):
                    unlock = _UNLOCK if self._has_idle_timeout(conn) else _UNLOCK_NO_IDLE
                    unlocked = (await conn.execute(unlock, {"id": lease._id})).scalar()
                    await conn.close()
            except _ANY_FAILURE as exc:
                logger.warning("lock release of %r failed; closing its session instead: %r", lease.key, exc)
                await self._discard(conn)
                return
        if not unlocked:
            logger.warning("lock %r was not held by its session at release", lease.key)

    async def _discard(self, conn: AsyncConnection, busy: asyncio.Lock | None = None) -> None:
        """Invalidate ``conn``: its session ends and PostgreSQL frees its advisory locks (a connection
        already closed, by a release that ran meanwhile, is left as it is)."""
        try:
            if busy is not None:
                async with busy:
                    await self._end_session(conn)
            else:
                await self._end_session(conn)
        except _ANY_FAILURE as exc:
            logger.warning("closing a lock session failed: %r", exc)

    @staticmethod
    async def _end_session(conn: AsyncConnection) -> None:
        if not conn.closed:
            await conn.invalidate()
            await conn.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], key: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"asyncflow-postgres-lock-cleanup-{key}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _check(self, batch: list[PostgresLease]) -> None:
        """The renewal: a ``SELECT 1`` on every held session, concurrently."""
        await asyncio.gather(*(self._check_one(lease) for lease in batch))

    async def _check_one(self, lease: PostgresLease) -> None:
        sent = time.monotonic()
        budget = min(self._op_timeout, lease._valid_until - sent)
        try:
            if budget <= 0:
                raise TimeoutError("the lease's validity ran out before the check could be sent")
            async with asyncio.timeout(budget), lease._busy:
                if lease._released:
                    return
                await lease._conn.execute(_CHECK)
        except _ANY_FAILURE as exc:
            self._renewer.lose(lease, f"its session failed: {exc!r}", exc)
        else:
            self._renewer.renewed(lease, sent)

    async def aclose(self) -> None:
        """Stop checking, release the leases still held (they become lost), dispose an owned engine.

        A lease it could not release (lost already, its block still open) ends its session when the
        block exits; a hold whose connection was still being opened fails with ``LockFailedError``."""
        if self._closed:
            return
        await super().aclose()
        try:
            held = await self._renewer.aclose()
            for lease in held:
                lease._mark_lost("the lock was closed")
            if held:
                await asyncio.gather(*(self._unlock(lease) for lease in held))
            if self._background:
                await asyncio.wait(self._background)
        finally:
            if self._owns_engine:
                await self._engine.dispose()
