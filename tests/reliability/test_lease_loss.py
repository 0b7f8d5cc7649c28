"""Issue 8, item 4: a worker that outlives its lease cannot make a second runner double-complete a node.

Two runners (two services, each with its own repo object and lock object on one store, as two processes
would have) work on one instance of the mixed workflow. Runner 1's worker for node ``D`` (no wait check:
its success completes it in one write) blocks; its lease renewal is stalled on purpose
(``lease._suspend_renewal()``) until the lease runs out; runner 2 then takes the lock over.

* With the real lease, runner 1 learns of the loss before its next write: ``LockFailedError``, nothing
  written after the loss.
* A runner that does *not* learn it (a "zombie": its lease is wrapped to always look valid, like a
  process paused past its TTL that writes the moment it wakes) is stopped by the fence (issue 15):
  runner 2's pass began later, so the zombie's completion of ``D`` is refused even when it comes
  first, and runner 2's applies; the zombie's pass stops quietly.

In every case the instance then completes with each node completed by exactly one applied write. The
worker of ``D`` itself did run twice: a lease cannot undo work already done outside the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from asyncflow.clock import FakeClock
from asyncflow.engine.rules import SchedulePolicy
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import LockFailedError
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.retry import RetryPolicy
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import REDIS_URL_ENV, isolated_pg_engine

from .helpers import ALL_ROWS, MIXED, CompletionCounter, Journal, mixed_registry, rows_by_type

FAST = SchedulePolicy(poll_interval=0.01)
FAST_RETRY = RetryPolicy(initial_interval=0.01, max_interval=0.02)


class ZombieLease:
    """A lease that never admits it was lost: the holder keeps believing it holds the lock."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def lost(self) -> bool:
        return False

    def raise_if_lost(self) -> None:
        return None


class CapturingLock:
    """Delegates to a lock and keeps every lease it hands out (wrapped as a zombie if asked)."""

    def __init__(self, inner: Any, *, zombie: bool = False) -> None:
        self.inner = inner
        self.zombie = zombie
        self.leases: list[Any] = []

    @contextlib.asynccontextmanager
    async def hold(self, key: str, ttl: float) -> AsyncIterator[Any]:
        async with self.inner.hold(key, ttl) as lease:
            self.leases.append(lease)
            yield ZombieLease(lease) if self.zombie else lease


@dataclass
class Setup:
    """Two runners' repos and locks on one store, the TTL, and how to make a lease run out."""

    repos: tuple[Any, Any]
    locks: tuple[Any, Any]
    ttl: float
    expire: Callable[[Any], Awaitable[None]]


@contextlib.asynccontextmanager
async def two_runners(kind: str, tmp_path: Any) -> AsyncIterator[Setup]:
    if kind == "memory+local":
        clock = FakeClock()
        repo = MemoryWorkflowRepo()
        lock = LocalWorkflowLock(clock=clock)  # one lock object: the two runners exclude each other

        async def expire_local(lease: Any) -> None:
            lease._suspend_renewal()
            clock.advance(31.0)

        yield Setup((repo, repo), (lock, lock), 30.0, expire_local)
        return
    redis_url = os.environ.get(REDIS_URL_ENV)
    if not redis_url:
        pytest.skip(f"{REDIS_URL_ENV} is not set (.ci/run sets it)")
    from asyncflow.lock.redis import RedisWorkflowLock

    prefix = f"asyncflow-lease-loss:{uuid.uuid4().hex[:8]}:"
    locks = (RedisWorkflowLock(redis_url, prefix=prefix), RedisWorkflowLock(redis_url, prefix=prefix))

    async def expire_redis(lease: Any) -> None:
        lease._suspend_renewal()
        async with asyncio.timeout(10):
            await lease.lost_event.wait()
            while await locks[0].client.exists(prefix + lease.key):  # Redis frees the key soon after
                await asyncio.sleep(0.01)

    try:
        async with _two_repos(kind, tmp_path) as repos:
            yield Setup(repos, locks, 0.6, expire_redis)
    finally:
        for lock in locks:
            await lock.aclose()


