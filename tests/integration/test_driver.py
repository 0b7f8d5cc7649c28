"""WorkflowDriver: throughput to idle, the concurrency cap, polling, wake-ups, back-off, lock conflicts,
errors, shutdown and idle cost, on the memory repo, a SQLite file and PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event, text

from asyncflow.clock import FakeClock
from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.driver import DriverConfig, WorkflowDriver
from asyncflow.engine.service import WorkflowService, lock_key
from asyncflow.errors import InvalidStateError, ParamInvalidError, TaskFailedTerminate, TaskNotReady
from asyncflow.lock.local import LocalLease, LocalWorkflowLock
from asyncflow.records import (
    InstanceFields,
    InstanceWhere,
    NewWorkflowInstance,
    NodeExternalEvent,
    QueryWorkflowInstanceParams,
    Step,
)
from asyncflow.registry import Registry
from asyncflow.retry import RetryPolicy
from asyncflow.status import NODE_EVENT
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.worker import NormalTaskWorker, current_node
from tests.conftest import isolated_pg_engine

DAG = {"A": ["B", "C"], "B": [], "C": []}  # the 3-node DAG: A, then B and C in parallel

CAP_SQLITE = 2  # SQLite has one writer at a time: more passes at once only queue for it
LINEAR = {"A": ["B"], "B": ["C"], "C": []}
_BOUND = 2000  # polls of 10 ms at most while waiting for the driver (a bound, not a timing)

Worker = Callable[[JSONContext], Any]


class Runs:
    """Counts ``run`` calls per (instance, node) and the most simultaneous ones."""

    def __init__(self) -> None:
        self.count: collections.Counter[tuple[int, str]] = collections.Counter()
        self.active = 0
        self.peak = 0

    def of(self, node: str) -> int:
        return sum(n for (_, task), n in self.count.items() if task == node)


def registry_for(
    workflow_type: str,
    edges: dict[str, list[str]],
    runs: Runs,
    *,
    run: Worker | None = None,
    checks: dict[str, Worker] | None = None,
) -> Registry:
    """``workflow_type`` over ``edges``; every node counts its runs, then awaits ``run(ctx)`` if given."""
    registry = Registry()
    nodes = tuple(NodeConfig(id=node, name=node, next_nodes=tuple(nxt)) for node, nxt in edges.items())
    registry.load_workflow_config(WorkflowConfig(id=workflow_type, name=workflow_type, nodes=nodes))

    async def counted(ctx: JSONContext) -> None:
        info = current_node()
        runs.count[(info.instance_id, info.task_type)] += 1
        runs.active += 1
        runs.peak = max(runs.peak, runs.active)
        try:
            if run is not None:
                await run(ctx)
        finally:
            runs.active -= 1

    for node in edges:
        check = (checks or {}).get(node)
        registry.register_workflow_task(workflow_type, node, NormalTaskWorker(run=counted, wait_check=check))
    return registry


async def create_many(service: WorkflowService, workflow_type: str, n: int) -> list[int]:
    news = [
        NewWorkflowInstance(workflow_type=workflow_type, business_id=f"b{i}", workflow_context={})
        for i in range(n)
    ]
    return await service.repo.create_workflow_instances(news)


async def count(service: WorkflowService, status: str) -> int:
    return await service.count_workflow_instances(QueryWorkflowInstanceParams(status_in=(status,)))


async def eventually(predicate: Callable[[], Any]) -> None:
    """Yield until ``predicate()`` (awaited if needed) is true; fail after a generous bound."""
    for _ in range(_BOUND):
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.01)
    pytest.fail("the driver did not get there")


def driver_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("asyncflow-driver")]


def is_sqlite(repo: Any) -> bool:
    return isinstance(repo, SQLAlchemyWorkflowRepo) and repo.engine.dialect.name == "sqlite"


# ---------------------------------------------------------------- throughput and the cap


async def test_run_until_idle_completes_1000_instances_of_a_3_node_dag(engine_repo: Any) -> None:
    runs = Runs()
    service = WorkflowService(engine_repo, LocalWorkflowLock(), registry_for("dag", DAG, runs))
    ids = await create_many(service, "dag", 1000)
    driver = WorkflowDriver(
        service, concurrency=CAP_SQLITE if is_sqlite(engine_repo) else 16, poll_interval=0.05
    )
    await driver.run_until_idle()
    assert await count(service, "completed") == 1000
    assert runs.count == {(i, node): 1 for i in ids for node in DAG}
    stats = driver.stats
    assert (stats.passes, stats.completed, stats.failed, stats.errors, stats.lock_skips) == (
        1000,
        1000,
        0,
        0,
        0,
    )
    assert stats.claimed == 1000
    assert driver.in_flight == 0 and not driver.running
    assert driver_tasks() == []


@pytest.mark.parametrize("cap", [1, 5])
async def test_simultaneous_runs_never_exceed_concurrency(cap: int, tmp_path: Any) -> None:
    runs = Runs()

    async def slow(ctx: JSONContext) -> None:
        # long enough that the cap fills even while each pass's start waits for SQLite's one writer
        await asyncio.sleep(0.05)

    repo = SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/cap.db")
    await repo.create_schema()
    try:
        service = WorkflowService(repo, LocalWorkflowLock(), registry_for("lin", LINEAR, runs, run=slow))
        await create_many(service, "lin", 30)
        driver = WorkflowDriver(service, concurrency=cap, poll_interval=0.05, batch_size=64)
        await driver.run_until_idle()
        assert await count(service, "completed") == 30
    finally:
        await repo.aclose()
    assert runs.peak == cap  # reached, never exceeded (a linear workflow runs one node per pass)


async def test_concurrency_cap_holds_with_parallel_branches_and_memory_repo() -> None:
    runs = Runs()

    async def slow(ctx: JSONContext) -> None:
        await asyncio.sleep(0.001)

    registry = registry_for("dag", DAG, runs, run=slow)
    service = WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry, branch_concurrency=1)
    await create_many(service, "dag", 200)
    driver = WorkflowDriver(service, concurrency=7, poll_interval=0.05)
    await driver.run_until_idle()
    assert await count(service, "completed") == 200
    assert runs.peak == 7


# ---------------------------------------------------------------- polling, wake-ups, back-off


async def test_not_ready_check_is_polled_at_the_poll_interval_not_in_a_busy_loop() -> None:
    clock = FakeClock()
    checked: list[float] = []

    async def never_ready(ctx: JSONContext) -> None:
        checked.append(clock.time())
        raise TaskNotReady("not yet")

    registry = registry_for("wait", {"A": []}, Runs(), checks={"A": never_ready})
    service = WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry, clock=clock)
    await service.create_workflow("wait", "b")
    driver = WorkflowDriver(service, concurrency=4, poll_interval=2.0)
    async with driver:
        start = clock.time()
        await eventually(lambda: clock.time() >= start + 60.0)  # fake time moves as the driver sleeps
        window = clock.time() - start
        before_stop = list(checked)
    gaps = [later - earlier for earlier, later in itertools.pairwise(before_stop)]
    assert len(before_stop) >= 3
    assert min(gaps) >= 2.0  # never checked again before the poll interval passed
    assert len(before_stop) <= window / 2.0 + 1
    assert driver.stats.passes == len(checked)
    assert driver.stats.idle_polls + driver.stats.claims <= 3 * (window / 2.0 + 2)  # no busy loop


async def test_an_event_finishes_the_instance_without_waiting_out_the_back_off(engine_repo: Any) -> None:
    checks: list[bool] = []

    async def approved(ctx: JSONContext) -> None:
        _, ok = ctx.get(NODE_EVENT, "event_content")
        checks.append(ok)
        if not ok:
            raise RuntimeError("not approved yet")  # a retryable failure: back-off of 60 s

    registry = registry_for("ev", {"A": [], "B": []}, Runs(), checks={"A": approved})
    retry = RetryPolicy(initial_interval=60.0, jitter=0.0)
    service = WorkflowService(engine_repo, LocalWorkflowLock(), registry, retry=retry)
    driver = WorkflowDriver(service, concurrency=4, poll_interval=60.0)
    async with driver:
        instance = await service.create_workflow("ev", "b")  # wakes the driver at once
        await eventually(lambda: len(checks) == 1)

        async def backing_off() -> bool:  # for a minute, once the pass has written its outcome
            record = await engine_repo.get_workflow_instance(instance.id)
            return bool(record.next_run_at >= service.clock.time() * 1000 + 50_000)

        await eventually(backing_off)
        await service.add_node_external_event(instance.id, "A", NodeExternalEvent(1, {"ok": True}), timeout=5)
        await eventually(lambda: count(service, "completed"))
    assert checks == [False, True]
    assert driver.stats.completed == 1


async def test_retry_back_off_grows_and_caps() -> None:
    clock = FakeClock()

    async def failing(ctx: JSONContext) -> None:
        raise RuntimeError("flaky")

    registry = registry_for("flaky", {"A": []}, Runs(), run=failing)
    retry = RetryPolicy(initial_interval=1.0, max_interval=8.0, jitter=0.0)
    service = WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry, retry=retry, clock=clock)
    instance = await service.create_workflow("flaky", "b")
    driver = WorkflowDriver(service, concurrency=2, poll_interval=1.0)
    delays = []
    for _ in range(6):
        await driver.run_until_idle()  # one pass, then nothing is due until the back-off ends
        record = await service.repo.get_workflow_instance(instance.id)
        delay = record.next_run_at / 1000 - clock.time()
        delays.append(round(delay, 3))
        clock.advance(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert driver.stats.passes == 6 and driver.stats.errors == 0


async def test_in_process_create_wakes_an_idle_driver_at_once(engine_repo: Any) -> None:
    runs = Runs()
    service = WorkflowService(engine_repo, LocalWorkflowLock(), registry_for("lin", LINEAR, runs))
    driver = WorkflowDriver(service, concurrency=4, poll_interval=3600.0)
    async with driver:
        await eventually(lambda: driver.stats.idle_polls >= 1)  # asleep for an hour
        for i in range(3):
            await service.create_workflow("lin", f"b{i}")
        await eventually(lambda: driver.stats.completed == 3)
    assert runs.of("C") == 3


async def test_workflow_types_limits_what_the_driver_runs() -> None:
    runs = Runs()
    registry = registry_for("mine", {"A": []}, runs)
    service = WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry)
    await create_many(service, "mine", 3)
    await create_many(service, "theirs", 2)  # no definition here: would fail if claimed
    driver = WorkflowDriver(service, concurrency=4, workflow_types=["mine"])
    await driver.run_until_idle()
    assert driver.stats.completed == 3 and driver.stats.errors == 0
    assert await count(service, "init") == 2


# ---------------------------------------------------------------- errors and lock conflicts


async def test_failing_instances_do_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()

    async def terminate_odd(ctx: JSONContext) -> None:
        if current_node().business_id in ("b1", "b3"):
            raise TaskFailedTerminate("refused")

    registry = registry_for("lin", LINEAR, Runs(), run=terminate_odd)
    service = WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry, clock=clock)
    await create_many(service, "lin", 6)
    (ghost,) = await create_many(service, "ghost", 1)  # its definition is unknown: every pass raises
    driver = WorkflowDriver(
        service, concurrency=3, error_backoff_base=1.0, error_backoff_max=4.0, error_backoff_jitter=0.0
    )
    delays = []
    with caplog.at_level(logging.WARNING, logger="asyncflow.driver"):
        for _ in range(4):
            await driver.run_until_idle()
            record = await service.repo.get_workflow_instance(ghost)
            delays.append(record.next_run_at / 1000 - clock.time())
            clock.advance(delays[-1])
    assert (driver.stats.completed, driver.stats.failed, driver.stats.errors) == (4, 2, 4)
    assert delays == [1.0, 2.0, 4.0, 4.0]  # the driver's own back-off for passes that raise
    errors = [r for r in caplog.records if r.name == "asyncflow.driver" and r.levelno == logging.ERROR]
    assert len(errors) == 4 and all(f"instance {ghost}" in r.getMessage() for r in errors)  # serious


async def test_a_store_error_is_logged_as_a_warning_and_backed_off(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    repo = SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/broken.db")
    await repo.create_schema()
    try:
        service = WorkflowService(repo, LocalWorkflowLock(), registry_for("lin", LINEAR, Runs()))
        (instance_id,) = await create_many(service, "lin", 1)
        async with repo.engine.begin() as conn:  # a real database failure, in the pass's first step
            await conn.exec_driver_sql("ALTER TABLE task_instance RENAME COLUMN node_context TO gone")
        driver = WorkflowDriver(service, concurrency=2, error_backoff_jitter=0.0)
        with caplog.at_level(logging.WARNING, logger="asyncflow.driver"):
            await driver.run_until_idle()
        record = await repo.get_workflow_instance(instance_id)
    finally:
        await repo.aclose()
    assert driver.stats.errors == 1 and driver.stats.passes == 0
    (logged,) = [r for r in caplog.records if r.name == "asyncflow.driver"]
    assert logged.levelno == logging.WARNING
    assert record.status == "init" and record.next_run_at > service.clock.time() * 1000 + 500


class ClaimsFailFirst:
    """A repo whose first claims raise something other than a StoreError (a bug, a driver quirk)."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def claim_due_instances(self, **kwargs: Any) -> list[int]:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("unexpected claim failure")
        result: list[int] = await self.inner.claim_due_instances(**kwargs)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_an_unexpected_claim_error_is_logged_with_its_traceback_and_the_driver_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs = Runs()
    repo = ClaimsFailFirst(MemoryWorkflowRepo(), failures=2)
    service = WorkflowService(repo, LocalWorkflowLock(), registry_for("lin", LINEAR, runs))  # type: ignore[arg-type]
    await create_many(service, "lin", 3)
    driver = WorkflowDriver(service, concurrency=2, poll_interval=0.01, error_backoff_base=0.01)
    with caplog.at_level(logging.WARNING, logger="asyncflow.driver"):
        async with asyncio.timeout(10), driver:  # run_forever in the background
            while driver.stats.completed < 3:
                await asyncio.sleep(0.01)
    assert driver.stats.completed == 3 and driver.stats.errors == 2
    logged = [r for r in caplog.records if "claiming due instances failed" in r.getMessage()]
    assert len(logged) == 2 and all(r.levelno == logging.ERROR and r.exc_info for r in logged)
    assert "unexpected claim failure" in logged[0].getMessage()


