"""The floor: the least a ``linear3`` run must commit, as raw driver statements at the same concurrency.

Per workflow, four commits, each a single autocommit statement on PostgreSQL (raw asyncpg, one
connection per in-flight workflow, no pool, no ORM, no SQLAlchemy):

1. ``INSERT`` the instance row (``RETURNING id``);
2. ``INSERT`` node A's row, already ``completed``, with a tiny output;
3. ``INSERT`` node B's row, likewise;
4. ``INSERT`` node C's row and mark the instance ``completed``, in one statement (a data-modifying CTE).

So root and end get no rows and the instance's completion rides on the last node, the fewest durable
writes a 3-node run can have (one for the instance and one per node). On SQLite the same rows are
written through the stdlib ``sqlite3`` module on one connection in one thread (like aiosqlite),
autocommit; step 4 is ``BEGIN``/``INSERT``/``UPDATE``/``COMMIT`` in one thread hop (SQLite has no
data-modifying CTEs), still one commit. The tables are shaped like asyncflow's.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .databases import PgAdmin
from .harness import LatencySampler, ResourceProbe, RunMeasurement

__all__ = ["COMMITS_PER_WORKFLOW", "run_floor_postgres", "run_floor_sqlite"]

COMMITS_PER_WORKFLOW = 4
_NODES = ("A", "B", "C")
_OUTPUT = json.dumps({"out": 1})

_PG_DDL = """
CREATE TABLE workflow_instance (
    id BIGSERIAL PRIMARY KEY,
    workflow_type VARCHAR(128) NOT NULL,
    business_id VARCHAR(128) NOT NULL,
    status VARCHAR(32) NOT NULL,
    workflow_context JSONB NOT NULL,
    task_id BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    next_run_at BIGINT NOT NULL DEFAULT 0,
    version BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX ix_workflow_instance_due ON workflow_instance (status, next_run_at);
CREATE TABLE task_instance (
    id BIGSERIAL PRIMARY KEY,
    workflow_instance_id BIGINT NOT NULL,
    task_type VARCHAR(128) NOT NULL,
    status VARCHAR(32) NOT NULL,
    node_context JSONB NOT NULL,
    fail_count INTEGER NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1,
    UNIQUE (workflow_instance_id, task_type)
);
"""

_PG_INSERT_INSTANCE = (
    "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, created_at, "
    "updated_at) VALUES ('linear3', $1, 'running', '{}', $2, $2) RETURNING id"
)
_PG_INSERT_NODE = (
    "INSERT INTO task_instance (workflow_instance_id, task_type, status, node_context, created_at, "
    "updated_at, started_at) VALUES ($1, $2, 'completed', $3::jsonb, $4, $4, $4)"
)
_PG_INSERT_LAST_NODE = (
    f"WITH node AS ({_PG_INSERT_NODE}) "
    "UPDATE workflow_instance SET status = 'completed', updated_at = $4, version = version + 1 WHERE id = $1"
)


async def _drive(n: int, concurrency: int, one: Any, sampler: LatencySampler) -> None:
    """Run ``one(worker, index)`` for indexes 0..n-1 on ``concurrency`` worker tasks."""
    counter = iter(range(n))

    async def worker(slot: int) -> None:
        for index in counter:
            start = time.perf_counter()
            await one(slot, index)
            if sampler.wants(index):
                sampler.add(time.perf_counter() - start)

    async with asyncio.TaskGroup() as group:
        for slot in range(min(concurrency, n)):
            group.create_task(worker(slot), name=f"floor-worker-{slot}")


async def run_floor_postgres(
    dsn: str, n: int, concurrency: int, *, admin: PgAdmin, database: str
) -> RunMeasurement:
    """Run ``n`` floor workflows against the fresh, empty ``database`` (reached through ``dsn``).

    Each connection runs one warm-up workflow first (statement preparation), then flushes its
    statistics, so ``commits`` (``pg_stat_database.xact_commit``) covers the timed workflows only.
    """
    import asyncpg

    setup = await asyncpg.connect(dsn)
    try:
        await setup.execute(_PG_DDL)
    finally:
        await setup.close()
    connections = [await asyncpg.connect(dsn) for _ in range(min(concurrency, n))]
    sampler = LatencySampler(n)

    async def one(slot: int, index: int) -> None:
        conn = connections[slot]
        now = int(time.time())
        instance_id = await conn.fetchval(_PG_INSERT_INSTANCE, f"floor-{index}", now)
        for node in _NODES[:-1]:
            await conn.execute(_PG_INSERT_NODE, instance_id, node, _OUTPUT, now)
        await conn.execute(_PG_INSERT_LAST_NODE, instance_id, _NODES[-1], _OUTPUT, now)

    try:
        # warm every connection's statement cache so the timed part sends only prepared statements
        await asyncio.gather(*(one(slot, -1 - slot) for slot in range(len(connections))))
        await asyncio.gather(*(conn.execute("SELECT pg_stat_force_next_flush()") for conn in connections))
        await asyncio.sleep(0.2)  # the flush happens as each backend goes idle
        before = await admin.xact_commit(database, wait_idle=False)
        with ResourceProbe() as probe:
            await _drive(n, concurrency, one, sampler)
    finally:
        for conn in connections:
            await conn.close()
    after = await admin.xact_commit(database)
    check = await asyncpg.connect(dsn)
    try:
        done = await check.fetchval("SELECT count(*) FROM workflow_instance WHERE status = 'completed'")
    finally:
        await check.close()
    if done != n + len(connections):
        raise RuntimeError(f"floor: expected {n + len(connections)} completed instances, found {done}")
    return RunMeasurement(
        n=n,
        elapsed_s=probe.wall_s,
        cpu_s=probe.cpu_s,
        peak_rss_bytes=probe.peak_rss_bytes,
        latencies_s=sampler.latencies(),
        commits=after - before,
        write_commits=n * COMMITS_PER_WORKFLOW,
    )


_SQLITE_DDL = [
    "CREATE TABLE workflow_instance (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "workflow_type VARCHAR(128) NOT NULL, business_id VARCHAR(128) NOT NULL, status VARCHAR(32) NOT NULL, "
    "workflow_context TEXT NOT NULL, task_id INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, "
    "updated_at INTEGER NOT NULL, next_run_at INTEGER NOT NULL DEFAULT 0, "
    "version INTEGER NOT NULL DEFAULT 1)",
    "CREATE INDEX ix_workflow_instance_due ON workflow_instance (status, next_run_at)",
    "CREATE TABLE task_instance (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "workflow_instance_id INTEGER NOT NULL, task_type VARCHAR(128) NOT NULL, status VARCHAR(32) NOT NULL, "
    "node_context TEXT NOT NULL, fail_count INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL, "
    "updated_at INTEGER NOT NULL, started_at INTEGER NOT NULL, version INTEGER NOT NULL DEFAULT 1, "
    "UNIQUE (workflow_instance_id, task_type))",
]
_SQLITE_INSERT_INSTANCE = (
    "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, created_at, "
    "updated_at) VALUES ('linear3', ?, 'running', '{}', ?, ?)"
)
_SQLITE_INSERT_NODE = (
    "INSERT INTO task_instance (workflow_instance_id, task_type, status, node_context, created_at, "
    "updated_at, started_at) VALUES (?, ?, 'completed', ?, ?, ?, ?)"
)
_SQLITE_COMPLETE = (
    "UPDATE workflow_instance SET status = 'completed', updated_at = ?, version = version + 1 WHERE id = ?"
)


class _SqliteFloor:
    """One ``sqlite3`` connection, used only from one dedicated thread."""

    def __init__(self, path: str, synchronous: str | None) -> None:
        self.path = path
        self.synchronous = synchronous
        self.conn: sqlite3.Connection | None = None

    def open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        if self.synchronous is not None:
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        for statement in _SQLITE_DDL:
            conn.execute(statement)
        self.conn = conn

    def _c(self) -> sqlite3.Connection:
        assert self.conn is not None
        return self.conn

    def insert_instance(self, business_id: str, now: int) -> int:
        cursor = self._c().execute(_SQLITE_INSERT_INSTANCE, (business_id, now, now))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def insert_node(self, instance_id: int, node: str, now: int) -> None:
        self._c().execute(_SQLITE_INSERT_NODE, (instance_id, node, _OUTPUT, now, now, now))

    def insert_last_node(self, instance_id: int, node: str, now: int) -> None:
        conn = self._c()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_SQLITE_INSERT_NODE, (instance_id, node, _OUTPUT, now, now, now))
            conn.execute(_SQLITE_COMPLETE, (now, instance_id))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def count_completed(self) -> int:
        row = (
            self._c().execute("SELECT count(*) FROM workflow_instance WHERE status = 'completed'").fetchone()
        )
        return int(row[0])

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


async def run_floor_sqlite(
    path: str, n: int, concurrency: int, *, synchronous: str = "FULL"
) -> RunMeasurement:
    """Run ``n`` floor workflows on a fresh SQLite file; every commit is counted by construction."""
    if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
    loop = asyncio.get_running_loop()
    floor = _SqliteFloor(path, synchronous.upper())
    sampler = LatencySampler(n)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-floor") as thread:

        async def call(fn: Any, *args: Any) -> Any:
            return await loop.run_in_executor(thread, fn, *args)

        async def one(slot: int, index: int) -> None:
            now = int(time.time())
            instance_id = await call(floor.insert_instance, f"floor-{index}", now)
            for node in _NODES[:-1]:
                await call(floor.insert_node, instance_id, node, now)
            await call(floor.insert_last_node, instance_id, _NODES[-1], now)

        await call(floor.open)
        try:
            with ResourceProbe() as probe:
                await _drive(n, concurrency, one, sampler)
            done = await call(floor.count_completed)
        finally:
            await call(floor.close)
    if done != n:
        raise RuntimeError(f"sqlite floor: expected {n} completed instances, found {done}")
    return RunMeasurement(
        n=n,
        elapsed_s=probe.wall_s,
        cpu_s=probe.cpu_s,
        peak_rss_bytes=probe.peak_rss_bytes,
        latencies_s=sampler.latencies(),
        commits=n * COMMITS_PER_WORKFLOW,
        write_commits=n * COMMITS_PER_WORKFLOW,
    )
