"""WorkflowDriver claiming ahead: held instances start in claim order as slots free, are released when
the passes are stuck (another driver then runs them), when the driver stops and before half their claim
lease, and are not released in a slow moment (a stalled database, a held-up event loop); none is lost
and none runs twice. On the memory repo, a SQLite file and PostgreSQL where the scenario allows."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from asyncflow.clock import FakeClock
from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import Step
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.worker import current_node
from tests.integration.test_driver import (
    CAP_SQLITE,
    Runs,
    count,
    create_many,
    driver_tasks,
    eventually,
    is_sqlite,
    registry_for,
)

ONE: dict[str, list[str]] = {"A": []}


def spy_spawns(driver: WorkflowDriver) -> list[int]:
    """The instances whose passes the driver starts, in the order it starts them."""
    started: list[int] = []
    real = driver._spawn

    def spawn(instance_id: int, lease_until: int, attempt: int) -> None:
        started.append(instance_id)
        real(instance_id, lease_until, attempt)

    driver._spawn = spawn  # type: ignore[method-assign]
    return started


def spy_releases(driver: WorkflowDriver) -> list[tuple[str, list[int]]]:
    """What the driver releases (made due again for any driver), and why."""
    released: list[tuple[str, list[int]]] = []
    real = driver._release

    async def release(ids: Any, what: str) -> None:
        released.append((what, sorted(ids)))
        await real(ids, what)

    driver._release = release  # type: ignore[method-assign]
    return released


def held(driver: WorkflowDriver) -> list[int]:
    return [instance_id for instance_id, _ in driver._ahead]


async def test_held_instances_start_in_claim_order_as_slots_free(engine_repo: Any) -> None:
    peak = {"held": 0}

    async def work(ctx: JSONContext) -> None:
        peak["held"] = max(peak["held"], len(driver._ahead))
        await asyncio.sleep(0.002)

    runs = Runs()
    service = WorkflowService(engine_repo, LocalWorkflowLock(), registry_for("one", ONE, runs, run=work))
    ids = await create_many(service, "one", 200)
    cap = CAP_SQLITE if is_sqlite(engine_repo) else 4
    driver = WorkflowDriver(service, concurrency=cap, poll_interval=0.05)
    started = spy_spawns(driver)
    released = spy_releases(driver)
    await driver.run_until_idle()
    assert peak["held"] > 0, "no instance was ever held ahead: the scenario did not test it"
    assert started == sorted(ids)  # in claim order (next_run_at, id), each once
    assert runs.count == {(i, "A"): 1 for i in ids}
    assert released == [] and driver.stats.claimed == 200 and driver.stats.lock_skips == 0
    assert await count(service, "completed") == 200


async def test_held_instances_are_released_when_the_passes_are_stuck_and_another_driver_runs_them(
    engine_repo: Any,
) -> None:
    gate = asyncio.Event()
    hang = {"on": False}
    hung: list[int] = []

    async def work(ctx: JSONContext) -> None:
        if hang["on"] and len(hung) < 2:  # the next two passes to begin never end (until the gate)
            hung.append(current_node().instance_id)
            await gate.wait()
        else:
            await asyncio.sleep(0.002)

    runs = Runs()
    service = WorkflowService(engine_repo, LocalWorkflowLock(), registry_for("one", ONE, runs, run=work))
    ids = await create_many(service, "one", 300)
    driver = WorkflowDriver(service, concurrency=2, poll_interval=0.1)
    released = spy_releases(driver)
    async with asyncio.timeout(30), driver:
        try:
            await eventually(lambda: len(driver._ahead) > 0)  # passes end: instances are held
            hang["on"] = True
            await eventually(lambda: len(hung) == 2 and driver.in_flight == 2)
            async with asyncio.timeout(5):  # long before half the claim lease (15 s)
                await eventually(lambda: released)  # no pass ends any more: the held ones go back
            ((why, back),) = released
            assert why == "held ahead" and back and not set(back) & set(hung)
            assert not driver._ahead and driver.in_flight == 2 and not gate.is_set()
            claimed = driver.stats.claimed
            other = WorkflowDriver(service, concurrency=4, poll_interval=0.05)
            await other.run_until_idle()  # while the first driver's passes are stuck
            assert all(runs.count[(i, "A")] == 1 for i in back)  # run once: by the other driver
            assert await count(service, "completed") == 300 - 2
            assert driver.stats.claimed == claimed  # the first one took none of them again
            assert other.stats.claimed == 300 - claimed + len(back)
        finally:
            gate.set()
        await eventually(lambda: count(service, "completed"))
    assert await count(service, "completed") == 300
    assert runs.count == {(i, "A"): 1 for i in ids}
    assert driver.stats.lock_skips == 0 and driver_tasks() == []


async def test_held_instances_are_released_when_the_driver_stops(engine_repo: Any) -> None:
    hang = {"on": False}
    hung: list[int] = []

    async def work(ctx: JSONContext) -> None:
        if hang["on"]:
            hung.append(current_node().instance_id)
            await asyncio.Event().wait()  # until cancelled
        await asyncio.sleep(0.002)

    runs = Runs()
    service = WorkflowService(engine_repo, LocalWorkflowLock(), registry_for("one", ONE, runs, run=work))
    ids = await create_many(service, "one", 300)
    driver = WorkflowDriver(service, concurrency=2, poll_interval=0.5, stop_deadline=2.0)
    released = spy_releases(driver)
    forever = asyncio.create_task(driver.run_forever())
    async with asyncio.timeout(30):
        await eventually(lambda: len(driver._ahead) > 0)
        hang["on"] = True
        await eventually(lambda: len(hung) == 2 and len(driver._ahead) > 0)
        waiting = held(driver)
        await driver.stop(grace=0.05)
        await forever
    (back,) = [ids for what, ids in released if what == "held ahead"]  # at once, not after the grace
    assert set(waiting) <= set(back)  # (a claim that was under way may have added to them)
    waiting = back
    assert not driver.running and driver.in_flight == 0 and driver_tasks() == []
    now_ms = service.clock.time() * 1000
    for instance_id in [*waiting, *hung]:  # due now, for any driver: not left to the claim's lease
        record = await engine_repo.get_workflow_instance(instance_id)
        assert record.status == "init" and record.next_run_at <= now_ms
    assert all(runs.count[(i, "A")] == 0 for i in waiting)
    hang["on"] = False
    await WorkflowDriver(service, concurrency=4, poll_interval=0.05).run_until_idle()
    assert await count(service, "completed") == 300
    assert all(runs.count[(i, "A")] == 1 for i in ids if i not in hung)  # none lost, none twice
    assert all(runs.count[(i, "A")] == 2 for i in hung)  # cancelled once, then run again


class StallingRepo(MemoryWorkflowRepo):
    """A memory repo whose steps and reads of the next due time wait while ``open`` is clear: a
    database that stalls (its claims do not, so that the driver's loop goes on looking)."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()
        self.open.set()

    async def apply_step(self, step: Step) -> Any:
        await self.open.wait()
        return await super().apply_step(step)

    async def next_due_at(self, workflow_types: Any = None) -> int | None:
        await self.open.wait()
        return await super().next_due_at(workflow_types)


async def test_a_stalled_database_releases_nothing() -> None:
    """Every pass waits on the database for ten poll intervals: a slow moment, not long passes (the
    driver's read of the next due time waits too), so the held instances stay held and run."""
    repo = StallingRepo()
    runs = Runs()

    async def work(ctx: JSONContext) -> None:
        await asyncio.sleep(0.002)

    service = WorkflowService(repo, LocalWorkflowLock(), registry_for("one", ONE, runs, run=work))
    ids = await create_many(service, "one", 300)
    driver = WorkflowDriver(service, concurrency=4, poll_interval=0.05)
    released = spy_releases(driver)
    idle = asyncio.create_task(driver.run_until_idle())
    async with asyncio.timeout(30):
        await eventually(lambda: len(driver._ahead) > 0)
        repo.open.clear()
        done = driver.stats.passes
        await asyncio.sleep(0.5)
        assert driver.stats.passes <= done + 4 and driver._ahead  # stalled, still holding
        repo.open.set()
        await idle
    assert released == []
    assert driver.stats.claimed == 300 and runs.count == {(i, "A"): 1 for i in ids}


async def test_a_held_up_event_loop_releases_nothing() -> None:
    """A worker blocks the event loop for five poll intervals (as a long garbage collection would),
    then its pass goes on for most of one more: no pass ended for longer than the driver waits before
    it releases, but its look came late (the event loop stood still), so it counts again from there
    and releases nothing."""
    blocked = {"done": False}
    runs = Runs()

    async def work(ctx: JSONContext) -> None:
        await asyncio.sleep(0.02)
        if not blocked["done"] and len(driver._ahead) > 0:
            blocked["done"] = True
            time.sleep(0.5)  # noqa: ASYNC251 - the point: the whole event loop stands still
            await asyncio.sleep(0.07)

    service = WorkflowService(
        MemoryWorkflowRepo(), LocalWorkflowLock(), registry_for("one", ONE, runs, run=work)
    )
    ids = await create_many(service, "one", 40)
    driver = WorkflowDriver(service, concurrency=1, poll_interval=0.1)
    released = spy_releases(driver)
    async with asyncio.timeout(30):
        await driver.run_until_idle()
    assert blocked["done"]
    assert released == []
    assert driver.stats.claimed == 40 and runs.count == {(i, "A"): 1 for i in ids}


async def test_an_instance_held_for_half_its_claim_lease_is_released() -> None:
    """Looked at while passes still end: the instance claimed 600 ms ago under a 1 s lease goes back
    (before its lease can end and another driver claim it while it waits); the one claimed 100 ms ago
    stays held."""
    service = WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry_for("one", ONE, Runs()))
    older, newer = await create_many(service, "one", 2)
    driver = WorkflowDriver(service, concurrency=1, poll_interval=60.0, claim_lease=1.0)
    released = spy_releases(driver)
    now = int(service.clock.time() * 1000)
    for instance_id, claimed_at in ((older, now - 600), (newer, now - 100)):
        (got,) = await service.repo.claim_due_instances(now_ms=claimed_at, limit=1, lease_ms=1000)
        assert got == instance_id
        driver._ahead.append((instance_id, claimed_at + 1000))
    driver._passes_done = 1  # a pass ended since the last look: not stuck
    await driver._watch_ahead()
    assert released == [("held ahead", [older])] and held(driver) == [newer]
    back, kept = (
        await service.repo.get_workflow_instance(older),
        await service.repo.get_workflow_instance(newer),
    )
    assert back is not None and kept is not None
    assert back.next_run_at <= service.clock.time() * 1000  # due now: any driver may claim it
    assert kept.next_run_at == now - 100 + 1000  # still leased: ours


