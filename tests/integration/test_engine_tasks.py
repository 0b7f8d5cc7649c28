"""The tasks a pass makes (issue 21): on a repo whose steps are held (asyncflow._held) each step is
awaited inline, and a linear pass makes none: the task that runs the pass drives its nodes (a
caller's, in a copy of its context; a driver's, in the task the driver made for it). A pass with
branches makes a task per further branch; one with a ``first`` join a task per branch (a branch that
completes one waits for the branches it drops). A wrapped repo (not held) gets one shielded task per
step, as before, and the same result."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import Step, StepResult, WorkflowInstance

from .engine_helpers import Calls, config, registry_with, statuses

LINEAR = {"A": ["B"], "B": ["C"], "C": []}


_PAUSED = [False]


@contextmanager
def paused_counting() -> Iterator[None]:
    """Tasks made inside the block are not counted (the test's own)."""
    _PAUSED[0] = True
    try:
        yield
    finally:
        _PAUSED[0] = False


@contextmanager
def counting_tasks() -> Iterator[list[str]]:
    """The qualified names of the coroutines the running loop makes tasks of, in order."""
    loop = asyncio.get_running_loop()
    made: list[str] = []
    create_task = loop.create_task

    def counted(coro: Coroutine[Any, Any, Any], **kwargs: Any) -> asyncio.Task[Any]:
        if not _PAUSED[0]:
            made.append(getattr(coro, "__qualname__", type(coro).__name__))
        return create_task(coro, **kwargs)

    loop.create_task = counted  # type: ignore[method-assign]
    try:
        yield made
    finally:
        del loop.create_task  # the instance attribute: the class's method again


class Wrapped:
    """The repo behind a plain wrapper of ``apply_step`` (an await after the write: not held)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.steps = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def apply_step(self, step: Step) -> StepResult:
        result: StepResult = await self.inner.apply_step(step)
        self.steps += 1
        await asyncio.sleep(0)
        return result


def _pass_tasks(made: list[str]) -> list[str]:
    # under a task factory (ASYNCFLOW_TEST_EAGER_TASKS=1) a node's task runs _started_later(_drive)
    named = ["PassRunner._drive" if name == "_started_later" else name for name in made]
    return [name for name in named if "PassRunner" in name or "apply_step" in name]


async def _run(svc: WorkflowService, workflow_type: str, key: str, way: str) -> WorkflowInstance:
    """One instance through its first pass: ``create_workflow(run=True)``, or created and then run
    as a driver runs a pass (in a task of its own: that task is not counted, the pass's are)."""
    if way == "direct":
        return await svc.create_workflow(workflow_type, key, run=True)
    inst = await svc.create_workflow(workflow_type, key)
    with paused_counting():  # and started later whatever the task factory: its pass's tasks count
        task = asyncio.Task(svc._driver_pass(inst.id, 0.05), context=contextvars.Context())
    return await task


@pytest.mark.parametrize("way", ["direct", "driver"])
async def test_a_linear_pass_on_a_held_repo_makes_no_task(engine_repo: Any, way: str) -> None:
    calls = Calls()
    svc = WorkflowService(engine_repo, LocalWorkflowLock(), registry_with(config("lin", LINEAR), calls))
    await _run(svc, "lin", "warm", way)  # the repo's own lazily started tasks, if any
    with counting_tasks() as made:
        done = await _run(svc, "lin", "one", way)
    assert done.status == "completed"
    assert _pass_tasks(made) == []
    assert [t for phase, t in calls.order if phase == "run"] == ["A", "B", "C", "A", "B", "C"]


@pytest.mark.parametrize("way", ["direct", "driver"])
async def test_branches_get_a_task_each(engine_repo: Any, way: str) -> None:
    calls = Calls()
    diamond = {"A": ["B", "C", "D"], "B": ["E"], "C": ["E"], "D": ["E"], "E": []}
    svc = WorkflowService(engine_repo, LocalWorkflowLock(), registry_with(config("dia", diamond), calls))
    await _run(svc, "dia", "warm", way)
    with counting_tasks() as made:
        done = await _run(svc, "dia", "one", way)
    assert done.status == "completed"
    # C's and D's: the pass's own task drives the root's (A, then B)
    assert _pass_tasks(made) == ["PassRunner._drive"] * 2
    nodes = ("root", "A", "B", "C", "D", "E", "end")
    assert await statuses(svc, done.id) == dict.fromkeys(nodes, "completed")


@pytest.mark.parametrize("way", ["direct", "driver"])
async def test_a_first_join_keeps_every_branch_in_a_task(engine_repo: Any, way: str) -> None:
    calls = Calls()
    race = config("race", {"A": ["B", "C"], "B": ["D"], "C": ["D"], "D": []}, D={"join": "first"})
    svc = WorkflowService(engine_repo, LocalWorkflowLock(), registry_with(race, calls))
    with counting_tasks() as made:
        done = await _run(svc, "race", "one", way)
    assert done.status == "completed"
    assert _pass_tasks(made) == ["PassRunner._drive", "PassRunner._drive"]  # the root's (then B), C's


async def test_a_wrapped_repo_gets_a_shielded_task_per_step_and_the_same_result(engine_repo: Any) -> None:
    calls = Calls()
    repo = Wrapped(engine_repo)
    svc = WorkflowService(repo, LocalWorkflowLock(), registry_with(config("lin", LINEAR), calls))  # type: ignore[arg-type]
    with counting_tasks() as made:
        done = await svc.create_workflow("lin", "one", run=True)
    assert done.status == "completed"
    assert made.count("Wrapped.apply_step") == repo.steps == 3  # one per node (root and end ride along)
    assert await statuses(svc, done.id) == dict.fromkeys(("root", "A", "B", "C", "end"), "completed")