class SlowNextDue:
    """A repo whose reads of the next due time, from the second on, last until just past that time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads = 0
        self.outlasted = 0

    async def next_due_at(self, workflow_types: Any = None) -> int | None:
        due: int | None = await self.inner.next_due_at(workflow_types)
        self.reads += 1
        if due is not None and self.reads >= 2 and due / 1000 > time.time():
            self.outlasted += 1
            await asyncio.sleep(due / 1000 - time.time() + 0.02)
        return due

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_due_time_that_passes_while_the_driver_reads_it_is_still_claimed() -> None:
    """Regression: the due time came during the read of the next due time (nothing running, no wake
    to come), and the driver used to wait for a wake-up forever instead of claiming."""
    runs = Runs()
    repo = SlowNextDue(MemoryWorkflowRepo())
    service = WorkflowService(repo, LocalWorkflowLock(), registry_for("lin", LINEAR, runs))  # type: ignore[arg-type]
    (instance_id,) = await create_many(service, "lin", 1)
    due = int(time.time() * 1000) + 1000  # a second read comes ~50 ms after the first, long before
    await repo.update_workflow_instances(InstanceWhere(ids=(instance_id,)), InstanceFields(next_run_at=due))
    driver = WorkflowDriver(service, concurrency=4, poll_interval=0.05)
    async with asyncio.timeout(10), driver:  # run_forever: only a claim can start the pass
        await eventually(lambda: driver.stats.completed == 1)
    assert repo.outlasted >= 1, "no read of the due time outlasted it: the race was not set up"
    assert runs.of("C") == 1 and driver.stats.errors == 0


class SlowRelease(LocalWorkflowLock):
    """A lock whose release of ``target``'s key returns ``delay`` s after the key is free (as the reply
    of a Redis or PostgreSQL release does)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.target: int | None = None
        self.releasing = asyncio.Event()

    async def _release(self, lease: LocalLease) -> None:
        await super()._release(lease)
        if self.target is not None and lease.key == lock_key(self.target):
            self.target = None
            self.releasing.set()
            await asyncio.sleep(self.delay)


