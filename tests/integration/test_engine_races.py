"""Races (issue 5): many concurrent ``run_workflow`` calls on one instance never double-run or
double-complete a node, with a real cross-process lock, and without any lock (compare-and-set alone)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import LockFailedError
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import Step, StepResult
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import POSTGRES_URL_ENV, REDIS_URL_ENV, isolated_pg_engine

from .engine_helpers import Calls, config, recording_worker, registry_with, rows_of

pytestmark = [pytest.mark.postgres]

EDGES = {"A": ["B", "C"], "B": ["D"], "C": ["D"], "D": []}


class AlwaysGrantLock:
    """A lock that never refuses: two runners may run the same instance at once."""

    @contextlib.asynccontextmanager
    async def hold(self, key: str, ttl: float) -> AsyncIterator[Any]:
        yield None

    async def aclose(self) -> None:
        return None


class CountingRepo:
    """Delegates to a repo and counts, per task type, the applied writes that completed a node."""

    def __init__(self, inner: Any, completions: collections.Counter[str]) -> None:
        self._inner = inner
        self._completions = completions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def apply_step(self, step: Step) -> StepResult:
        result: StepResult = await self._inner.apply_step(step)
        if result.applied:
            for row in result.inserted:
                if row.status == "completed":
                    self._completions[row.task_type] += 1
            rows = {r.id: r.task_type for r in await self._inner.load_task_instances(step.instance_id)}
            for update in step.updates:
                if update.status == "completed":
                    self._completions[rows[update.id]] += 1
        return result


@contextlib.asynccontextmanager
async def two_repos() -> AsyncIterator[tuple[SQLAlchemyWorkflowRepo, SQLAlchemyWorkflowRepo]]:
    """Two repos with their own engines on one private PostgreSQL schema."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set (.ci/run sets it)")
    from sqlalchemy.ext.asyncio import create_async_engine

    async with isolated_pg_engine(url) as first:
        search_path = await _search_path(first)
        second = create_async_engine(url, connect_args={"server_settings": {"search_path": search_path}})
        repo1, repo2 = SQLAlchemyWorkflowRepo(first), SQLAlchemyWorkflowRepo(second)
        await repo1.create_schema()
        try:
            yield repo1, repo2
        finally:
            await second.dispose()


async def _search_path(engine: Any) -> str:
    from sqlalchemy import text

    async with engine.connect() as conn:
        return str((await conn.execute(text("SHOW search_path"))).scalar_one())


def slow_workers(calls: Calls) -> dict[str, Any]:
    async def work(ctx: JSONContext) -> None:
        await asyncio.sleep(0.01)

    return {name: recording_worker(calls, work, with_check=(name == "B")) for name in EDGES}


async def _hammer(services: list[WorkflowService], instance_id: int, times: int) -> int:
    async def one(i: int) -> bool:
        try:
            await services[i % len(services)].run_workflow(instance_id)
        except LockFailedError:
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(times)))
    return sum(results)


async def test_two_services_one_redis_lock_run_each_node_once() -> None:
    redis_url = os.environ.get(REDIS_URL_ENV)
    if not redis_url:
        pytest.skip(f"{REDIS_URL_ENV} is not set (.ci/run sets it)")
    from asyncflow.lock.redis import RedisWorkflowLock

    prefix = f"asyncflow-race:{uuid.uuid4().hex[:8]}:"
    calls = Calls()
    cfg = config("race", EDGES)
    async with two_repos() as (repo1, repo2):
        lock1, lock2 = (
            RedisWorkflowLock(redis_url, prefix=prefix),
            RedisWorkflowLock(redis_url, prefix=prefix),
        )
        try:
            services = [
                WorkflowService(repo1, lock1, registry_with(cfg, calls, slow_workers(calls))),
                WorkflowService(repo2, lock2, registry_with(cfg, calls, slow_workers(calls))),
            ]
            for round_ in range(3):
                inst = await services[0].create_workflow("race", f"b{round_}")
                ran = 0
                while (await services[1].get_workflow_instance(inst.id)).status != "completed":
                    ran += await _hammer(services, inst.id, 20)
                assert ran >= 1
                rows = await rows_of(services[0], inst.id)
                assert sorted(rows) == sorted(["root", *EDGES, "end"])
                assert all(r.status == "completed" for r in rows.values())
            for node in EDGES:
                assert calls.runs(node) == 3, (node, calls.count)
            assert calls.checks("B") == 3
        finally:
            await lock1.aclose()
            await lock2.aclose()


async def test_without_a_lock_compare_and_set_prevents_double_completion() -> None:
    calls = Calls()
    cfg = config("race2", EDGES)
    completions: collections.Counter[str] = collections.Counter()
    async with two_repos() as (repo1, repo2):
        lock = AlwaysGrantLock()
        services = [
            WorkflowService(
                CountingRepo(repo1, completions), lock, registry_with(cfg, calls, slow_workers(calls))
            ),
            WorkflowService(
                CountingRepo(repo2, completions), lock, registry_with(cfg, calls, slow_workers(calls))
            ),
        ]
        inst = await services[0].create_workflow("race2", "b")
        for _ in range(5):
            await _hammer(services, inst.id, 20)
        rows = await rows_of(services[0], inst.id)
        assert sorted(rows) == sorted(["root", *EDGES, "end"])
        assert all(r.status == "completed" for r in rows.values())
        assert (await services[0].get_workflow_instance(inst.id)).status == "completed"
        # without a lock several runners did run the same node...
        assert max(calls.runs(node) for node in EDGES) > 1
        # ...but each node was completed by exactly one write
        assert {node: completions[node] for node in (*EDGES, "end")} == dict.fromkeys((*EDGES, "end"), 1)


async def test_local_lock_many_concurrent_runs_in_one_process(engine_repo: Any) -> None:
    calls = Calls()
    cfg = config("race3", EDGES)
    lock = LocalWorkflowLock()
    svc = WorkflowService(engine_repo, lock, registry_with(cfg, calls, slow_workers(calls)))
    inst = await svc.create_workflow("race3", "b")
    while (await svc.get_workflow_instance(inst.id)).status != "completed":
        await _hammer([svc], inst.id, 20)
    for node in EDGES:
        assert calls.runs(node) == 1
    await lock.aclose()
