"""Starting work on PostgreSQL: unique creates, the claim next to delayed instances, 1,000 waiters.

    python benchmarks/bench_starting.py [--pg-url URL] [--repeat 3]

Rows (each the median of ``--repeat`` runs, each on a fresh schema, with [min-max]):

* ``unique creates``: 1,000 concurrent ``create_workflow(unique="active")`` over 100 distinct business
  ids (exactly 100 instances must result), through one service (concurrent creates of one key share
  its leader's insert) and spread over three services with an engine and pool each (the unique index
  decides between them), next to 1,000 plain concurrent creates in the same run.
* ``claim``: the median time of one ``claim_due_instances(limit=64)`` (15 claims) while 1,000
  instances are due, on a schema with no other rows and on one that also holds 10,000 instances
  delayed an hour into the future (``start_in``).
* ``waiters``: 1,000 concurrent ``wait_for_workflow`` calls on 1,000 instances that another service
  (its own engine and pool: "another process") then runs to the end: PostgreSQL connections of the
  waiters' engine (``pg_stat_activity`` by application name; how many LISTEN), and the wake-up latency
  from the end of each instance's ``run_workflow`` call (its commit) to its waiter's return.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncflow as af

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def _registry() -> af.Registry:
    registry = af.Registry()
    registry.load_workflow_config({"id": "w", "nodes": [{"id": "A"}]})

    @registry.task("w", "A")
    async def a(ctx: af.JSONContext) -> None:
        ctx.set(["done"], True)

    return registry


@asynccontextmanager
async def _schema(
    url: str, app: str = "af-bench", pool_size: int = 20
) -> AsyncIterator[tuple[AsyncEngine, str]]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    settings = {"server_settings": {"search_path": schema, "application_name": app}}
    engine = create_async_engine(url, connect_args=settings, pool_size=pool_size, max_overflow=4)
    try:
        yield engine, schema
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


async def _service(engine: AsyncEngine) -> af.WorkflowService:
    repo = af.SQLAlchemyWorkflowRepo(engine)
    await repo.migrate()
    return af.WorkflowService(repo, af.LocalWorkflowLock(), _registry())


async def unique_creates(url: str) -> dict[str, float]:
    async with _schema(url) as (engine, schema):
        svc = await _service(engine)
        settings = {"server_settings": {"search_path": schema}}
        others = []  # two more services, each with its own engine and pool ("other processes")
        for _ in range(2):
            other = create_async_engine(url, connect_args=settings, pool_size=20, max_overflow=4)
            others.append(
                af.WorkflowService(af.SQLAlchemyWorkflowRepo(other), af.LocalWorkflowLock(), _registry())
            )
        services = [svc, *others]
        for service in services:
            await service.create_workflow("w", "warm-up")  # connections and prepared statements
        figures: dict[str, float] = {}
        for label, spread in (("unique_per_s", [svc]), ("unique_3_pools_per_s", services)):
            prefix = label[:8]
            started = time.perf_counter()
            made = await asyncio.gather(
                *(
                    spread[i % len(spread)].create_workflow("w", f"{prefix}{i % 100}", unique="active")
                    for i in range(1000)
                )
            )
            figures[label] = 1000 / (time.perf_counter() - started)
            assert len({inst.id for inst in made}) == 100
        started = time.perf_counter()
        await asyncio.gather(*(svc.create_workflow("w", f"p{i}") for i in range(1000)))
        figures["plain_per_s"] = 1000 / (time.perf_counter() - started)
        count = await svc.count_workflow_instances()
        assert count == 3 + 100 + 100 + 1000, count  # exactly 100 per unique run
        for service in services:
            await service.repo.aclose()
            if service is not svc:
                assert isinstance(service.repo, af.SQLAlchemyWorkflowRepo)
                await service.repo.engine.dispose()
    return figures


async def _claim_ms(repo: af.SQLAlchemyWorkflowRepo, now_ms: int) -> float:
    times = []
    for _ in range(15):  # 15 x 64 of the 1,000 due rows
        started = time.perf_counter()
        ids = await repo.claim_due_instances(now_ms=now_ms, limit=64, lease_ms=3_600_000)
        times.append((time.perf_counter() - started) * 1000)
        assert len(ids) == 64
    return statistics.median(times)


async def _claim_with(url: str, delayed: int) -> float:
    """Median claim time with 1,000 due rows after ``delayed`` rows delayed an hour (a fresh schema)."""
    async with _schema(url) as (engine, _):
        svc = await _service(engine)
        repo = svc.repo
        assert isinstance(repo, af.SQLAlchemyWorkflowRepo)
        for start in range(0, delayed, 500):
            await asyncio.gather(
                *(svc.create_workflow("w", f"f{i}", start_in=3600) for i in range(start, start + 500))
            )
        await asyncio.gather(*(svc.create_workflow("w", f"d{i}") for i in range(1000)))
        async with engine.begin() as conn:
            await conn.execute(text("ANALYZE workflow_instance"))
        claim_ms = await _claim_ms(repo, int(time.time() * 1000) + 1000)
        await repo.aclose()
    return claim_ms


async def claims(url: str) -> dict[str, float]:
    return {
        "claim_ms": await _claim_with(url, 0),
        "claim_ms_with_10000_delayed": await _claim_with(url, 10_000),
    }


async def waiters(url: str) -> dict[str, float]:
    app = f"af-waiters-{uuid.uuid4().hex[:8]}"
    async with _schema(url) as (engine, schema):
        runner = await _service(engine)
        settings = {"server_settings": {"search_path": schema, "application_name": app}}
        waiter_engine = create_async_engine(url, connect_args=settings, pool_size=8, max_overflow=0)
        waiter_repo = af.SQLAlchemyWorkflowRepo(waiter_engine)
        waiting = af.WorkflowService(waiter_repo, af.LocalWorkflowLock(), _registry())
        ids = [
            inst.id
            for inst in await asyncio.gather(*(runner.create_workflow("w", f"b{i}") for i in range(1000)))
        ]
        woke: dict[int, float] = {}

        async def wait(instance_id: int) -> None:
            await waiting.wait_for_workflow(instance_id, timeout=120)
            woke[instance_id] = time.perf_counter()

        tasks = [asyncio.create_task(wait(i)) for i in ids]
        while not (waiting._waiters.listening and waiting._waiters.waiting == 1000):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        async with engine.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        text("SELECT query FROM pg_stat_activity WHERE application_name = :a"), {"a": app}
                    )
                )
                .scalars()
                .all()
            )
        ended: dict[int, float] = {}
        slots = asyncio.Semaphore(32)

        async def run(instance_id: int) -> None:
            async with slots:
                await runner.run_workflow(instance_id)
                ended[instance_id] = time.perf_counter()

        await asyncio.gather(*(run(i) for i in ids))
        await asyncio.gather(*tasks)
        latency = sorted((woke[i] - ended[i]) * 1000 for i in ids)
        await waiter_repo.aclose()
        await waiter_engine.dispose()
        await runner.repo.aclose()
    return {
        "connections": len(rows),
        "listen_connections": sum(1 for q in rows if q.upper().startswith("LISTEN")),
        "wake_p50_ms": latency[len(latency) // 2],
        "wake_p99_ms": latency[int(len(latency) * 0.99) - 1],
    }


def _summary(runs: list[dict[str, float]]) -> str:
    parts = []
    for key in runs[0]:
        values = [run[key] for run in runs]
        parts.append(f"{key}={statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]")
    return "  ".join(parts)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("unique", "claim", "waiters"), help="one row only")
    args = parser.parse_args()
    rows = (("unique", unique_creates), ("claim", claims), ("waiters", waiters))
    for name, bench in rows:
        if args.only not in (None, name):
            continue
        runs = [await bench(args.pg_url) for _ in range(args.repeat)]
        print(f"{name:15} {_summary(runs)}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
