"""What a pass leaves on the task that runs it (a review of issue 21's third round found these).

* A worker's own ``CancelledError`` (it awaited something someone else cancelled) fails nothing and
  cancels nobody: the node stays resumable and the pass returns, whether the node ran in a task of
  the pass or in the driver's task itself (``drive_here``).
* A context variable a worker sets does not leak into the caller of ``run_workflow``.
* A failing branch leaves no cancellation request on the caller's task. Python 3.11's TaskGroup
  cancels its task when a branch fails while it waits for the branches and never takes that request
  back (CPython gh-116720); the pass takes it back, so a caller's ``asyncio.timeout`` stays a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import TaskFailedTerminate
from asyncflow.records import WorkflowInstance

from .engine_helpers import Calls, config, recording_worker, registry_with, statuses

LEAK: contextvars.ContextVar[str] = contextvars.ContextVar("asyncflow_test_leak", default="unset")


def _passes(svc: WorkflowService) -> dict[str, Callable[[int], Awaitable[WorkflowInstance]]]:
    async def driver(instance_id: int) -> WorkflowInstance:
        # as the driver runs a pass: in a task of its own, with a fresh context
        task = asyncio.create_task(svc._driver_pass(instance_id, 0.05), context=contextvars.Context())
        return await task

    return {"run_workflow": svc.run_workflow, "driver": driver}


def _cancels() -> int:
    task = asyncio.current_task()
    assert task is not None
    return task.cancelling()


@pytest.mark.parametrize("way", ["run_workflow", "driver"])
async def test_a_workers_own_cancelled_error_cancels_nobody(
    engine_repo: Any, local_lock: Any, way: str
) -> None:
    calls = Calls()

    async def run(ctx: JSONContext) -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future  # CancelledError, though nobody cancelled the pass's task

    cfg = config("self", {"A": ["B"], "B": []})
    svc = WorkflowService(
        engine_repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, run)})
    )
    inst = await svc.create_workflow("self", "k")
    after = await _passes(svc)[way](inst.id)
    assert after.status in ("init", "running")  # A was cut: it runs again in a later pass
    assert _cancels() == 0
    assert [t for phase, t in calls.order if phase == "run"] == ["A"]


async def test_a_workers_context_variable_stays_in_the_pass(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()

    async def run(ctx: JSONContext) -> None:
        LEAK.set("set by the worker")

    cfg = config("leak", {"A": []})
    svc = WorkflowService(
        engine_repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, run)})
    )
    inst = await svc.create_workflow("leak", "k")
    assert (await svc.run_workflow(inst.id)).status == "completed"
    assert LEAK.get() == "unset"


def _failing_diamond(engine_repo: Any, local_lock: Any, *, late: bool) -> WorkflowService:
    calls = Calls()

    async def fail(ctx: JSONContext) -> None:
        if late:
            await asyncio.sleep(0.05)  # the other branch is done: the pass's task waits for this one
        raise TaskFailedTerminate("no")

    cfg = config("dia", {"A": ["B", "C"], "B": ["D"], "C": ["D"], "D": []})
    return WorkflowService(
        engine_repo, local_lock, registry_with(cfg, calls, {"C": recording_worker(calls, fail)})
    )


@pytest.mark.parametrize("late", [True, False], ids=["late", "at-once"])
@pytest.mark.parametrize("way", ["run_workflow", "driver"])
async def test_a_failing_branch_leaves_no_cancel_request_on_the_caller(
    engine_repo: Any, local_lock: Any, way: str, late: bool
) -> None:
    svc = _failing_diamond(engine_repo, local_lock, late=late)
    inst = await svc.create_workflow("dia", "k")
    assert (await _passes(svc)[way](inst.id)).status == "failed"
    assert _cancels() == 0


async def test_a_callers_timeout_around_a_failing_pass_stays_a_timeout(
    engine_repo: Any, local_lock: Any
) -> None:
    svc = _failing_diamond(engine_repo, local_lock, late=True)
    inst = await svc.create_workflow("dia", "k")

    async def caller() -> str:
        try:
            async with asyncio.timeout(0.5):
                assert (await svc.run_workflow(inst.id)).status == "failed"
                await asyncio.sleep(5)  # the caller's own slow work, bounded by its timeout
        except TimeoutError:
            return "timeout"
        return "no timeout"

    assert await asyncio.wait_for(asyncio.create_task(caller()), 5) == "timeout"


async def test_a_caller_cancelled_during_a_pass_is_still_cancelled(engine_repo: Any, local_lock: Any) -> None:
    """The pass takes back only its task group's request, never the caller's own cancellation."""
    calls, started = Calls(), asyncio.Event()

    async def slow(ctx: JSONContext) -> None:
        started.set()
        await asyncio.sleep(5)

    cfg = config("slow", {"A": ["B", "C"], "B": [], "C": []})
    svc = WorkflowService(
        engine_repo, local_lock, registry_with(cfg, calls, {"B": recording_worker(calls, slow)})
    )
    inst = await svc.create_workflow("slow", "k")
    passing = asyncio.create_task(svc.run_workflow(inst.id))
    await started.wait()
    passing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await passing
    assert passing.cancelled()


async def test_a_callers_earlier_cancel_request_is_not_the_pass_being_cancelled(
    engine_repo: Any, local_lock: Any
) -> None:
    """A caller whose task still counts a cancellation request it handled (not taken back) runs a
    pass whose worker raises its own ``CancelledError``: the node ends as it would in a task of its
    own (resumable), the pass returns and the caller's count stays as it was."""
    calls = Calls()

    async def run(ctx: JSONContext) -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    async def dragging(ctx: JSONContext) -> None:
        await asyncio.sleep(0.01)

    cfg = config("late", {"A": ["B"], "B": []})
    workers = {"A": recording_worker(calls, dragging), "B": recording_worker(calls, run)}
    svc = WorkflowService(engine_repo, local_lock, registry_with(cfg, calls, workers))
    inst = await svc.create_workflow("late", "k")

    async def caller() -> tuple[str, int]:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # handled, not uncancelled: cancelling() stays 1
            await asyncio.sleep(0)
        after = await svc.run_workflow(inst.id)
        return after.status, task.cancelling()

    assert await asyncio.create_task(caller()) == ("running", 1)
    assert [t for phase, t in calls.order if phase == "run"] == ["A", "B"]
    assert (await statuses(svc, inst.id))["A"] == "completed"
