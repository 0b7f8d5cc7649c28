"""Storage throughput: instance creates through ``SQLAlchemyWorkflowRepo`` next to the raw driver.

    python benchmarks/bench_store.py [--backend sqlite|postgres|all] [--pg-url URL] [--repeat 3]

Rows (each the median of ``--repeat`` runs on a fresh schema or file, with [min-max]):

* ``create c=1`` / ``create c=32``: ``create_workflow_instance`` called by 1 or 32 tasks (one row, one
  autocommit statement each).
* ``bulk 10000``: one ``create_workflow_instances`` call of 10,000 rows (multi-row INSERT ... RETURNING).
* ``raw ...``: the same INSERT straight on the driver in the same run: asyncpg (prepared statement,
  autocommit, one connection per task) or aiosqlite (autocommit, one connection per task), and for the
  bulk row the same multi-row statements in one transaction. ``repo/raw`` is the fraction of the raw
  driver's rate the repo reaches.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiosqlite
import sqlalchemy
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from asyncflow.records import NewWorkflowInstance
from asyncflow.store.sqlalchemy import BULK_PAGE_SIZE, SQLAlchemyWorkflowRepo

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
COLUMNS = ", ".join(
    (
        "workflow_type",
        "business_id",
        "status",
        "workflow_context",
        "task_id",
        "created_at",
        "updated_at",
        "next_run_at",
        "version",
    )
)
CONTEXT = '{"order":{"amount":12.5,"currency":"EUR"},"user":"u-1"}'
SINGLES = {1: 1000, 32: 3200}  # rows per run at each concurrency
BULK = 10_000

Timed = Callable[[], Awaitable[int]]  # runs the measured part, returns the rows it wrote


def _new(i: int) -> NewWorkflowInstance:
    return NewWorkflowInstance(
        workflow_type="bench", business_id=f"order-{i}", workflow_context={"order": {"amount": 12.5}, "i": i}
    )


def _row(i: int) -> tuple[Any, ...]:
    now = int(time.time())
    return ("bench", f"order-{i}", "init", CONTEXT, 0, now, now, 0, 1)


async def _gather_split(rows: int, concurrency: int, one: Callable[[int, int], Awaitable[None]]) -> None:
    per_task = rows // concurrency

    async def worker(w: int) -> None:
        for i in range(per_task):
            await one(w, w * per_task + i)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))


# ------------------------------------------------------------------------------------- backends


class Backend:
    """A fresh, empty database per run, reachable through the repo and through the raw driver."""

    name = ""

    def fresh(self, warm: bool) -> Any:  # an async context manager yielding (repo, where the raw run goes)
        raise NotImplementedError


class SQLiteBackend(Backend):
    name = "sqlite"

    @asynccontextmanager
    async def fresh(self, warm: bool) -> AsyncIterator[tuple[SQLAlchemyWorkflowRepo, Any]]:
        with tempfile.TemporaryDirectory(prefix="asyncflow-bench-") as directory:
            path = f"{directory}/bench.db"
            repo = SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{path}")
            await repo.create_schema()
            try:
                yield repo, path
            finally:
                await repo.aclose()

    async def raw(self, path: str, mode: str, concurrency: int) -> int:
        sql = f"INSERT INTO workflow_instance ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"
        conns = []
        for _ in range(concurrency if mode == "single" else 1):
            conn = await aiosqlite.connect(path, isolation_level=None)
            await conn.execute("PRAGMA busy_timeout = 30000")
            conns.append(conn)
        try:
            if mode == "single":
                rows = SINGLES[concurrency]

                async def one(w: int, i: int) -> None:
                    async with conns[w].execute(sql, _row(i)) as cursor:
                        await cursor.fetchone()

                start = time.perf_counter()
                await _gather_split(rows, concurrency, one)
                return _rate(rows, start)
            conn = conns[0]
            all_rows = [_row(i) for i in range(BULK)]
            start = time.perf_counter()
            await conn.execute("BEGIN IMMEDIATE")
            for page_start in range(0, BULK, BULK_PAGE_SIZE):
                page = all_rows[page_start : page_start + BULK_PAGE_SIZE]
                values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(page))
                flat = [value for row in page for value in row]
                statement = f"INSERT INTO workflow_instance ({COLUMNS}) VALUES {values} RETURNING id"
                async with conn.execute(statement, flat) as cursor:
                    await cursor.fetchall()
            await conn.commit()
            return _rate(BULK, start)
        finally:
            for conn in conns:
                await conn.close()


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, url: str) -> None:
        self.url = url
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)

    @asynccontextmanager
    async def fresh(self, warm: bool) -> AsyncIterator[tuple[SQLAlchemyWorkflowRepo, str]]:
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        admin = create_async_engine(self.url)
        async with admin.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        settings = {"server_settings": {"search_path": schema}}
        repo = SQLAlchemyWorkflowRepo(self.url, connect_args=settings, pool_size=32, max_overflow=0)
        try:
            await repo.create_schema()
            if warm:  # open the pool's connections before timing (connection set-up is not measured)
                async with asyncio.TaskGroup() as group:
                    for _ in range(32):
                        group.create_task(repo.get_workflow_instance(0))
            else:  # the raw run opens its own connections
                await repo.engine.dispose()
            yield repo, schema
        finally:
            await repo.aclose()
            async with admin.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            await admin.dispose()

    async def raw(self, schema: str, mode: str, concurrency: int) -> int:
        import asyncpg

        placeholders = ", ".join(f"${i}" for i in range(1, 10))
        sql = f"INSERT INTO workflow_instance ({COLUMNS}) VALUES ({placeholders}) RETURNING id"
        count = concurrency if mode == "single" else 1
        conns = [
            await asyncpg.connect(self.dsn, server_settings={"search_path": schema}) for _ in range(count)
        ]
        try:
            if mode == "single":
                rows = SINGLES[concurrency]
                statements = [await conn.prepare(sql) for conn in conns]

                async def one(w: int, i: int) -> None:
                    await statements[w].fetchval(*_row(i))

                start = time.perf_counter()
                await _gather_split(rows, concurrency, one)
                return _rate(rows, start)
            conn = conns[0]
            all_rows = [_row(i) for i in range(BULK)]
            start = time.perf_counter()
            async with conn.transaction():
                for page_start in range(0, BULK, BULK_PAGE_SIZE):
                    page = all_rows[page_start : page_start + BULK_PAGE_SIZE]
                    values = ", ".join(
                        "(" + ", ".join(f"${r * 9 + c + 1}" for c in range(9)) + ")" for r in range(len(page))
                    )
                    flat = [value for row in page for value in row]
                    await conn.fetch(
                        f"INSERT INTO workflow_instance ({COLUMNS}) VALUES {values} RETURNING id", *flat
                    )
            return _rate(BULK, start)
        finally:
            for conn in conns:
                await conn.close()


def _rate(rows: int, start: float) -> int:
    return round(rows / (time.perf_counter() - start))


# ------------------------------------------------------------------------------------ scenarios


async def repo_run(repo: SQLAlchemyWorkflowRepo, mode: str, concurrency: int) -> int:
    if mode == "single":
        rows = SINGLES[concurrency]

        async def one(w: int, i: int) -> None:
            await repo.create_workflow_instance(_new(i))

        start = time.perf_counter()
        await _gather_split(rows, concurrency, one)
        return _rate(rows, start)
    news = [_new(i) for i in range(BULK)]
    start = time.perf_counter()
    ids = await repo.create_workflow_instances(news)
    assert len(ids) == BULK
    return _rate(BULK, start)


async def measure(backend: Any, repeat: int) -> list[tuple[str, list[int], list[int]]]:
    cases = [("create c=1", "single", 1), ("create c=32", "single", 32), (f"bulk {BULK}", "bulk", 1)]
    results = []
    for label, mode, concurrency in cases:
        repo_rates, raw_rates = [], []
        for _ in range(repeat):  # interleaved: repo then raw, each on a fresh database
            async with backend.fresh(warm=True) as (repo, where):
                repo_rates.append(await repo_run(repo, mode, concurrency))
            async with backend.fresh(warm=False) as (repo, where):
                raw_rates.append(await backend.raw(where, mode, concurrency))
        results.append((label, repo_rates, raw_rates))
    return results


def _fmt(rates: list[int]) -> str:
    return f"{statistics.median(rates):>9,.0f} [{min(rates):,}-{max(rates):,}]"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("ASYNCFLOW_TEST_POSTGRES_URL", DEFAULT_PG_URL),
        help="PostgreSQL URL",
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    backends: list[Any] = []
    if args.backend in ("sqlite", "all"):
        backends.append(SQLiteBackend())
    if args.backend in ("postgres", "all"):
        backends.append(PostgresBackend(args.pg_url))
    print(
        f"python {platform.python_version()}, sqlalchemy {sqlalchemy.__version__}, "
        f"aiosqlite {aiosqlite.__version__}, {os.cpu_count()} cpus, median of {args.repeat} [min-max], rows/s"
    )
    print(f"{'backend':<9} {'scenario':<12} {'repo rows/s':>24} {'raw driver rows/s':>26} {'repo/raw':>9}")
    for backend in backends:
        for label, repo_rates, raw_rates in await measure(backend, args.repeat):
            ratio = statistics.median(repo_rates) / statistics.median(raw_rates)
            print(f"{backend.name:<9} {label:<12} {_fmt(repo_rates):>24} {_fmt(raw_rates):>26} {ratio:>9.2f}")


if __name__ == "__main__":
    asyncio.run(main())
