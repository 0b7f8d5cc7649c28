"""Connections the SQL repo keeps checked out while it is busy, for its single-statement hot path.

A checkout from SQLAlchemy's pool and its return cost about as much as the statement itself
(``AsyncConnection`` set-up, pool events, reset on return: on SQLite a ROLLBACK sent to aiosqlite's
thread), so the hot path keeps connections ("lanes") between calls and hands them straight to the
next caller. Lanes go back to the pool once the repo has been idle (no call in flight and none
waiting) for :data:`IDLE_RELEASE_S` (a busy repo has many short idle gaps between calls: returning
and re-opening its lanes in each cost up to a tenth of its throughput), so an idle repo holds nothing
(even one never closed), and a busy one never starves the rest of the pool:

* PostgreSQL (:class:`PgLanes`): at most ``limit`` lanes, a quarter of the pool's capacity left for
  ``transaction()``, the repo's other calls and whoever else shares the engine; and a lane that is
  not needed right away goes back while every connection of the pool is out (someone may be waiting
  for one). A pool whose capacity is unknown or too small gets no lanes (each call checks a
  connection out and back in).
* SQLite (:class:`SqliteLane`): one lane behind the in-process write gate (one unit at a time). A unit
  that needs a SQLAlchemy connection of its own (``exclusive()``) first returns the lane to the pool,
  so even a one-connection pool never waits on the lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Protocol
from weakref import WeakKeyDictionary, WeakSet

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import QueuePool

from ._dialect import DB_ERRORS

__all__ = ["IDLE_RELEASE_S", "IdleRelease", "Lane", "PgLanes", "SqliteLane", "lane_limit"]

logger = logging.getLogger(__name__)

IDLE_RELEASE_S = 0.05
"""Seconds a repo stays idle before its lanes go back to the pool."""

_PG_ERRORS: tuple[type[BaseException], ...] = ()
_PG_CONNECTION_ERRORS: tuple[type[BaseException], ...] = ()
try:  # asyncpg is an optional extra
    import asyncpg
except ImportError:  # pragma: no cover - depends on the installed extras
    pass
else:
    _PG_ERRORS = (asyncpg.PostgresError,)
    _PG_CONNECTION_ERRORS = (asyncpg.PostgresConnectionError,)


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
        self._task = loop.create_task(self._run(), name="asyncflow-release-idle-connections")

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
        await _to_completion(_close_quietly(self.conn))
        if self.conn.sync_engine.pool is not self.pool:
            await _to_completion(_close_driver(self.driver))

    async def discard(self, error: BaseException) -> None:
        """Invalidate the connection (it may be mid-statement or broken): the pool replaces it.

        A connection the server dropped also ages out every connection the pool made before it,
        as SQLAlchemy does on a disconnect (a restarted server has dropped them all).
        """
        closed = getattr(self.driver, "is_closed", None)
        if callable(closed) and closed():
            pool = self.conn.sync_engine.pool
            invalidate_generation = getattr(pool, "_invalidate", None)
            if callable(invalidate_generation):
                invalidate_generation(self.raw, error, _checkin=False)
        await _to_completion(_invalidate(self.conn))


def pg_reusable(lane: Lane, error: BaseException) -> bool:
    """After ``error`` in a PostgreSQL lane: only a server error leaves the connection in a known state."""
    if isinstance(error, _PG_ERRORS) and not isinstance(error, _PG_CONNECTION_ERRORS):
        closed = getattr(lane.driver, "is_closed", None)
        return not (closed is not None and closed())
    return False


def sqlite_reusable(lane: Lane, error: BaseException) -> bool:
    """After ``error`` in a SQLite lane: fine unless the connection itself is gone.

    A unit in aiosqlite's thread ends its transaction itself, even when the caller was cancelled.
    """
    return not isinstance(error, ValueError | sqlite3.ProgrammingError)


async def _to_completion(coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(coro)
    cancelled: BaseException | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as error:
            cancelled = error
        except BaseException:
            break
    task.result()
    if cancelled is not None:
        raise cancelled


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


def pool_capacity(engine: AsyncEngine) -> int:
    """Connections a ``QueuePool`` hands out at most (0 for other pools: no lanes)."""
    pool = engine.sync_engine.pool
    if not isinstance(pool, QueuePool):
        return 0
    overflow = getattr(pool, "_max_overflow", 0)
    if not isinstance(overflow, int) or overflow < 0:  # unbounded overflow: the pool size still bounds
        overflow = 0
    return pool.size() + overflow


def lane_limit(engine: AsyncEngine) -> int:
    """How many lanes a PostgreSQL repo may hold: three quarters of a ``QueuePool``'s capacity."""
    capacity = pool_capacity(engine)
    return capacity - max(1, capacity // 4)


class _KeepsLanes(Protocol):
    def drop_idle_lanes(self) -> None: ...


_keepers: WeakKeyDictionary[Engine, WeakSet[_KeepsLanes]] = WeakKeyDictionary()


def watch_dispose(engine: AsyncEngine, keeper: _KeepsLanes) -> None:
    """Have ``keeper`` close its idle lanes when ``engine`` is disposed (a repo never closed, say)."""
    sync_engine = engine.sync_engine
    while isinstance(getattr(sync_engine, "_proxied", None), Engine):  # execution_options(): the root's
        sync_engine = sync_engine._proxied  # type: ignore[attr-defined]  # pool and dispose() are shared
    keepers = _keepers.get(sync_engine)
    if keepers is None:
        keepers = _keepers[sync_engine] = WeakSet()
        event.listen(sync_engine, "engine_disposed", _on_engine_disposed)
    keepers.add(keeper)


def _on_engine_disposed(engine: Engine) -> None:
    for keeper in list(_keepers.get(engine, ())):
        keeper.drop_idle_lanes()


def _close_now(lane: Lane) -> bool:
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


class PgLanes:
    """Lanes of a PostgreSQL repo (see the module doc); ``lane()`` yields the asyncpg connection."""

    def __init__(self, engine: AsyncEngine, limit: int) -> None:
        self._engine = engine
        self.limit = limit
        self._capacity = pool_capacity(engine)
        self._slots = asyncio.Semaphore(max(limit, 1))
        self._idle: list[Lane] = []
        self._busy = 0
        self._wanting = 0
        self.closed = False
        self._idle_release = IdleRelease(self._is_idle, self._trim_if_idle, IDLE_RELEASE_S)
        self._pid = os.getpid()
        watch_dispose(engine, self)

    def _is_idle(self) -> bool:
        return self._busy == 0 and self._wanting == 0

    def drop_idle_lanes(self) -> None:
        """The engine was disposed: close the kept connections now (lanes in use go back when released)."""
        if os.getpid() != self._pid:  # a forked child's copies belong to the parent's connections
            return
        lanes, self._idle = self._idle, []  # nobody takes a lane while it closes (closing yields)
        self._idle.extend(lane for lane in lanes if not _close_now(lane))

    @asynccontextmanager
    async def lane(self) -> AsyncIterator[Any]:
        """An asyncpg connection for one statement, outside any transaction."""
        if self.limit <= 0:
            lane = await Lane.open(self._engine)
            try:
                yield lane.driver
            except BaseException as error:
                await (lane.close() if pg_reusable(lane, error) else lane.discard(error))
                raise
            await lane.close()
            return
        lane = await self._acquire()
        try:
            yield lane.driver
        except BaseException as error:
            await self._release(lane, error)
            raise
        await self._release(lane, None)

    async def _acquire(self) -> Lane:
        self._wanting += 1
        try:
            await self._slots.acquire()
        finally:
            self._wanting -= 1
        self._busy += 1
        try:
            return self._idle.pop() if self._idle else await Lane.open(self._engine)
        except BaseException:
            self._busy -= 1
            self._slots.release()
            raise

    async def _release(self, lane: Lane, error: BaseException | None) -> None:
        self._busy -= 1
        self._slots.release()
        if error is not None and not pg_reusable(lane, error):
            await lane.discard(error)
            return
        if self._pool_is_out():  # someone else may wait for a connection: the pool serves in turn
            await lane.close()
            return
        self._idle.append(lane)
        if self.closed:
            await self.trim()
        elif self._is_idle():  # an idle repo holds nothing, even one never closed
            self._idle_release.arm()

    def _pool_is_out(self) -> bool:
        pool = self._engine.sync_engine.pool
        return isinstance(pool, QueuePool) and pool.checkedout() >= self._capacity

    async def aclose(self) -> None:
        """Return every lane to the pool; lanes still in use go back when released."""
        self.closed = True
        await self._idle_release.aclose()
        await self.trim()

    async def _trim_if_idle(self) -> None:
        while self._idle and self._is_idle():
            await self._idle.pop().close()

    async def trim(self) -> None:
        """Return every idle lane to the pool (on close)."""
        while self._idle:
            lane = self._idle.pop()
            try:
                await lane.close()
            except BaseException:
                self._idle.append(lane)  # closed on the next trim
                raise


class SqliteLane:
    """The in-process write gate of a SQLite repo and the one lane its gated hot-path calls share."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._gate = asyncio.Lock()
        self._waiting = 0
        self._lane: Lane | None = None
        self._idle_release = IdleRelease(self._is_idle, self._trim_if_idle, IDLE_RELEASE_S)
        self._pid = os.getpid()
        watch_dispose(engine, self)

    def _is_idle(self) -> bool:
        return self._waiting == 0 and not self._gate.locked()

    def drop_idle_lanes(self) -> None:
        """The engine was disposed: close the kept connection now, unless a unit is using it."""
        if os.getpid() != self._pid or self._lane is None or not self._is_idle():
            return  # a forked child's copy belongs to the parent (and its thread is not here)
        lane, self._lane = self._lane, None  # the next unit opens a new one meanwhile
        if not _close_now(lane) and self._lane is None:
            self._lane = lane

    async def _trim_if_idle(self) -> None:
        if self._lane is not None and self._is_idle():
            async with self.exclusive():
                pass

    async def _enter(self) -> None:
        self._waiting += 1
        try:
            await self._gate.acquire()
        finally:
            self._waiting -= 1

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the gate with the lane back in the pool (for a unit that checks out its own)."""
        await self._enter()
        try:
            await self.trim()
            yield
        finally:
            self._gate.release()

    @asynccontextmanager
    async def lane(self) -> AsyncIterator[Any]:
        """Hold the gate and the lane; yields the aiosqlite connection."""
        await self._enter()
        try:
            if self._lane is None:
                self._lane = await Lane.open(self._engine)
            lane = self._lane
            try:
                yield lane.driver
            except BaseException as error:
                if not sqlite_reusable(lane, error):
                    self._lane = None
                    await lane.discard(error)
                raise
        finally:
            self._gate.release()
            if self._waiting == 0 and self._lane is not None:  # nobody queued behind: the repo goes idle
                self._idle_release.arm()

    async def aclose(self) -> None:
        """Return the lane to the pool."""
        await self._idle_release.aclose()
        async with self.exclusive():
            pass

    async def trim(self) -> None:
        """Return the lane to the pool (the gate must be held)."""
        lane, self._lane = self._lane, None
        if lane is not None:
            await lane.close()
