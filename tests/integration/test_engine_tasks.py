"""The tasks a pass makes (issue 21): on a repo whose steps are held (asyncflow._held) a linear pass
makes one task, the one that drives its nodes; each step is awaited inline. A wrapped repo (not
held) gets one shielded task per step, as before, and the same result."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import Step, StepResult

from .engine_helpers import Calls, config, registry_with, statuses

LINEAR = {"A": ["B"], "B": ["C"], "C": []}


@contextmanager
def counting_tasks() -> Iterator[list[str]]:
    """The qualified names of the coroutines the running loop makes tasks of, in order."""
    loop = asyncio.get_running_loop()
    made: list[str] = []
    create_task = loop.create_task

    def counted(coro: Coroutine[Any, Any, Any], **kwargs: Any) -> asyncio.Task[Any]:
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


async def test_a_linear_pass_on_a_held_repo_makes_one_task(engine_repo: Any) -> None:
    calls = Calls()
    svc = WorkflowService(engine_repo, LocalWorkflowLock(), registry_with(config("lin", LINEAR), calls))
    await svc.create_workflow("lin", "warm", run=True)  # the repo's own lazily started tasks, if any
    with counting_tasks() as made:
        done = await svc.create_workflow("lin", "one", run=True)
    assert done.status == "completed"
    assert [name for name in made if "PassRunner" in name or "apply_step" in name] == ["PassRunner._drive"]
    assert [t for phase, t in calls.order if phase == "run"] == ["A", "B", "C", "A", "B", "C"]


async def test_a_wrapped_repo_gets_a_shielded_task_per_step_and_the_same_result(engine_repo: Any) -> None:
    calls = Calls()
    repo = Wrapped(engine_repo)
    svc = WorkflowService(repo, LocalWorkflowLock(), registry_with(config("lin", LINEAR), calls))  # type: ignore[arg-type]
    with counting_tasks() as made:
        done = await svc.create_workflow("lin", "one", run=True)
    assert done.status == "completed"
    assert made.count("Wrapped.apply_step") == repo.steps == 3  # one per node (root and end ride along)
    assert await statuses(svc, done.id) == dict.fromkeys(("root", "A", "B", "C", "end"), "completed")
