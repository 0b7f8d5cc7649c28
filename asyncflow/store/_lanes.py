"""Connections a SQL backend keeps checked out while it is busy, for its single-statement calls.

A checkout from SQLAlchemy's pool and its return cost about as much as the statement itself
(``AsyncConnection`` set-up, pool events, reset on return: on SQLite a ROLLBACK sent to aiosqlite's
thread), so the hot path keeps connections ("lanes") between calls and hands them straight to the
next caller. Lanes go back to the pool once the repo has been idle (no call in flight and none
waiting) for :data:`IDLE_RELEASE_S` (a busy repo has many short idle gaps between calls: returning
and re-opening its lanes in each cost up to a tenth of its throughput), so an idle repo holds nothing
(even one never closed), and a busy one never starves the rest of the pool:

Backends build on :class:`Lane` and :class:`IdleRelease`: PostgreSQL's
:class:`~asyncflow.store.postgres.lanes.PgLanes`, SQLite's :class:`~asyncflow.store.sqlite.lane.SqliteLane`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar
from weakref import WeakKeyDictionary, WeakSet

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._errors import DB_ERRORS

__all__ = [
    "IDLE_RELEASE_S",
    "IdleRelease",
    "Lane",
    "close_now",
    "stamp_births",
    "to_completion",
    "watch_dispose",
]

logger = logging.getLogger(__name__)

IDLE_RELEASE_S = 0.05
"""Seconds a repo stays idle before its lanes go back to the pool."""

_BORN = "asyncflow_born"

T = TypeVar("T")


class IdleRelease:
    """Calls ``release()`` once its owner has stayed idle for ``delay`` seconds.

    The owner calls :meth:`arm` each time it goes idle; a timer checks ``is_idle()`` when the delay
    is up (and waits out the rest if the owner went busy and idle again meanwhile). The release runs
    in a task of its own, which :meth:`aclose` cancels the timer for and waits for.
    """

    def __init__(
        self, is_idle: Callable[[], bool], release: Callable[[], Awaitable[None]], delay: float
    ) -> None:
        self._is_idle = is_idle
        self._release = release
        self._delay = delay
        self._idle_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _same_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop; a timer or task of an earlier loop (one that has ended) is forgotten."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._timer = self._task = None
            self._loop = loop
        return loop

    def arm(self) -> None:
        loop = self._same_loop()
        self._idle_since = loop.time()
        if self._timer is None and self._task is None:
            self._timer = loop.call_later(self._delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if not self._is_idle():
            return  # busy: it arms again when it next goes idle
        loop = asyncio.get_running_loop()
        remaining = self._idle_since + self._delay - loop.time()
        if remaining > 0:
            self._timer = loop.call_later(remaining, self._fire)
            return
        task = loop.create_task(self._run(), name="asyncflow-release-idle-connections")
        if not task.done():  # an eager task factory may have run it to its end (which cleared _task)
            self._task = task

    async def _run(self) -> None:
        try:
            await self._release()
        except Exception:  # the pool copes with a connection it did not get back; say so
            logger.warning("returning idle connections to the pool failed", exc_info=True)
        finally:
            self._task = None

    async def aclose(self) -> None:
        """Cancel the timer and wait for a release in progress."""
        self._same_loop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None:
            await asyncio.wait([task])


class Lane:
    """A checked-out ``AsyncConnection`` and the driver connection underneath it."""

    __slots__ = ("conn", "driver", "pool", "raw")

    def __init__(self, conn: AsyncConnection, raw: Any) -> None:
        self.conn = conn
        self.raw = raw  # the pool's proxy of the DBAPI connection
        self.driver = raw.driver_connection
        self.pool = conn.sync_engine.pool  # the pool it came from (dispose() replaces the engine's)

    @classmethod
    async def open(cls, engine: AsyncEngine) -> Lane:
        conn = await engine.connect()
        try:
            raw = await conn.get_raw_connection()
        except BaseException:
            await _close_quietly(conn)
            raise
        return cls(conn, raw)

    async def close(self) -> None:
        """Return the connection to the pool (run to completion even if the caller is cancelled).

        If the engine was disposed meanwhile, its old pool would keep the connection open for the
        garbage collector: it is closed instead.
        """
        await to_completion(_close_quietly(self.conn))
        if self.conn.sync_engine.pool is not self.pool:
            await to_completion(_close_driver(self.driver))

    @property
    def born(self) -> float:
        """When the pool opened this connection (``time.monotonic()``; 0 if before :func:`stamp_births`)."""
        born = self.raw.info.get(_BORN, 0.0)
        return born if isinstance(born, float) else 0.0

    async def discard(self, error: BaseException | None = None) -> None:
        """Invalidate the connection (it may be mid-statement or broken): the pool replaces it."""
        await to_completion(_invalidate(self.conn))


async def to_completion(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile (then re-raise the cancel)."""
    task = asyncio.ensure_future(coro)
    cancelled: BaseException | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as error:
            cancelled = error
        except BaseException:
            break
    result = task.result()
    if cancelled is not None:
        raise cancelled
    return result


async def _close_driver(driver: Any) -> None:
    terminate = getattr(driver, "terminate", None)  # asyncpg: at once, no round trip
    with contextlib.suppress(Exception):
        if callable(terminate):
            terminate()
        else:
            await driver.close()  # aiosqlite


async def _close_quietly(conn: AsyncConnection) -> None:
    with contextlib.suppress(*DB_ERRORS):  # already broken: the pool drops it
        await conn.close()


async def _invalidate(conn: AsyncConnection) -> None:
    try:
        await conn.invalidate()
    finally:
        await _close_quietly(conn)


class _KeepsLanes(Protocol):
    def drop_idle_lanes(self) -> None: ...


_keepers: WeakKeyDictionary[Engine, WeakSet[_KeepsLanes]] = WeakKeyDictionary()


def stamp_births(engine: AsyncEngine) -> None:
    """Record in each new pooled connection's ``info`` when it was opened (see :attr:`Lane.born`)."""
    sync_engine = engine.sync_engine
    if not event.contains(sync_engine, "connect", _stamp):
        event.listen(sync_engine, "connect", _stamp)


def _stamp(dbapi_connection: Any, connection_record: Any) -> None:
    connection_record.info[_BORN] = time.monotonic()


def watch_dispose(engine: AsyncEngine, keeper: _KeepsLanes) -> None:
    """Have ``keeper`` close its idle lanes when ``engine`` is disposed (a repo never closed, say).

    The event is the engine's own: a view made by ``execution_options()`` that is disposed through
    its root engine does not see it, and its lanes go back (and are closed) at the next idle release.
    """
    sync_engine = engine.sync_engine
    keepers = _keepers.get(sync_engine)
    if keepers is None:
        keepers = _keepers[sync_engine] = WeakSet()
        event.listen(sync_engine, "engine_disposed", _on_engine_disposed)
    keepers.add(keeper)


def _on_engine_disposed(engine: Engine) -> None:
    for keeper in list(_keepers.get(engine, ())):
        keeper.drop_idle_lanes()


def close_now(lane: Lane) -> bool:
    """Close a lane's DBAPI connection from synchronous code (``Engine.dispose()`` in a greenlet)."""
    connection = lane.conn.sync_connection
    if connection is None:  # already closed
        return True
    try:
        connection.invalidate()  # closes the DBAPI connection: nothing left to the GC
        connection.close()
    except Exception as error:  # outside SQLAlchemy's greenlet (a sync dispose): leave it be
        logger.debug("could not close an idle connection on engine dispose: %s", error)
        return False
    return True