@contextlib.asynccontextmanager
async def _two_repos(kind: str, tmp_path: Any) -> AsyncIterator[tuple[Any, Any]]:
    if kind == "sqlite+redis":
        url = f"sqlite+aiosqlite:///{tmp_path}/lease.db"
        first, second = SQLAlchemyWorkflowRepo(url), SQLAlchemyWorkflowRepo(url)
        await first.create_schema()
        try:
            yield first, second
        finally:
            await first.aclose()
            await second.aclose()
        return
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    url = os.environ.get("ASYNCFLOW_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("ASYNCFLOW_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    async with isolated_pg_engine(url) as engine:
        async with engine.connect() as conn:
            search_path = (await conn.execute(text("SHOW search_path"))).scalar_one()
        other = create_async_engine(url, connect_args={"server_settings": {"search_path": search_path}})
        try:
            first = SQLAlchemyWorkflowRepo(engine)
            await first.create_schema()
            yield first, SQLAlchemyWorkflowRepo(other)
        finally:
            await other.dispose()


KINDS = [
    "memory+local",
    pytest.param("sqlite+redis", marks=pytest.mark.redis),
    pytest.param("postgres+redis", marks=[pytest.mark.redis, pytest.mark.postgres]),
]


class Gate:
    """Blocks ``D``'s run in one runner until released; says when the worker got there."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, node: str, phase: str, moment: str) -> None:
        if (node, phase, moment) == ("D", "run", "start"):
            self.entered.set()
            async with asyncio.timeout(30):
                await self.release.wait()


TAKER_TTL = 10.0
"""Runner 2's lock TTL: its leases are never made to run out, and a short one could run out on its own
when a loaded machine delays the renewal (then its pass stops, and its retry runs ``D`` once more)."""


def runner(setup: Setup, index: int, journal: Journal, gate: Gate | None, *, zombie: bool = False) -> Any:
    repo = CompletionCounter(setup.repos[index])
    lock = CapturingLock(setup.locks[index], zombie=zombie)
    registry = mixed_registry(journal, hook=gate)
    ttl = setup.ttl if index == 0 else max(setup.ttl, TAKER_TTL)  # only runner 1's lease is made to expire
    svc = WorkflowService(repo, lock, registry, lock_ttl=ttl, schedule=FAST, retry=FAST_RETRY)  # type: ignore[arg-type]
    return svc, repo, lock


async def take_over(svc: WorkflowService, instance_id: int) -> Any:
    """Runner 2's pass, as soon as the lock is free (a bounded number of tries)."""
    for _ in range(500):
        try:
            return await svc.run_workflow(instance_id)
        except LockFailedError:
            await asyncio.sleep(0.01)
    raise AssertionError("runner 2 never got the lock")


async def finish(setup: Setup, journal: Journal, instance_id: int, counters: list[CompletionCounter]) -> None:
    svc, repo, _ = runner(setup, 1, journal, None)
    counters.append(repo)
    for _ in range(20):
        if (await take_over(svc, instance_id)).status == "completed":
            break
    rows = await rows_by_type(setup.repos[0], instance_id)
    assert set(rows) == ALL_ROWS and {r.status for r in rows.values()} == {"completed"}
    total = {t: sum(c.completions[(instance_id, t)] for c in counters) for t in ALL_ROWS}
    assert total == dict.fromkeys(ALL_ROWS, 1), total


@pytest.mark.parametrize("kind", KINDS)
async def test_a_runner_that_outlived_its_lease_learns_it_and_writes_nothing(
    kind: str, tmp_path: Any
) -> None:
    async with two_runners(kind, tmp_path) as setup:
        journal, gate = Journal(), Gate()
        svc1, repo1, lock1 = runner(setup, 0, journal, gate)
        svc2, repo2, _ = runner(setup, 1, journal, None)
        instance_id = (await svc1.create_workflow(MIXED, "lease")).id
        first = asyncio.create_task(svc1.run_workflow(instance_id))
        async with asyncio.timeout(30):
            await gate.entered.wait()
        written_before = sum(repo1.completions.values())
        await setup.expire(lock1.leases[0])
        assert lock1.leases[0].lost
        await take_over(svc2, instance_id)
        assert repo2.completions[(instance_id, "D")] == 1
        gate.release.set()
        with pytest.raises(LockFailedError, match="lost"):
            await first
        assert sum(repo1.completions.values()) == written_before, "runner 1 wrote after losing its lease"
        assert repo1.completions[(instance_id, "D")] == 0
        assert journal.done(instance_id, "D", "run") == 2  # the work itself did happen twice
        await finish(setup, journal, instance_id, [repo1, repo2])


@pytest.mark.parametrize("zombie_writes_first", [False, True], ids=["runner2-first", "zombie-first"])
@pytest.mark.parametrize("kind", KINDS)
async def test_compare_and_set_stops_a_runner_that_believes_it_still_holds_the_lock(
    kind: str, zombie_writes_first: bool, tmp_path: Any
) -> None:
    async with two_runners(kind, tmp_path) as setup:
        journal, gate1, gate2 = Journal(), Gate(), Gate()
        svc1, repo1, lock1 = runner(setup, 0, journal, gate1, zombie=True)
        svc2, repo2, _ = runner(setup, 1, journal, gate2 if zombie_writes_first else None)
        instance_id = (await svc1.create_workflow(MIXED, "zombie")).id
        zombie = asyncio.create_task(svc1.run_workflow(instance_id))
        async with asyncio.timeout(30):
            await gate1.entered.wait()
        await setup.expire(lock1.leases[0])
        second = asyncio.create_task(take_over(svc2, instance_id))
        if zombie_writes_first:
            async with asyncio.timeout(30):
                await gate2.entered.wait()  # both runners are inside D's run now
            gate1.release.set()
            await zombie  # its completion of D is refused although it comes first: a newer pass began
            assert repo1.completions[(instance_id, "D")] == 0
            gate2.release.set()
            await second  # ...and runner 2's applies
        else:
            await second
            gate1.release.set()
            await zombie  # refused (the fence, and the compare-and-set), no error
        assert repo2.completions[(instance_id, "D")] == 1
        assert repo1.completions[(instance_id, "D")] == 0
        assert journal.done(instance_id, "D", "run") == 2
        await finish(setup, journal, instance_id, [repo1, repo2])


async def test_a_write_that_waited_behind_another_rechecks_the_lease() -> None:
    """A branch whose write waits for a sibling's write (the one carrying ``root``) checks its lease
    again after the wait: a loss detected meanwhile stops it instead of letting it write."""
    from asyncflow.config import NodeConfig, WorkflowConfig
    from asyncflow.registry import Registry
    from asyncflow.worker import NormalTaskWorker

    registry = Registry()
    registry.load_workflow_config(WorkflowConfig(id="two", nodes=(NodeConfig(id="A"), NodeConfig(id="B"))))

    async def quick(ctx: Any) -> None:
        return None

    async def slower(ctx: Any) -> None:
        await asyncio.sleep(0.01)  # B finishes while A's write (carrying root) is in flight

    registry.register_workflow_task("two", "A", NormalTaskWorker(run=quick))
    registry.register_workflow_task("two", "B", NormalTaskWorker(run=slower))
    lock = CapturingLock(LocalWorkflowLock())
    writes: list[tuple[int, bool]] = []

    class LosingRepo(CompletionCounter):
        async def apply_step(self, step: Any) -> Any:
            lease = lock.leases[-1]
            writes.append((len(step.inserts), lease.lost))
            if len(writes) == 1:  # the first write: B's write queues behind it, then the lease is lost
                await asyncio.sleep(0.05)
                lease._mark_lost("renewal failed (test)")
            return await super().apply_step(step)

    repo = LosingRepo(MemoryWorkflowRepo())
    svc = WorkflowService(repo, lock, registry)  # type: ignore[arg-type]
    inst = await svc.create_workflow("two", "b")
    with pytest.raises(LockFailedError, match="lost"):
        await svc.run_workflow(inst.id)
    assert writes == [(2, False)], "a write was issued after the lease was known to be lost"
