"""WorkflowDriver's pass tasks, which it tracks itself (no task group per pass): a pass that raises
something other than an ``Exception`` stops the driver with it, a cancelled driver cancels its passes
and waits for them, no pass outlives the run, and passes are made as the loop's ``create_task`` would
make them (a task factory included)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver, _task_maker
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.worker import current_node
from tests.integration.test_driver import Runs, count, create_many, driver_tasks, eventually, registry_for

ONE: dict[str, list[str]] = {"A": []}


class Boom(BaseException):
    """Not an ``Exception``: a pass does not handle it, the driver stops with it."""


async def test_a_pass_that_raises_a_base_exception_stops_the_driver_with_it() -> None:
    gate = asyncio.Event()

    async def work(ctx: JSONContext) -> None:
        if current_node().business_id == "b3":
            await asyncio.sleep(0.01)  # the others are running by then
            raise Boom("boom")
        await gate.wait()  # until cancelled

    service = WorkflowService(
        MemoryWorkflowRepo(), LocalWorkflowLock(), registry_for("one", ONE, Runs(), run=work)
    )
    ids = await create_many(service, "one", 6)
    driver = WorkflowDriver(service, concurrency=8, poll_interval=0.05)
    with pytest.raises(Boom, match="boom"):
        async with asyncio.timeout(10):
            await driver.run_until_idle()
    assert not driver.running and driver.in_flight == 0 and driver_tasks() == []
    assert driver.stats.cancelled == 5  # the other passes, cancelled and waited for
    now_ms = service.clock.time() * 1000
    for instance_id in ids:
        record = await service.repo.get_workflow_instance(instance_id)
        assert record is not None and record.status == "init"
        if record.business_id != "b3":  # released: due now
            assert record.next_run_at <= now_ms


async def test_cancelling_a_running_driver_cancels_its_passes_and_waits_for_them() -> None:
    started: list[int] = []
    ended: list[int] = []
    hang = {"on": True}

    async def work(ctx: JSONContext) -> None:
        if not hang["on"]:
            return
        started.append(current_node().instance_id)
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.05)  # winds down for a while: the driver waits for it
            ended.append(current_node().instance_id)

    runs = Runs()
    service = WorkflowService(
        MemoryWorkflowRepo(), LocalWorkflowLock(), registry_for("one", ONE, runs, run=work)
    )
    ids = await create_many(service, "one", 4)
    driver = WorkflowDriver(service, concurrency=4, poll_interval=0.05)
    forever = asyncio.create_task(driver.run_forever())
    await eventually(lambda: len(started) == 4)
    forever.cancel()
    with pytest.raises(asyncio.CancelledError):
        await forever
    assert sorted(ended) == sorted(ids)  # every pass ended before the driver's run did
    assert not driver.running and driver.in_flight == 0 and driver_tasks() == []
    assert driver.stats.cancelled == 4
    now_ms = service.clock.time() * 1000
    for instance_id in ids:  # released: due now, not after the claim's lease
        record = await service.repo.get_workflow_instance(instance_id)
        assert record is not None and record.next_run_at <= now_ms
    hang["on"] = False
    await WorkflowDriver(service, concurrency=4, poll_interval=0.05).run_until_idle()
    assert await count(service, "completed") == 4


async def test_passes_are_tasks_of_the_loop_and_its_task_factory() -> None:
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()
    made: list[str] = []

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        made.append(coro.__qualname__)
        if factory is not None:
            return factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    if factory is None and not loop.get_debug():  # a plain loop: Task itself, as create_task would
        maker = _task_maker(loop)
        assert maker is asyncio.Task
    loop.set_task_factory(counting)
    try:
        assert _task_maker(loop) == loop.create_task
        service = WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry_for("one", ONE, Runs()))
        ids = await create_many(service, "one", 3)
        await WorkflowDriver(service, concurrency=4, poll_interval=0.05).run_until_idle()
    finally:
        loop.set_task_factory(factory)
    assert await count(service, "completed") == 3
    assert made.count("WorkflowDriver._pass") == len(ids)  # each pass, made by the factory