async def test_an_event_stored_while_the_pass_releases_its_lock_runs_without_waiting_out_the_lease() -> None:
    """Regression: the claim returned an instance whose pass was still ending and leased it, but the
    driver skipped it, so the event's wake-up waited out the whole claim lease (30 s here)."""
    checks: list[bool] = []

    async def approved(ctx: JSONContext) -> None:
        _, ok = ctx.get(NODE_EVENT, "event_content")
        checks.append(bool(ok))
        if not ok:
            raise TaskNotReady("waiting for approval")

    lock = SlowRelease(delay=0.2)
    registry = registry_for("ev", {"A": [], "B": []}, Runs(), checks={"A": approved})
    service = WorkflowService(MemoryWorkflowRepo(), lock, registry, lock_ttl=30.0)
    driver = WorkflowDriver(service, concurrency=4, poll_interval=60.0)
    async with asyncio.timeout(10), driver:
        instance = await service.create_workflow("ev", "b")
        lock.target = instance.id
        await lock.releasing.wait()  # the first pass wrote "not ready, look again in 60 s" and let go
        await service.add_node_external_event(instance.id, "A", NodeExternalEvent(1, {"ok": True}))
        started = time.monotonic()
        await eventually(lambda: count(service, "completed"))
        waited = time.monotonic() - started
    assert checks == [False, True]
    assert waited < 5.0, f"the event waited {waited:.1f} s: the claim's lease, not the old pass"


