"""How the SQL repo gets a connection for a unit of work, and how its errors become ``StoreError``.

Outside ``transaction()`` a single statement runs on an autocommit connection of its own (one round
trip) and a multi-statement unit in a transaction of its own. Inside ``transaction()`` a ContextVar
holds the open connection: calls from the task that opened it, and from tasks it spawned, share it
one at a time (an ``asyncio.Lock``; a connection is never used by two tasks at once), and a
multi-statement unit runs in a SAVEPOINT so that its failure leaves the outer transaction usable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..errors import StoreError
from . import _dialect
from ._lanes import PgLanes, SqliteLane, lane_limit

__all__ = ["ConnectionUnits", "StoreErrors"]

logger = logging.getLogger(__name__)


class StoreErrors:
    """``with StoreErrors("op"):`` turns driver and SQLAlchemy errors into ``StoreError``.

    The driver's own exception (asyncpg's, sqlite3's) becomes ``__cause__``; a unique violation
    becomes ``UniqueViolationError``. Other exceptions (ours, ``CancelledError``) pass untouched.
    """

    __slots__ = ("operation",)

    def __init__(self, operation: str) -> None:
        self.operation = operation

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if error is not None and isinstance(error, _dialect.DB_ERRORS):
            wrapped = _dialect.store_error(error, self.operation)
            raise wrapped from wrapped.__cause__


class _Tx:
    """The connection of an open ``transaction()``; ``lock`` keeps tasks that share it one at a time."""

    __slots__ = ("active", "conn", "lock")

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()
        self.active = True


class ConnectionUnits:
    """Connections of one repo: its transactions, its autocommit statements, its atomic units."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._autocommit = _dialect.autocommit_engine(engine)
        self._tx: ContextVar[_Tx | None] = ContextVar(f"asyncflow_sql_tx_{id(self):x}", default=None)
        self.closed = False
        # SQLite has one writer at a time: queueing in-process units behind one gate is far cheaper
        # than letting connections spin on busy_timeout (other processes still queue on busy_timeout).
        # The hot path keeps connections between calls while the repo is busy (see _lanes).
        self._sqlite: SqliteLane | None = None
        self._pg: PgLanes | None = None
        if engine.dialect.name == "sqlite":
            self._sqlite = SqliteLane(engine)
        elif engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg":
            self._pg = PgLanes(engine, lane_limit(engine))

    @asynccontextmanager
    async def _gated(self) -> AsyncIterator[None]:
        if self._sqlite is None:
            yield
            return
        async with self._sqlite.exclusive():
            yield

    @property
    def pg_lanes(self) -> PgLanes | None:
        """The PostgreSQL lanes (``None`` on SQLite)."""
        return self._pg

    def in_transaction(self) -> bool:
        """Whether the calling task runs inside this repo's ``transaction()``."""
        return self._joined() is not None

    @asynccontextmanager
    async def lane(self) -> AsyncIterator[Any]:
        """The driver connection (asyncpg's or aiosqlite's) for one hot-path unit outside a transaction."""
        if self.closed:
            raise StoreError("the repo is closed")
        if self._sqlite is not None:
            async with self._sqlite.lane() as driver:
                yield driver
        elif self._pg is not None:
            async with self._pg.lane() as driver:
                yield driver
        else:
            raise StoreError(f"no hot path for the {self.engine.dialect.name!r} dialect")

    async def close(self) -> None:
        """Mark the units closed and return every kept connection to the pool."""
        self.closed = True
        if self._pg is not None:
            await self._pg.aclose()
        if self._sqlite is not None:
            await self._sqlite.aclose()

    def _joined(self) -> _Tx | None:
        tx = self._tx.get()
        if tx is not None and not tx.active:
            raise StoreError("the transaction() this task runs in has already ended")
        if tx is None and self.closed:
            raise StoreError("the repo is closed")
        return tx

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Commit on success, roll back on any exception; nested use joins (see the module doc)."""
        if self._joined() is not None:
            yield
            return
        async with self._gated(), self._transaction():
            yield

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        with StoreErrors("transaction begin"):
            conn = await self.engine.connect()
            try:
                await conn.begin()
            except BaseException:
                await conn.close()
                raise
        tx = _Tx(conn)
        token = self._tx.set(tx)
        try:
            try:
                yield
            except BaseException:
                async with tx.lock:  # a joined task may be mid-statement: let it finish first
                    tx.active = False
                    await _rollback_quietly(conn)
                raise
            async with tx.lock:
                tx.active = False
                with StoreErrors("transaction commit"):
                    await conn.commit()
        finally:
            tx.active = False
            self._tx.reset(token)
            await _close_quietly(conn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection for one statement: the transaction's, or an autocommit one of its own."""
        tx = self._joined()
        if tx is not None:
            async with tx.lock:
                yield tx.conn
            return
        async with self._gated(), self._autocommit.connect() as conn:
            yield conn

    @asynccontextmanager
    async def atomic(self) -> AsyncIterator[AsyncConnection]:
        """Several statements as one: a transaction of their own, or a SAVEPOINT in the open one."""
        tx = self._joined()
        if tx is not None:
            async with tx.lock, tx.conn.begin_nested():
                yield tx.conn
            return
        async with self._gated(), self.engine.connect() as conn, conn.begin():
            yield conn


async def _rollback_quietly(conn: AsyncConnection) -> None:
    try:
        await conn.rollback()
    except _dialect.DB_ERRORS as error:  # the body's exception is the one to raise
        logger.warning("rollback failed: %s", error)


async def _close_quietly(conn: AsyncConnection) -> None:
    try:
        await conn.close()
    except _dialect.DB_ERRORS as error:
        logger.warning("closing a connection failed: %s", error)
