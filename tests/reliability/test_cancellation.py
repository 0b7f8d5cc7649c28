"""Issue 8, item 5: ``asyncio`` cancellation at every await point of a pass leaves the instance resumable
and consistent.

The mixed workflow (fan-out, join, a wait check, a retry) is run pass by pass with its repo, its lock
and its workers wrapped so that every await they offer is a numbered *point*: before and after each repo
call, before and after taking the instance lock and after releasing it, at the start of each worker
call and just before a worker returns success. A dry run counts the N points of a whole run; then for
each k = 1..N a fresh instance is run and the task running the pass is cancelled at point k. After each:

* the cancellation propagated (the pass's task ended cancelled) and the instance lock is free;
* every node row that says ``completed`` (or ``pending``) has a worker ``run`` that finished (and a
  ``wait_check`` that finished, for ``completed`` nodes with one): nothing is marked done that was not;
* a fresh service and a ``WorkflowDriver`` then finish the instance: every row ``completed``, no
  duplicate row, each node completed by exactly one applied write; a node whose ``run`` success was
  stored never runs again, and a phase re-executes only if it was in flight at the cancellation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asyncflow._held import holds_cancellation, is_held
from asyncflow.driver import WorkflowDriver
from asyncflow.engine.rules import SchedulePolicy
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import TaskInstanceRecord
from asyncflow.retry import RetryPolicy

from .helpers import ALL_ROWS, MIXED, MIXED_EDGES, WITH_CHECK, CompletionCounter, Journal, mixed_registry

FAST = SchedulePolicy(poll_interval=0.01)
FAST_RETRY = RetryPolicy(initial_interval=0.01, max_interval=0.02, jitter=0.0)
STATS: collections.Counter[str] = collections.Counter()  # figures for docs/reliability.md


class Injector:
    """Numbers the await points it is shown; at point ``k`` it cancels ``target`` and yields once."""

    def __init__(self, k: int | None) -> None:
        self.k = k
        self.count = 0
        self.target: asyncio.Task[Any] | None = None
        self.hit: str | None = None
        self.points: list[str] = []

    async def point(self, where: str) -> None:
        self.now(where)
        await asyncio.sleep(0)  # an await: where the cancellation lands if this is the pass's task

    def now(self, where: str) -> None:
        """A point that does not yield: at point ``k`` the cancellation is requested and lands at the
        next await of whatever runs (a held write in flight: once it is done)."""
        self.count += 1
        self.points.append(where)
        if self.count == self.k:
            assert self.target is not None
            self.hit = where
            self.target.cancel()


class CancellingRepo:
    """Every coroutine method of the repo offers a point before and after delegating.

    ``held``: ``apply_step`` is held (:mod:`asyncflow._held`, the engine runs it inline) and offers a
    point before it and one while its write is in flight, none after (a held write awaits nothing
    once written)."""

    def __init__(self, inner: Any, injector: Injector, *, held: bool = False) -> None:
        self._inner = inner
        self._injector = injector
        self._held = held

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        if name == "apply_step" and self._held:
            assert is_held(attr)

            @holds_cancellation
            async def held(*args: Any, **kwargs: Any) -> Any:
                await self._injector.point("before repo.apply_step")
                write = attr(*args, **kwargs)
                self._injector.now("during repo.apply_step")
                return await write

            return held

        async def call(*args: Any, **kwargs: Any) -> Any:
            await self._injector.point(f"before repo.{name}")
            result = await attr(*args, **kwargs)
            await self._injector.point(f"after repo.{name}")
            return result

        return call


class CancellingLock:
    """The lock, with points before acquiring, once held, and after releasing."""

    def __init__(self, inner: LocalWorkflowLock, injector: Injector) -> None:
        self._inner = inner
        self._injector = injector

    @contextlib.asynccontextmanager
    async def hold(self, key: str, ttl: float) -> AsyncIterator[Any]:
        await self._injector.point("before lock acquire")
        async with self._inner.hold(key, ttl) as lease:
            await self._injector.point("lock held")
            yield lease
        await self._injector.point("after lock release")


async def run_cancelled_at(
    repo: CompletionCounter, journal: Journal, k: int | None, *, held: bool = False
) -> tuple[int, Injector]:
    """Create an instance and run passes until it completes or its pass is cancelled at point k."""
    plain = WorkflowService(
        repo, LocalWorkflowLock(), mixed_registry(journal), schedule=FAST, retry=FAST_RETRY
    )
    instance_id = (await plain.create_workflow(MIXED, f"k{k}")).id
    injector = Injector(k)

    def hook(node: str, phase: str, moment: str) -> Any:
        return injector.point(f"worker {node}.{phase} {moment}")

    lock = LocalWorkflowLock()
    svc = WorkflowService(
        CancellingRepo(repo, injector, held=held),  # type: ignore[arg-type]
        CancellingLock(lock, injector),  # type: ignore[arg-type]
        mixed_registry(journal, hook=hook),
        schedule=FAST,
        retry=FAST_RETRY,
    )
    for _ in range(20):  # the mixed workflow needs 2 passes
        # started on the next loop turn whatever the task factory (eager tasks would run before
        # the injector knows whom to cancel)
        task = asyncio.Task(svc.run_workflow(instance_id))
        injector.target = task
        try:
            status = (await task).status
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # the test itself is being cancelled
            assert injector.hit is not None, "cancelled without an injected cancellation"
            assert task.cancelled(), "the CancelledError propagated out of the pass"
            assert not lock.held_keys, f"the instance lock is still held after a cancel at {injector.hit}"
            return instance_id, injector
        assert injector.hit is None, f"the cancellation at {injector.hit} was swallowed"
        if status == "completed":
            return instance_id, injector
    raise AssertionError("the mixed workflow did not complete in 20 passes")


async def check_and_resume(
    repo: CompletionCounter, journal: Journal, instance_id: int, injector: Injector
) -> None:
    rows = {r.task_type: r for r in await repo.load_task_instances(instance_id)}
    where = injector.hit
    for node in MIXED_EDGES:
        row = rows.get(node)
        if row is not None and row.status in ("pending", "completed"):
            assert journal.done(instance_id, node, "run") >= 1, (
                f"{node} {row.status} but its run never finished"
            )
        if row is not None and row.status == "completed" and node in WITH_CHECK:
            assert journal.done(instance_id, node, "check") >= 1, f"{node} completed, check never finished"
    mark = len(journal.entries)
    done_before = {(n, p): journal.done(instance_id, n, p) for n in MIXED_EDGES for p in ("run", "check")}
    record = await repo.get_workflow_instance(instance_id)
    # a write in flight lands whole (shielded), so a cancel before the last one may find it completed
    assert record is not None and record.status in ("init", "running", "completed"), (where, record)

    fresh = WorkflowService(
        repo, LocalWorkflowLock(), mixed_registry(journal), schedule=FAST, retry=FAST_RETRY
    )
    driver = WorkflowDriver(fresh, concurrency=2, poll_interval=0.01)
    for _ in range(300):  # bounded; the instance is due at once or within the 20 ms back-off
        await driver.run_until_idle()
        if (await fresh.get_workflow_instance(instance_id)).status != "running":
            break
        await asyncio.sleep(0.005)
    final = await fresh.get_workflow_instance(instance_id)
    assert final.status == "completed", f"stuck after a cancel at {where}: {final.status}"
    after = {r.task_type: r for r in await repo.load_task_instances(instance_id)}
    assert set(after) == ALL_ROWS and all(r.status == "completed" for r in after.values()), where
    completions = {t: repo.completions[(instance_id, t)] for t in ALL_ROWS}
    assert completions == dict.fromkeys(ALL_ROWS, 1), (where, completions)
    _check_reexecutions(journal, instance_id, rows, mark, done_before, where)


def _check_reexecutions(
    journal: Journal,
    instance_id: int,
    rows: dict[str, TaskInstanceRecord],
    mark: int,
    done_before: dict[tuple[str, str], int],
    where: str | None,
) -> None:
    resumed = [e for e in journal.entries[mark:] if e[0] == instance_id]
    for node in MIXED_EDGES:
        status = rows[node].status if node in rows else None
        if status in ("pending", "completed"):
            assert (instance_id, node, "run", "start") not in resumed, f"{node} ran again ({where})"
        if status == "completed":
            assert (instance_id, node, "check", "start") not in resumed, f"{node} checked again ({where})"
        for phase in ("run", "check"):
            total = journal.done(instance_id, node, phase)
            assert total <= 2, (node, phase, total, where)
            if total == 2:  # re-executed: its first success was in flight (not stored) at the cancel
                assert done_before[(node, phase)] == 1, (node, phase, where)
                stored = status == "completed" or (phase == "run" and status == "pending")
                assert not stored, (node, phase, status, where)
                STATS["re-executed phases"] += 1


def _repo_for(backend: str, tmp_path: Any) -> Any:
    from asyncflow.store.memory import MemoryWorkflowRepo
    from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo

    if backend == "memory":
        return MemoryWorkflowRepo()
    return SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/cancel.db")


async def _sweep(inner: Any, label: str, *, held: bool = False) -> int:
    journal = Journal()
    repo = CompletionCounter(inner)
    _, dry = await run_cancelled_at(repo, journal, None, held=held)
    total = dry.count
    assert total >= 30, dry.points  # repo calls, lock points and worker points of two passes
    if held:
        assert any("during repo.apply_step" in point for point in dry.points), dry.points
    hits: collections.Counter[str] = collections.Counter()
    for k in range(1, total + 1):
        instance_id, injector = await run_cancelled_at(repo, journal, k, held=held)
        assert injector.hit is not None, f"point {k} of {total} was not reached"
        hits[next(kind for kind in ("repo", "lock", "worker") if kind in injector.hit)] += 1
        await check_and_resume(repo, journal, instance_id, injector)
    STATS[f"{label} cancellation points"] += total
    assert hits["repo"] and hits["lock"] and hits["worker"], hits
    return total


@pytest.mark.parametrize("held", [False, True], ids=["shielded steps", "held steps"])
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_cancellation_at_every_await_point_of_a_run(backend: str, held: bool, tmp_path: Any) -> None:
    """``held``: the steps run inline (the repos' own path) and a cancellation also lands while a
    step's write is in flight; else every step runs in a shielded task (a wrapped repo's path)."""
    inner = _repo_for(backend, tmp_path)
    await inner.create_schema()
    try:
        total = await _sweep(inner, backend + (" held" if held else ""), held=held)
    finally:
        await inner.aclose()
    assert total > 0


@pytest.mark.postgres
@pytest.mark.parametrize("held", [False, True], ids=["shielded steps", "held steps"])
async def test_cancellation_at_every_await_point_of_a_run_postgres(pg_engine: Any, held: bool) -> None:
    from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo

    inner = SQLAlchemyWorkflowRepo(pg_engine)
    await inner.create_schema()
    assert await _sweep(inner, "postgres" + (" held" if held else ""), held=held) > 0
