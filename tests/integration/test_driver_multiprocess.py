"""Three driver processes on one PostgreSQL database, with the Redis lock or with ``DatabaseWorkflowLock``
(no Redis at all: the processes never import the redis package): every node's ``run`` happens exactly
once (recorded in a side table by the workers themselves), and each process does some of the work."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import pathlib
import re
import sys
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

PROCESSES = 3
INSTANCES = 1000  # enough for the three processes to contend on every claim; small enough for CI
NODES = {"A": ["B", "C"], "B": [], "C": []}
RELIABILITY_MD = pathlib.Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def _engine(url: str, schema: str, pool_size: int = 4) -> Any:
    return create_async_engine(
        url, connect_args={"server_settings": {"search_path": schema}}, pool_size=pool_size, max_overflow=2
    )


async def _drive(url: str, schema: str, redis_url: str | None, prefix: str, go: Any) -> dict[str, int]:
    from asyncflow.config import NodeConfig, WorkflowConfig
    from asyncflow.context import JSONContext
    from asyncflow.driver import WorkflowDriver
    from asyncflow.engine.service import WorkflowService
    from asyncflow.errors import StoreError
    from asyncflow.lock.database import DatabaseWorkflowLock
    from asyncflow.records import QueryWorkflowInstanceParams
    from asyncflow.registry import Registry
    from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
    from asyncflow.worker import NormalTaskWorker, current_node

    engine = _engine(url, schema)
    registry = Registry()
    nodes = tuple(NodeConfig(id=n, name=n, next_nodes=tuple(nxt)) for n, nxt in NODES.items())
    registry.load_workflow_config(WorkflowConfig(id="dag", name="dag", nodes=nodes))

    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")  # one round trip a row

    async def record(ctx: JSONContext) -> None:
        info = current_node()
        async with autocommit.connect() as conn:
            await conn.execute(
                text("INSERT INTO node_runs (instance_id, node) VALUES (:i, :n)"),
                {"i": info.instance_id, "n": info.task_type},
            )

    for node in NODES:
        registry.register_workflow_task("dag", node, NormalTaskWorker(run=record))
    repo = SQLAlchemyWorkflowRepo(engine)
    lock: Any
    if redis_url is None:
        lock = DatabaseWorkflowLock(repo, prefix=prefix)
    else:
        from asyncflow.lock.redis import RedisWorkflowLock

        lock = RedisWorkflowLock(redis_url, prefix=prefix)
    service = WorkflowService(repo, lock, registry, lock_ttl=10.0)
    driver = WorkflowDriver(service, concurrency=8, poll_interval=0.2)
    done = QueryWorkflowInstanceParams(status_in=("completed",))
    try:
        await asyncio.to_thread(go.wait, 60)  # all processes start together
        async with driver:
            for _ in range(1200):  # bounded: the work takes seconds
                with contextlib.suppress(StoreError):  # a busy server: ask again
                    if await service.count_workflow_instances(done) >= INSTANCES:
                        break
                await asyncio.sleep(0.1)
        stats = driver.stats.as_dict()
        stats["imported_redis"] = int("redis" in sys.modules)
        return stats
    finally:
        await lock.aclose()
        await repo.aclose()
        await engine.dispose()


def _child(url: str, schema: str, redis_url: str | None, prefix: str, go: Any, results: Any) -> None:
    try:
        results.put(asyncio.run(_drive(url, schema, redis_url, prefix, go)))
    except BaseException as exc:  # report it to the parent rather than dying silently
        results.put({"error": repr(exc)})
        raise


@pytest.mark.postgres
@pytest.mark.parametrize("lock_kind", [pytest.param("redis", marks=pytest.mark.redis), "database"])
async def test_three_driver_processes_run_every_node_exactly_once(
    postgres_url: str, lock_kind: str, request: pytest.FixtureRequest
) -> None:
    from asyncflow.records import NewWorkflowInstance
    from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo

    redis_url = request.getfixturevalue("redis_url") if lock_kind == "redis" else None
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(postgres_url)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = _engine(postgres_url, schema)
    processes: list[Any] = []
    repo = SQLAlchemyWorkflowRepo(engine)
    try:
        await repo.create_schema()
        async with engine.begin() as conn:
            await conn.execute(
                text("CREATE TABLE node_runs (instance_id BIGINT NOT NULL, node TEXT NOT NULL)")
            )
        news = [
            NewWorkflowInstance(workflow_type="dag", business_id=f"b{i}", workflow_context={})
            for i in range(INSTANCES)
        ]
        await repo.create_workflow_instances(news)

        ctx = multiprocessing.get_context("spawn")
        go, results = ctx.Event(), ctx.Queue()
        prefix = f"asyncflow-test:{uuid.uuid4().hex[:8]}:"
        for _ in range(PROCESSES):
            process = ctx.Process(target=_child, args=(postgres_url, schema, redis_url, prefix, go, results))
            process.start()
            processes.append(process)
        go.set()
        stats = [await asyncio.to_thread(results.get, True, 100) for _ in processes]
        for process in processes:
            await asyncio.to_thread(process.join, 30)
        assert [s.get("error") for s in stats] == [None] * PROCESSES
        assert [p.exitcode for p in processes] == [0] * PROCESSES

        async with engine.connect() as conn:
            total, distinct = (
                await conn.execute(
                    text("SELECT count(*), count(DISTINCT (instance_id, node)) FROM node_runs")
                )
            ).one()
            completed = (
                await conn.execute(text("SELECT count(*) FROM workflow_instance WHERE status = 'completed'"))
            ).scalar_one()
        assert completed == INSTANCES
        assert (total, distinct) == (INSTANCES * len(NODES), INSTANCES * len(NODES))  # each run exactly once
        assert sum(s["completed"] for s in stats) == INSTANCES
        assert all(s["passes"] > 0 for s in stats)  # the work was spread among the processes
        assert sum(s["errors"] for s in stats) == 0
        if lock_kind == "database":
            assert [s["imported_redis"] for s in stats] == [0] * PROCESSES  # PostgreSQL alone
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        await repo.aclose()  # its kept connections go back to the pool before the engine is disposed
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


def test_docs_state_the_instance_count_this_test_runs() -> None:
    """docs/reliability.md (section 8, "Without Redis") quotes this test: its figures are the test's own."""
    text = " ".join(RELIABILITY_MD.read_text(encoding="utf-8").split())
    stated = re.search(r"(\w+) driver processes on PostgreSQL run every node of ([\d,]+) instances", text)
    assert stated is not None, "docs/reliability.md no longer describes the multi-process test"
    assert stated.group(1) == "three" and PROCESSES == 3
    assert stated.group(2) == f"{INSTANCES:,}", (stated.group(2), INSTANCES)