async def test_due_work_gets_a_free_slot_below_the_refill_size_within_a_poll_interval() -> None:
    """cap 16 (claims refill 2 slots at a time): 15 passes that do not end; a new instance still runs."""
    gate = asyncio.Event()
    runs = Runs()

    async def work(ctx: JSONContext) -> None:
        if current_node().instance_id in long_ids:
            await gate.wait()

    class SlowLastWrite(MemoryWorkflowRepo):
        """The new pass's writes after its last worker take a while, as under load (the old version of
        this test asserted in that gap and failed 16 == 15 on a busy machine)."""

        async def apply_step(self, step: Step) -> Any:
            if step.instance_id == new_id.get("id") and runs.count[(step.instance_id, "C")]:
                await asyncio.sleep(0.2)
            return await super().apply_step(step)

    new_id: dict[str, int] = {}
    service = WorkflowService(
        SlowLastWrite(), LocalWorkflowLock(), registry_for("lin", LINEAR, runs, run=work)
    )
    long_ids = set(await create_many(service, "lin", 15))
    driver = WorkflowDriver(service, concurrency=16, poll_interval=0.05)
    async with asyncio.timeout(10), driver:
        try:
            await eventually(lambda: driver.in_flight == 15)
            new = await service.create_workflow("lin", "new")
            new_id["id"] = new.id
            # the new pass ran its last node and then left its slot (its worker ending is not the pass
            # ending: under load the pass may still be writing when C's count moves, so wait for both)
            await eventually(lambda: runs.count[(new.id, "C")] == 1 and driver.in_flight == 15)
            assert (await service.get_workflow_instance(new.id)).status == "completed"
            assert all(runs.count[(i, "C")] == 0 for i in long_ids)  # the long passes never ended
        finally:
            gate.set()


