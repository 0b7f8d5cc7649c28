"""Issue 8, item 3: Redis stops in the middle of a driver run, and comes back.

A private redis-server (never the shared one) serves the lock of a ``WorkflowDriver`` running the mixed
workflow on SQLite and on PostgreSQL. Mid-run the server is killed (SIGKILL) for two seconds, then
started again on the same port (empty: no persistence). Meanwhile:

* taking a lock fails with ``LockFailedError`` and held leases are lost when their renewal fails;
* no pass writes without a lease it believes it holds: every ``apply_step`` is checked against the
  lease of the pass that issues it (``lease.lost`` must be false when the write starts);
* once Redis is back the driver finishes every instance; each node is completed by exactly one write.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asyncflow.driver import WorkflowDriver
from asyncflow.engine.rules import SchedulePolicy
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import LockFailedError
from asyncflow.lock.redis import RedisWorkflowLock
from asyncflow.records import NewWorkflowInstance, QueryWorkflowInstanceParams, Step, StepResult
from asyncflow.retry import RetryPolicy
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.worker import current_node
from tests.conftest import isolated_pg_engine

from .conftest import PrivateRedis
from .helpers import ALL_ROWS, MIXED, CompletionCounter, Journal, mixed_registry, snapshot, stall_report

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

INSTANCES = 300
FAST = SchedulePolicy(poll_interval=0.05)
FAST_RETRY = RetryPolicy(initial_interval=0.05, max_interval=0.2)
_ACTIVE = QueryWorkflowInstanceParams(status_in=("init", "running"))
_LEASE: contextvars.ContextVar[Any] = contextvars.ContextVar("reliability_lease", default=None)


class WatchedLock:
    """Delegates to the Redis lock; counts refused holds and lost leases; publishes the pass's lease."""

    def __init__(self, inner: RedisWorkflowLock) -> None:
        self.inner = inner
        self.refused: collections.Counter[str] = collections.Counter()
        self.lost = 0
        self.held = 0

    @contextlib.asynccontextmanager
    async def hold(self, key: str, ttl: float) -> AsyncIterator[Any]:
        try:
            hold = self.inner.hold(key, ttl)
            lease = await hold.__aenter__()
        except LockFailedError as exc:
            self.refused["held elsewhere" if "held by another" in str(exc) else "Redis unreachable"] += 1
            raise
        self.held += 1
        token = _LEASE.set(lease)
        try:
            yield lease
        finally:
            _LEASE.reset(token)
            self.lost += lease.lost
            await hold.__aexit__(None, None, None)


class LeaseCheckingRepo(CompletionCounter):
    """Counts completions, and every write issued while the pass's lease was already lost."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.writes = 0
        self.unlocked_writes: list[str] = []

    async def apply_step(self, step: Step) -> StepResult:
        lease = _LEASE.get()
        self.writes += 1
        if lease is None or lease.lost:
            self.unlocked_writes.append(f"instance {step.instance_id}: lease {lease!r}")
        return await super().apply_step(step)


async def slow_worker(node: str, phase: str, moment: str) -> None:
    """A few ms per call; one instance in ten has a ``D`` that runs for 1.2 s (a pass holding its lease
    across renewals when Redis goes away)."""
    if moment == "start":
        long = node == "D" and phase == "run" and current_node().instance_id % 10 == 0
        await asyncio.sleep(1.2 if long else 0.003)


@contextlib.asynccontextmanager
async def sql_repo(backend: str, tmp_path: Any, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if backend == "sqlite":
        repo = SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/redis-outage.db")
        await repo.create_schema()
        try:
            yield repo
        finally:
            await repo.aclose()
        return
    async with isolated_pg_engine(request.getfixturevalue("pg_url")) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        yield repo


@pytest.mark.redis
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_redis_outage_mid_run(
    backend: str, private_redis: PrivateRedis, tmp_path: Any, request: pytest.FixtureRequest, caplog: Any
) -> None:
    async with sql_repo(backend, tmp_path, request) as inner:
        journal = Journal()
        repo = LeaseCheckingRepo(inner)
        redis_lock = RedisWorkflowLock(
            private_redis.url, prefix=f"outage:{uuid.uuid4().hex[:8]}:", op_timeout=0.5
        )
        lock = WatchedLock(redis_lock)
        svc = WorkflowService(
            repo,  # type: ignore[arg-type]
            lock,  # type: ignore[arg-type]
            mixed_registry(journal, hook=slow_worker),
            lock_ttl=1.5,
            schedule=FAST,
            retry=FAST_RETRY,
        )
        await inner.create_workflow_instances(
            [
                NewWorkflowInstance(workflow_type=MIXED, business_id=f"r{i}", workflow_context={})
                for i in range(INSTANCES)
            ]
        )
        driver = WorkflowDriver(svc, concurrency=32, poll_interval=0.05, listen=False)
        figures: dict[str, Any] = {}
        try:
            with caplog.at_level(logging.WARNING, logger="asyncflow"):
                async with driver:
                    async with asyncio.timeout(60):
                        while sum(repo.completions.values()) < INSTANCES * len(ALL_ROWS) // 4:
                            await asyncio.sleep(0.02)
                    figures["nodes completed before"] = sum(repo.completions.values())
                    holds_before = lock.held
                    await private_redis.stop()
                    started = time.monotonic()
                    await asyncio.sleep(2.0)
                    figures["nodes completed while down"] = (
                        sum(repo.completions.values()) - figures["nodes completed before"]
                    )
                    await private_redis.start()
                    figures["outage seconds"] = round(time.monotonic() - started, 2)
                    try:
                        async with asyncio.timeout(90):
                            while await inner.count_workflow_instances(_ACTIVE) > 0:
                                await asyncio.sleep(0.05)
                    except TimeoutError:
                        report = await stall_report(inner, driver)
                        pytest.fail(f"not finished 90 s after Redis came back:\n{report}")
                    figures["recovery seconds"] = round(time.monotonic() - started, 2)
                    figures["holds after restart"] = lock.held - holds_before
        finally:
            await redis_lock.aclose()
        everything = await snapshot(inner)
        figures["statuses"] = dict(collections.Counter(row.status for row in everything.tasks))
        assert {i.status for i in everything.instances} == {"completed"}
    figures.update(
        refused=dict(lock.refused),
        leases_lost=lock.lost,
        writes=repo.writes,
        writes_without_a_lease=len(repo.unlocked_writes),
        re_executed_phases=sum(
            n - 1 for phase in ("run", "check") for n in journal.count("done", phase).values()
        ),
        driver_lock_skips=driver.stats.lock_skips,
    )
    print(f"Redis outage ({backend}): {figures}")
    assert repo.unlocked_writes == [], repo.unlocked_writes[:5]
    assert lock.refused["Redis unreachable"] > 0, "no hold failed: the outage did not bite"
    assert lock.lost > 0, "no lease was lost: no pass held its lock across the outage"
    assert figures["holds after restart"] > 0
    assert len(repo.completions) == INSTANCES * len(ALL_ROWS), "a node was never completed"
    assert set(repo.completions.values()) == {1}, "a node was completed twice"
    assert figures["statuses"] == {"completed": INSTANCES * len(ALL_ROWS)}
