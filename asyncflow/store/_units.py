"""How the SQL repo gets a SQLAlchemy connection for a unit of work.

Outside ``transaction()`` a single statement runs on an autocommit connection of its own (one round
trip) and a multi-statement unit in a transaction of its own. Inside ``transaction()`` a ContextVar
holds the open connection: calls from the task that opened it, and from tasks it spawned, share it
one at a time (an ``asyncio.Lock``; a connection is never used by two tasks at once), and a
multi-statement unit runs in a SAVEPOINT so that its failure leaves the outer transaction usable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..errors import StoreError
from ._errors import DB_ERRORS, StoreErrors

__all__ = ["ConnectionUnits", "Gate"]

Gate = Callable[[], AbstractAsyncContextManager[None]]
"""Held around every unit on a SQLAlchemy connection (SQLite's in-process write gate)."""

logger = logging.getLogger(__name__)


class _Tx:
    """The connection of an open ``transaction()``; ``lock`` keeps tasks that share it one at a time."""

    __slots__ = ("active", "conn", "lock")

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()
        self.active = True


class ConnectionUnits:
    """Connections of one repo: its transactions, its autocommit statements, its atomic units."""

    def __init__(self, engine: AsyncEngine, autocommit: AsyncEngine, gate: Gate | None = None) -> None:
        self.engine = engine
        self._autocommit = autocommit
        self._tx: ContextVar[_Tx | None] = ContextVar(f"asyncflow_sql_tx_{id(self):x}", default=None)
        self.closed = False
        self._gate = gate

    @asynccontextmanager
    async def _gated(self) -> AsyncIterator[None]:
        if self._gate is None:
            yield
            return
        async with self._gate():
            yield

    def in_transaction(self) -> bool:
        """Whether the calling task runs inside this repo's ``transaction()``."""
        return self._joined() is not None

    def outside_transaction(self) -> bool:
        """Whether a call of the calling task runs on the backend's own connection (outside
        ``transaction()``); raises ``StoreError`` if the repo is closed or the task's transaction
        has ended. The common case (open, no transaction) is one read: every step asks."""
        if not self.closed and self._tx.get() is None:
            return True
        if self.in_transaction():
            return False
        self.check_open()
        return True

    def close(self) -> None:
        """Mark the units closed (the backend returns its kept connections)."""
        self.closed = True

    def check_open(self) -> None:
        """Raise ``StoreError`` if the repo is closed."""
        if self.closed:
            raise StoreError("the repo is closed")

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
    async def join(self, conn: AsyncConnection) -> AsyncIterator[None]:
        """Calls of this task run on ``conn``, a caller's connection in its own open transaction,
        which the caller commits or rolls back (a multi-statement unit in a SAVEPOINT of it)."""
        if self._joined() is not None:
            raise StoreError("already inside this repo's transaction(): pass no session")
        tx = _Tx(conn)
        token = self._tx.set(tx)
        try:
            yield
        finally:
            tx.active = False
            self._tx.reset(token)

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
    except DB_ERRORS as error:  # the body's exception is the one to raise
        logger.warning("rollback failed: %s", error)


async def _close_quietly(conn: AsyncConnection) -> None:
    try:
        await conn.close()
    except DB_ERRORS as error:
        logger.warning("closing a connection failed: %s", error)
