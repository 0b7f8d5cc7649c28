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
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from .._lanes import IDLE_RELEASE_S, IdleRelease
from .engine import connect

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

    The connection is opened on first use (in the thread) and closed by :meth:`close`. A caller
    cancelled while its function runs does not stop the function: a unit ends its transaction itself.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncflow-sqlite")
        self._conn: Any = None
        self.settings: dict[str, Any] = {}  # PRAGMA values to copy when the connection opens

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        conn = self._conn
        if conn is None:
            conn = connect(self._path)
            for name, value in self.settings.items():
                conn.execute(f"PRAGMA {name} = {int(value)}")
            self._conn = conn
        return fn(conn, *args)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(sqlite3_connection, *args)`` in the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, args)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    async def close(self) -> None:
        """Close the connection (it reopens on the next :meth:`run`)."""
        if self._conn is not None:
            await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._executor, self._close))

    def shutdown(self) -> None:
        """Stop the worker thread once it has nothing left to run."""
        self._executor.shutdown(wait=False)


class SqliteLane:
    """The write gate of a SQLite repo, and its own connection when the database is a file."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._gate = asyncio.Lock()
        self._waiting = 0
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
        if self._waiting == 0 and self._thread is not None and self._thread.is_open:
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
            if not self._thread.is_open:
                self._thread.settings = await self._engine_settings()
            yield self._thread
        finally:
            self._leave()

    async def _engine_settings(self) -> dict[str, Any]:
        """The PRAGMAs the engine's connections run with (the caller may have changed them in a
        ``connect`` listener): the own connection copies them."""
        async with self._engine.connect() as conn:
            return {
                name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar_one() for name in COPIED_PRAGMAS
            }

    async def aclose(self) -> None:
        """Close the own connection and stop its thread."""
        await self._idle_release.aclose()
        if self._thread is not None:
            async with self.exclusive():
                with contextlib.suppress(Exception):
                    await self._thread.close()
            self._thread.shutdown()