@pytest.mark.parametrize("fake", [False, True], ids=["system clock", "fake clock"])
async def test_a_pass_waiting_for_another_instance_that_becomes_due_finishes(fake: bool) -> None:
    """One pass waits for another instance's worker; that instance becomes due while the pass runs (with
    a fake clock: moved past its due time). Regression for the fake clock: the driver waited for the
    running pass to end before it looked at the clock again."""
    clock = FakeClock() if fake else None
    gate = asyncio.Event()

    async def work(ctx: JSONContext) -> None:
        if current_node().instance_id == waiting_id:
            await gate.wait()
        else:
            gate.set()

    registry = registry_for("one", {"A": []}, Runs(), run=work)
    service = WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry, clock=clock)
    waiting_id, other = await create_many(service, "one", 2)
    later = int(service.clock.time() * 1000) + 300
    await service.repo.update_workflow_instances(
        InstanceWhere(ids=(other,)), InstanceFields(next_run_at=later)
    )
    driver = WorkflowDriver(service, concurrency=4, poll_interval=0.05)
    async with asyncio.timeout(10), driver:
        await eventually(lambda: driver.in_flight == 1)
        if clock is not None:
            clock.advance(1.0)
        try:
            await eventually(lambda: driver.stats.completed == 2)
        finally:
            gate.set()  # a failed run still stops at once
    assert await count(service, "completed") == 2
    assert driver.stats.errors == 0


async def test_run_until_idle_raises_an_unexpected_claim_error() -> None:
    repo = ClaimsFailFirst(MemoryWorkflowRepo(), failures=1)
    service = WorkflowService(repo, LocalWorkflowLock(), registry_for("lin", LINEAR, Runs()))  # type: ignore[arg-type]
    await create_many(service, "lin", 1)
    driver = WorkflowDriver(service, concurrency=2)
    with pytest.raises(RuntimeError, match="unexpected claim failure"):
        await driver.run_until_idle()
    assert not driver.running
    await driver.run_until_idle()  # usable again
    assert driver.stats.completed == 1