class SlowNextDue(MemoryWorkflowRepo):
    """A memory repo whose reads of the next due time take ``delay`` seconds."""

    delay = 0.0

    async def next_due_at(self, workflow_types: Any = None) -> int | None:
        await asyncio.sleep(self.delay)
        return await super().next_due_at(workflow_types)


async def test_quiet_passes_release_the_held_instances_only_once_the_database_answered_at_once() -> None:
    """The watch's rule, step by step: no pass ended for a window (0.2 s) while it looked on time;
    a slow read of the next due time (the database stalls, holding the passes up) releases nothing;
    a quick one, with still no pass ending half a window later, releases them all. After passes
    ended 0.1 s apart, no pass ending for a window is not enough: it takes ten such gaps (1 s)."""
    repo = SlowNextDue()
    service = WorkflowService(repo, LocalWorkflowLock(), registry_for("one", ONE, Runs()))
    ids = await create_many(service, "one", 3)
    driver = WorkflowDriver(service, concurrency=2, poll_interval=0.2)
    released = spy_releases(driver)
    lease_until = int(service.clock.time() * 1000) + driver._lease_ms
    driver._ahead.extend((instance_id, lease_until) for instance_id in ids)

    async def look(quiet_for: float, ended: int = 0) -> int:
        """A look on time, ``quiet_for`` s after the last one; the reads of the next due time it made."""
        now, reads = time.monotonic(), driver.stats.idle_polls
        driver._tick_at, driver._tick_last = now, now - quiet_for
        driver._passes_done += ended
        await driver._watch_ahead()
        return driver.stats.idle_polls - reads

    repo.delay = 0.2  # four times what counts as at once (a quarter of the window)
    assert await look(0.1) == 0
    assert await look(0.1) == 1  # quiet for a window: asks the database, which is slow
    assert await look(0.1) == 1  # and again
    assert released == [] and held(driver) == ids
    repo.delay = 0.0
    assert await look(0.1, ended=1) == 0  # a pass ended, 0.1 s after the one before
    assert await look(0.5) == 0
    assert await look(0.4) == 0  # quiet for 0.9 s: under ten gaps
    assert await look(0.2) == 1  # for over ten gaps: asks the database, which answers at once
    assert released == [] and held(driver) == ids
    assert await look(0.1, ended=1) == 0  # a pass ended meanwhile: a slow moment after all
    assert await look(0.5) == 0
    assert await look(0.6) == 1  # quiet for ten gaps (of 0.1 s) again: asked, answered at once
    assert released == []
    assert await look(0.1) == 0  # and still no pass ended: the slots are stuck
    assert released == [("held ahead", sorted(ids))] and held(driver) == []
    now_ms = service.clock.time() * 1000
    for instance_id in ids:
        record = await repo.get_workflow_instance(instance_id)
        assert record is not None and record.next_run_at <= now_ms


async def test_a_fake_clock_holds_nothing_ahead() -> None:
    """With a clock other than the system clock the driver claims only for its free slots."""
    peak = {"held": 0}

    async def work(ctx: JSONContext) -> None:
        peak["held"] = max(peak["held"], len(driver._ahead))
        await asyncio.sleep(0.002)  # real time: passes end at a rate the driver could hold ahead for

    service = WorkflowService(
        MemoryWorkflowRepo(),
        LocalWorkflowLock(),
        registry_for("one", ONE, Runs(), run=work),
        clock=FakeClock(),
    )
    await create_many(service, "one", 300)
    driver = WorkflowDriver(service, concurrency=4, poll_interval=0.05)
    await driver.run_until_idle()
    assert peak["held"] == 0 and driver.stats.completed == 300 and driver.stats.claimed == 300
