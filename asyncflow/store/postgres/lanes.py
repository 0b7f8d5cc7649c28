"""The kept connections ("lanes") of the PostgreSQL backend: asyncpg connections from the engine's pool.

At most ``limit`` lanes, a quarter of the pool's size left for ``transaction()``, the repo's other
calls and whoever else shares the engine; a lane that is not needed right away goes back while every
connection of the pool is out (someone may be waiting for one). A pool that is not a ``QueuePool``,
or one too small, gets no lanes (each call checks a connection out and back in). Only public APIs:
the pool's ``size()``/``checkedout()``, ``AsyncConnection.get_raw_connection()`` and ``invalidate()``,
and a ``connect`` event that stamps each pooled connection's ``info`` with its opening time.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from .._lanes import IDLE_RELEASE_S, IdleRelease, Lane, close_now, stamp_births, watch_dispose

__all__ = ["PgLanes", "lane_limit", "pg_reusable", "pool_capacity"]


def pg_reusable(lane: Lane, error: BaseException) -> bool:
    """After ``error`` in a PostgreSQL lane: only a server error leaves the connection in a known state."""
    if isinstance(error, asyncpg.PostgresError) and not isinstance(error, asyncpg.PostgresConnectionError):
        return not lane.driver.is_closed()
    return False


def pool_capacity(engine: AsyncEngine) -> int:
    """Connections a ``QueuePool`` keeps (its ``size()``; 0 for other pools: no lanes)."""
    pool = engine.sync_engine.pool
    return pool.size() if isinstance(pool, QueuePool) else 0


def lane_limit(engine: AsyncEngine) -> int:
    """How many lanes a PostgreSQL repo may hold: three quarters of a ``QueuePool``'s size."""
    capacity = pool_capacity(engine)
    return capacity - max(1, capacity // 4)


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
        self._lost_at = -1.0  # when a connection was last found dropped by the server
        stamp_births(engine)
        watch_dispose(engine, self)

    def _is_idle(self) -> bool:
        return self._busy == 0 and self._wanting == 0

    def drop_idle_lanes(self) -> None:
        """The engine was disposed: close the kept connections now (lanes in use go back when released)."""
        if os.getpid() != self._pid:  # a forked child's copies belong to the parent's connections
            return
        lanes, self._idle = self._idle, []  # nobody takes a lane while it closes (closing yields)
        self._idle.extend(lane for lane in lanes if not close_now(lane))

    @asynccontextmanager
    async def lane(self) -> AsyncIterator[Any]:
        """An asyncpg connection for one statement, outside any transaction."""
        if self.limit <= 0:
            lane = await self._open()
            try:
                yield lane.driver
            except BaseException as error:
                if pg_reusable(lane, error):
                    await lane.close()
                else:
                    self._lost(lane)
                    await lane.discard(error)
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
            return self._idle.pop() if self._idle else await self._open()
        except BaseException:
            self._busy -= 1
            self._slots.release()
            raise

    async def _open(self) -> Lane:
        """A new lane; connections opened before a connection was found dropped are replaced.

        A server that dropped one connection (a restart, a failover) has most likely dropped every
        connection the pool opened before it: each is discarded instead of failing a call.
        """
        while True:
            lane = await Lane.open(self._engine)
            if lane.born > self._lost_at:
                return lane
            await lane.discard()

    def _lost(self, lane: Lane) -> None:
        if lane.driver.is_closed():
            self._lost_at = time.monotonic()

    async def _release(self, lane: Lane, error: BaseException | None) -> None:
        self._busy -= 1
        self._slots.release()
        if error is not None and not pg_reusable(lane, error):
            self._lost(lane)
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