async def test_a_lock_conflict_is_skipped_quietly_then_retried(
    engine_repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    runs = Runs()
    service = WorkflowService(engine_repo, LocalWorkflowLock(), registry_for("lin", LINEAR, runs))
    ids = await create_many(service, "lin", 5)
    driver = WorkflowDriver(service, concurrency=8, poll_interval=0.05)
    with caplog.at_level(logging.DEBUG, logger="asyncflow.driver"):
        async with service.lock.hold(lock_key(ids[0]), 30.0):  # e.g. an event being stored right now
            idle = asyncio.create_task(driver.run_until_idle())
            await eventually(lambda: driver.stats.lock_skips >= 1)
        await idle
    assert await count(service, "completed") == 5  # the held one too, once its holder let go
    assert runs.count[(ids[0], "A")] == 1
    assert driver.stats.errors == 0
    assert not [r for r in caplog.records if r.name == "asyncflow.driver" and r.levelno >= logging.WARNING]


async def test_an_instance_held_elsewhere_is_left_to_its_holder() -> None:
    clock = FakeClock()
    service = WorkflowService(
        MemoryWorkflowRepo(), LocalWorkflowLock(), registry_for("lin", LINEAR, Runs()), clock=clock
    )
    held, _ = await create_many(service, "lin", 2)
    driver = WorkflowDriver(service, concurrency=4, poll_interval=0.05, claim_lease=5.0)
    async with service.lock.hold(lock_key(held), 30.0):  # a long pass of another runner
        await driver.run_until_idle()  # re-tries briefly, then returns: the holder owns it
        skips = driver.stats.lock_skips
    record = await service.repo.get_workflow_instance(held)
    assert record.status == "init" and driver.stats.completed == 1 and driver.stats.errors == 0
    assert 1 <= skips <= 9
    clock.advance(5.0)  # the claim lease ran out: any driver may take it
    await driver.run_until_idle()
    assert await count(service, "completed") == 2


# ---------------------------------------------------------------- shutdown


async def test_stop_during_long_workers_then_a_new_driver_completes_everything(engine_repo: Any) -> None:
    runs = Runs()
    hang = {"on": True}
    started: list[int] = []

    async def long_worker(ctx: JSONContext) -> None:
        if current_node().task_type == "A" and hang["on"]:
            started.append(current_node().instance_id)
            await asyncio.Event().wait()  # runs until cancelled

    service = WorkflowService(
        engine_repo, LocalWorkflowLock(), registry_for("lin", LINEAR, runs, run=long_worker)
    )
    ids = await create_many(service, "lin", 6)
    driver = WorkflowDriver(service, concurrency=6, poll_interval=0.05, stop_deadline=2.0)
    forever = asyncio.create_task(driver.run_forever())
    await eventually(lambda: len(started) == 6)
    async with asyncio.timeout(0.2 + 2.0 + 5.0):  # grace + deadline, with room for a slow machine
        await driver.stop(grace=0.2)
    await forever
    assert driver.stats.cancelled == 6 and driver.in_flight == 0 and not driver.running
    assert driver_tasks() == []
    now_ms = service.clock.time() * 1000
    for instance_id in ids:  # resumable at once: not failed, and due now rather than after the lease
        record = await engine_repo.get_workflow_instance(instance_id)
        assert record.status in ("init", "running") and record.next_run_at <= now_ms
    hang["on"] = False
    successor = WorkflowDriver(service, concurrency=6, poll_interval=0.05)
    await successor.run_until_idle()
    assert await count(service, "completed") == 6
    assert [runs.count[(i, "A")] for i in ids] == [2] * 6  # cancelled once, then run again
    assert [runs.count[(i, "C")] for i in ids] == [1] * 6


async def test_a_second_stop_with_no_grace_cancels_the_running_passes_at_once(engine_repo: Any) -> None:
    """A second Ctrl-C: ``stop(grace=0)`` during a ``stop(grace=60)`` cancels the passes now; their
    instances stay resumable and a later driver completes them."""
    runs = Runs()
    hang = {"on": True}
    started: list[int] = []

    async def long_worker(ctx: JSONContext) -> None:
        if current_node().task_type == "A" and hang["on"]:
            started.append(current_node().instance_id)
            await asyncio.Event().wait()  # runs until cancelled

    service = WorkflowService(
        engine_repo, LocalWorkflowLock(), registry_for("lin", LINEAR, runs, run=long_worker)
    )
    ids = await create_many(service, "lin", 3)
    driver = WorkflowDriver(service, concurrency=3, poll_interval=0.05, stop_deadline=2.0)
    forever = asyncio.create_task(driver.run_forever())
    await eventually(lambda: len(started) == 3)
    patient = asyncio.create_task(driver.stop(grace=60))
    await asyncio.sleep(0.3)  # the first stop is waiting out its grace (a minute)
    assert not patient.done() and driver.in_flight == 3
    async with asyncio.timeout(2.0 + 5.0):  # the cancel deadline, with room for a slow machine
        await driver.stop(grace=0)
        await patient
    await forever
    assert driver.stats.cancelled == 3 and not driver.running and driver_tasks() == []
    hang["on"] = False
    await WorkflowDriver(service, concurrency=3, poll_interval=0.05).run_until_idle()
    assert await count(service, "completed") == 3
    assert [runs.count[(i, "C")] for i in ids] == [1] * 3


def gate_claims(repo: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the repo's first claim that returns instances after it took them (its lease is written),
    until the second event is set: a race placed between a claim and the start of its passes."""
    claimed, gate = asyncio.Event(), asyncio.Event()
    real = repo.claim_due_instances

    async def claim(**kwargs: Any) -> list[int]:
        ids = await real(**kwargs)
        if ids and not gate.is_set():
            claimed.set()
            await gate.wait()
        return ids

    repo.claim_due_instances = claim
    return claimed, gate


async def test_stop_with_no_grace_during_a_claim_releases_the_claimed_instances(engine_repo: Any) -> None:
    """Regression: ``stop(grace=0)`` that came while a claim ran cancelled the passes it spawned
    before they began, so their own clean-up never ran: they stayed counted in flight and their
    instances were not released, hidden from every driver until the claim's lease (30 s) ran out."""
    runs = Runs()
    service = WorkflowService(engine_repo, LocalWorkflowLock(), registry_for("lin", LINEAR, runs))
    ids = await create_many(service, "lin", 3)
    claimed, gate = gate_claims(engine_repo)
    driver = WorkflowDriver(service, concurrency=4, poll_interval=0.05, stop_deadline=2.0)
    forever = asyncio.create_task(driver.run_forever())
    async with asyncio.timeout(10):
        await claimed.wait()  # the three instances are leased for 30 s; their passes not spawned yet
        stopping = asyncio.create_task(driver.stop(grace=0))
        await asyncio.sleep(0)  # stop() asked the driver to stop
        gate.set()
        await stopping
        await forever
    assert driver.in_flight == 0 and not driver.running and driver_tasks() == []
    now_ms = service.clock.time() * 1000
    for instance_id in ids:  # released: due now, not after the claim's lease
        record = await engine_repo.get_workflow_instance(instance_id)
        if record.status == "completed":  # an eager task factory ran the pass at once, to its end
            continue
        assert record.status == "init" and record.next_run_at <= now_ms
    await WorkflowDriver(service, concurrency=4, poll_interval=0.05).run_until_idle()
    assert await count(service, "completed") == 3 and runs.of("C") == 3


async def test_stop_returns_even_if_a_worker_ignores_cancellation(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def stubborn(ctx: JSONContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # swallows the cancellation until the test lets go

    service = WorkflowService(
        MemoryWorkflowRepo(), LocalWorkflowLock(), registry_for("s", {"A": []}, Runs(), run=stubborn)
    )
    await service.create_workflow("s", "b")
    driver = WorkflowDriver(service, concurrency=2, stop_deadline=0.05)
    forever = asyncio.create_task(driver.run_forever())
    await eventually(lambda: driver.in_flight == 1)
    with caplog.at_level(logging.ERROR, logger="asyncflow.driver"):
        await driver.stop(grace=0.05)  # returns although the pass is still running
    assert driver.in_flight == 1
    assert any("ignore" in r.getMessage() for r in caplog.records)
    release.set()
    await forever
    assert driver_tasks() == [] and not driver.running


async def test_stop_of_an_idle_driver_and_misuse() -> None:
    service = WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry_for("x", {"A": []}, Runs()))
    driver = WorkflowDriver(service, poll_interval=3600.0)
    await driver.stop()  # not running: nothing to do
    await driver.run_until_idle()  # nothing due: returns at once
    async with driver:
        assert driver.running
        with pytest.raises(InvalidStateError):
            await driver.run_until_idle()
        with pytest.raises(InvalidStateError):
            await driver.__aenter__()
    assert not driver.running and driver_tasks() == []
    async with driver:  # reusable after a stop
        await service.create_workflow("x", "b")
        await eventually(lambda: driver.stats.completed == 1)
    with pytest.raises(ParamInvalidError):
        await driver.stop(grace=-1)
    with pytest.raises(ParamInvalidError):
        WorkflowDriver(service, concurrency=0)
    with pytest.raises(ParamInvalidError):
        WorkflowDriver(service, no_such_option=1)
    with pytest.raises(ParamInvalidError):
        WorkflowDriver(object())  # type: ignore[arg-type]
    merged = WorkflowDriver(service, config=DriverConfig(concurrency=3, poll_interval=0.5), batch_size=2)
    assert (merged.config.concurrency, merged.config.poll_interval, merged.config.batch_size) == (3, 0.5, 2)


# ---------------------------------------------------------------- idle cost and PostgreSQL wake-ups


class StatementCounter:
    def __init__(self, engine: Any) -> None:
        self.count = 0
        self._engine = engine.sync_engine
        event.listen(self._engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        self.count += 1

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._seen)


async def _idle_statements(
    repo: SQLAlchemyWorkflowRepo, *, poll: float, window: float
) -> tuple[int, WorkflowDriver]:
    service = WorkflowService(repo, LocalWorkflowLock(), registry_for("x", {"A": []}, Runs()))
    driver = WorkflowDriver(service, concurrency=8, poll_interval=poll)
    counter = StatementCounter(repo.engine)
    try:
        async with driver:
            await eventually(lambda: driver.stats.idle_polls >= 1 and (driver.listening or is_sqlite(repo)))
            counter.count = 0
            await asyncio.sleep(window)
            seen = counter.count
    finally:
        counter.close()
    return seen, driver


async def test_an_idle_driver_queries_at_most_once_per_poll_interval_sqlite(tmp_path: Any) -> None:
    repo = SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/idle.db")
    await repo.create_schema()
    try:
        seen, driver = await _idle_statements(repo, poll=0.1, window=1.0)
    finally:
        await repo.aclose()
    assert 1 <= seen <= 1.0 / 0.1 + 2
    assert driver.stats.claims <= 2  # idle: it reads the next due time, it does not claim


@pytest.mark.postgres
async def test_an_idle_driver_queries_at_most_once_per_poll_interval_postgres(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        seen, driver = await _idle_statements(repo, poll=0.1, window=1.0)
    assert 1 <= seen <= 1.0 / 0.1 + 2
    assert driver.stats.claims <= 3


@pytest.mark.postgres
async def test_notify_wakes_the_driver_when_another_process_makes_work_due(postgres_url: str) -> None:
    runs = Runs()
    async with isolated_pg_engine(postgres_url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        registry = registry_for("lin", LINEAR, runs)
        service = WorkflowService(repo, LocalWorkflowLock(), registry)
        driver = WorkflowDriver(service, concurrency=4, poll_interval=3600.0)  # would sleep for an hour
        # "another process": its own engine and service, so no in-process wake-up reaches the driver
        other_engine = engine.execution_options()
        other = WorkflowService(SQLAlchemyWorkflowRepo(other_engine), LocalWorkflowLock(), registry)
        async with driver:
            await eventually(lambda: driver.listening)
            await eventually(lambda: driver.stats.idle_polls >= 1)
            for i in range(3):
                await other.create_workflow("lin", f"b{i}")
            await eventually(lambda: driver.stats.completed == 3)
            async with engine.connect() as conn:
                triggers = (
                    await conn.exec_driver_sql(
                        "SELECT tgname FROM pg_trigger WHERE tgname LIKE 'asyncflow%' "
                        "AND tgrelid = 'workflow_instance'::regclass"
                    )
                ).all()
        # a repo on an execution_options() view is not told of its root engine's dispose(): closed
        # here, its kept connection is not left to an idle release the test's event loop outlives
        await other.repo.aclose()
        await repo.aclose()
    assert driver.stats.notifications >= 1
    assert sorted(t[0] for t in triggers) == [
        "asyncflow_delete_tasks",  # migration 11: deletes the node rows of deleted instances
        "asyncflow_due_notify",
        "asyncflow_due_notify_insert",
        "asyncflow_finished_notify",
    ]
    assert runs.of("C") == 3


@pytest.mark.postgres
async def test_a_lost_listen_connection_falls_back_to_polling_and_listens_again(postgres_url: str) -> None:
    runs = Runs()
    async with isolated_pg_engine(postgres_url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        registry = registry_for("lin", LINEAR, runs)
        service = WorkflowService(repo, LocalWorkflowLock(), registry)
        other = WorkflowService(
            SQLAlchemyWorkflowRepo(engine.execution_options()), LocalWorkflowLock(), registry
        )
        driver = WorkflowDriver(service, concurrency=4, poll_interval=3600.0)
        async with driver:
            await eventually(lambda: driver.listening)
            notifier = driver._notifier
            assert notifier is not None and notifier.server_pid is not None
            first = notifier.server_pid
            async with engine.connect() as conn:  # the server drops the LISTEN connection
                await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
            await eventually(lambda: notifier.server_pid != first and driver.listening)  # back, retried
            await other.create_workflow("lin", "b")
            await eventually(lambda: driver.stats.completed == 1)
        await other.repo.aclose()  # see the test above
        await repo.aclose()
    assert runs.of("C") == 1
