"""The SQLite backend's in-process write gate and its own connection, in a worker thread of its own.

SQLite has one writer at a time: queueing this process's units behind one ``asyncio.Lock`` is far
cheaper than letting connections spin on ``busy_timeout`` (other processes still queue on it). Every
unit of the repo holds the gate: SQLAlchemy units (``exclusive()``) and the backend's own calls
(``thread()``).

Through SQLAlchemy and aiosqlite every statement costs several hand-offs to a worker thread, each
waiting for the GIL while the event loop is busy. So for a database file the backend keeps a plain
``sqlite3`` connection (:class:`ThreadConnection`) in a one-thread executor of its own, and a whole unit
(a step in ``BEGIN IMMEDIATE ... COMMIT``, a claim, an insert, a read) is one function run there: one
hop. It runs with the settings of the engine's connections (:data:`COPIED_PRAGMAS`, read from one of
them when it opens, so a ``busy_timeout`` the caller sets on the engine holds for it too). It is
closed once the repo has been idle for :data:`~asyncflow.store._lanes.IDLE_RELEASE_S`, so
an idle repo holds nothing. An in-memory database (private to each connection) has no such
connection: its calls run on the engine's connection (:attr:`SqliteLane.own` is False).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from queue import SimpleQueue
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from ...errors import StoreError
from .._lanes import IDLE_RELEASE_S, IdleRelease
from .engine import autocommit_engine, connect

__all__ = ["COPIED_PRAGMAS", "SqliteLane", "ThreadConnection", "own_path"]

COPIED_PRAGMAS = ("busy_timeout", "foreign_keys", "synchronous", "cache_size")
"""Connection settings the own connection takes from the engine's connections."""

logger = logging.getLogger(__name__)


def own_path(engine: AsyncEngine) -> str | None:
    """The database file the backend may open itself, or ``None`` (in-memory, or URI options)."""
    url = engine.url
    if url.database in (None, "", ":memory:") or url.query or url.database.startswith("file:"):
        return None
    return url.database


class ThreadConnection:
    """A ``sqlite3`` connection that lives in one worker thread: :meth:`run` is one hop there.

    The thread (a daemon, fed by a queue, as aiosqlite's is) starts on first use, and the connection
    opens in it then; :meth:`close` closes the connection, :meth:`shutdown` ends the thread (which
    closes the connection as it ends), and no thread starts after it. A caller cancelled while its
    function runs does not stop the function: a unit ends its transaction itself.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._queue: SimpleQueue[tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._queue = SimpleQueue()
        self._worker: threading.Thread | None = None
        self._pid = 0
        self._conn: Any = None
        self._shut = False
        self.settings: dict[str, Any] = {}  # PRAGMA values to copy when the connection opens

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        conn = self._conn
        if conn is None:
            conn = connect(self._path)
            for name, value in self.settings.items():
                conn.execute(f"PRAGMA {name} = {int(value)}")
            self._conn = conn
        return fn(conn, *args)

    def _work(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                future, fn, args = item
                try:
                    result = fn(*args)
                except BaseException as error:  # handed to the caller, as raised
                    _hand(future, _fail, error)
                else:
                    _hand(future, _succeed, result)
        finally:
            self._close()  # the connection never outlives its thread

    def _ensure_worker(self) -> None:
        if self._shut:
            raise StoreError("the repo is closed")
        if self._worker is None or self._pid != os.getpid():  # a forked child starts its own
            if self._pid != os.getpid():
                self._queue, self._conn = SimpleQueue(), None
            self._pid = os.getpid()
            self._worker = threading.Thread(target=self._work, name="asyncflow-sqlite", daemon=True)
            self._worker.start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(sqlite3_connection, *args)`` in the worker thread."""
        return await self._submit(self._call, fn, args)

    async def _submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        self._queue.put((future, fn, args))
        return await future

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def close(self) -> None:
        """Close the connection (it reopens on the next :meth:`run`)."""
        if self._conn is not None and not self._shut:
            await asyncio.shield(self._submit(self._close))

    def shutdown(self) -> None:
        """End the worker thread once it has run what it was given (idempotent; it does not wait)."""
        self._shut = True
        if self._worker is not None and self._pid == os.getpid():
            self._queue.put(None)
            self._worker = None


def _hand(future: asyncio.Future[Any], outcome: Callable[..., None], value: Any) -> None:
    with contextlib.suppress(RuntimeError):  # its loop has closed (the caller was cut): nobody waits
        future.get_loop().call_soon_threadsafe(outcome, future, value)


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # else the caller was cancelled meanwhile
        future.set_result(result)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class SqliteLane:
    """The write gate of a SQLite repo, and its own connection when the database is a file."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._gate = asyncio.Lock()
        self._waiting = 0
        self._closed = False
        path = own_path(engine)
        self._thread = ThreadConnection(path) if path is not None else None
        self._idle_release = IdleRelease(self._is_idle, self._close_if_idle, IDLE_RELEASE_S)

    @property
    def own(self) -> bool:
        """Whether the backend has a connection of its own (a database file)."""
        return self._thread is not None

    def _is_idle(self) -> bool:
        return self._waiting == 0 and not self._gate.locked()

    async def _close_if_idle(self) -> None:
        if self._thread is not None and self._is_idle():
            async with self.exclusive():
                await self._thread.close()

    async def _enter(self) -> None:
        self._waiting += 1
        try:
            await self._gate.acquire()
        finally:
            self._waiting -= 1

    def _leave(self) -> None:
        self._gate.release()
        if self._waiting == 0 and not self._closed and self._thread is not None and self._thread.is_open:
            self._idle_release.arm()  # nobody queued behind: the repo goes idle

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the gate (around a unit on a SQLAlchemy connection)."""
        await self._enter()
        try:
            yield
        finally:
            self._gate.release()

    @asynccontextmanager
    async def thread(self) -> AsyncIterator[ThreadConnection]:
        """Hold the gate; yields the backend's own connection (only when :attr:`own`)."""
        assert self._thread is not None
        await self._enter()
        try:
            if self._closed:  # queued behind aclose(), or started after a cut one
                raise StoreError("the repo is closed")
            if not self._thread.is_open:
                self._thread.settings = await self._engine_settings()
            yield self._thread
        finally:
            self._leave()

    async def _engine_settings(self) -> dict[str, Any]:
        """The PRAGMAs the engine's connections run with (the caller may have changed them in a
        ``connect`` listener): the own connection copies them. Read outside any transaction, so a
        caller's open write transaction (``create_workflow(session=...)``) does not block it."""
        async with autocommit_engine(self._engine).connect() as conn:
            return {
                name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar_one() for name in COPIED_PRAGMAS
            }

    async def aclose(self) -> None:
        """Close the own connection and stop its thread, after the unit in flight.

        Cut (a cancellation, a timeout), it still ends the thread: :meth:`shutdown`."""
        try:
            await self._idle_release.aclose()
            if self._thread is not None:
                async with self.exclusive():
                    with contextlib.suppress(Exception):
                        await self._thread.close()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Refuse further units and end the thread once it has run what it was given (closing the
        connection then); waits for nothing, so a cut :meth:`aclose` (or the backend's) calls it."""
        self._closed = True
        if self._thread is not None:
            self._thread.shutdown()
