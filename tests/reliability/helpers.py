"""Shared pieces of the reliability tests: the mixed workflow, a journal of worker calls, state snapshots.

The mixed workflow has a fan-out, a join, a wait check that is not ready at first and a node that fails
once before it succeeds (a retry)::

    root -> A -> B (wait check: not ready once) -> E -> F -> end
              -> C (fails on its first attempt)  -> E
              -> D ------------------------------------> F

Its workers decide from the node's stored state (``fail_count``, a ``polls`` key in the node context),
never from wall-clock time or memory, so every run of it takes the same steps, across crashes too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import io
from collections.abc import AsyncIterator, Callable
from typing import Any

from asyncflow._held import holds_cancellation
from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver
from asyncflow.engine.rules import SchedulePolicy
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import TaskNotReady
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import (
    Pager,
    QueryTaskInstanceParams,
    QueryWorkflowInstanceParams,
    Step,
    StepResult,
    TaskInstanceRecord,
    WorkflowInstanceRecord,
)
from asyncflow.registry import Registry
from asyncflow.retry import RetryPolicy
from asyncflow.worker import NormalTaskWorker, current_node

MIXED = "mixed"
MIXED_EDGES: dict[str, list[str]] = {
    "A": ["B", "C", "D"],
    "B": ["E"],
    "C": ["E"],
    "D": ["F"],
    "E": ["F"],
    "F": [],
}
WITH_CHECK = frozenset({"B"})  # nodes that have a wait check
FAILS_ONCE = frozenset({"C"})  # nodes whose first attempt fails (a retryable error)
ALL_ROWS = frozenset({"root", *MIXED_EDGES, "end"})


def mixed_config(workflow_type: str = MIXED) -> WorkflowConfig:
    """The mixed workflow (see the module docstring)."""
    return WorkflowConfig(
        id=workflow_type,
        name=workflow_type,
        nodes=tuple(
            NodeConfig(id=node, name=f"node {node}", next_nodes=tuple(nxt), fail_max_count=5)
            for node, nxt in MIXED_EDGES.items()
        ),
    )


class TransientError(Exception):
    """The retryable failure of a node's first attempt."""


class Journal:
    """What workers did: ``(instance, node, phase, event)`` with event ``start``, ``done`` or ``fail``.

    ``done`` means the call finished its work and is about to return success to the engine.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[int, str, str, str]] = []

    def add(self, instance_id: int, node: str, phase: str, event: str) -> None:
        self.entries.append((instance_id, node, phase, event))

    def count(self, event: str, phase: str | None = None) -> collections.Counter[tuple[int, str]]:
        """Per ``(instance, node)``: how many calls of ``phase`` (any phase if None) ended in ``event``."""
        return collections.Counter(
            (inst, node) for inst, node, ph, ev in self.entries if ev == event and phase in (None, ph)
        )

    def done(self, instance_id: int, node: str, phase: str) -> int:
        return sum(1 for e in self.entries if e == (instance_id, node, phase, "done"))


Hook = Callable[[str, str, str], Any]  # (node, "run"/"check", "start"/"end") -> awaitable or None


def mixed_registry(journal: Journal, *, hook: Hook | None = None, workflow_type: str = MIXED) -> Registry:
    """A fresh registry with the mixed workflow whose workers write to ``journal``.

    ``hook(node, phase, "start")`` is awaited in every call after its ``start`` entry, and
    ``hook(node, phase, "end")`` after a ``done`` entry, just before the call returns success, so a
    test can block, slow or cancel a worker there.
    """
    registry = Registry()
    registry.load_workflow_config(mixed_config(workflow_type))

    def worker(node: str) -> NormalTaskWorker:
        async def call(ctx: JSONContext, phase: str) -> None:
            info = current_node()
            journal.add(info.instance_id, node, phase, "start")
            await _call_hook(hook, node, phase, "start")
            if phase == "run" and node in FAILS_ONCE and info.fail_count == 0:
                journal.add(info.instance_id, node, phase, "fail")
                raise TransientError(f"{node}: first attempt fails")
            if phase == "check" and not ctx.get_int64("polls")[0]:
                ctx.set(["polls"], 1)  # stored with the not-ready outcome: ready on the next poll
                journal.add(info.instance_id, node, phase, "notready")
                raise TaskNotReady(f"{node}: not yet")
            if phase == "run":
                ctx.set([f"out_{node}"], node.lower())
            journal.add(info.instance_id, node, phase, "done")
            await _call_hook(hook, node, phase, "end")

        async def run(ctx: JSONContext) -> None:
            await call(ctx, "run")

        async def check(ctx: JSONContext) -> None:
            await call(ctx, "check")

        return NormalTaskWorker(run=run, wait_check=check if node in WITH_CHECK else None)

    for node in MIXED_EDGES:
        registry.register_workflow_task(workflow_type, node, worker(node))
    return registry


async def _call_hook(hook: Hook | None, node: str, phase: str, moment: str) -> None:
    if hook is not None:
        result = hook(node, phase, moment)
        if result is not None:
            await result


FAST = SchedulePolicy(poll_interval=0.01)
FAST_RETRY = RetryPolicy(initial_interval=0.01, max_interval=0.05)


def service(repo: Any, journal: Journal, **kwargs: Any) -> WorkflowService:
    """A service on ``repo`` with a local lock, the mixed workflow and fast polls and retries."""
    kwargs.setdefault("schedule", FAST)
    kwargs.setdefault("retry", FAST_RETRY)
    return WorkflowService(repo, LocalWorkflowLock(), mixed_registry(journal), **kwargs)


# ---------------------------------------------------------------------------------- stored state


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything a repo stores, as comparable values (timestamps included)."""

    instances: tuple[WorkflowInstanceRecord, ...]
    tasks: tuple[TaskInstanceRecord, ...]


async def snapshot(repo: Any) -> Snapshot:
    """Read every instance and node row through the repo."""
    everything = Pager(no_limit=True)
    instances = await repo.query_workflow_instances(QueryWorkflowInstanceParams(page=everything))
    tasks = await repo.query_task_instances(QueryTaskInstanceParams(page=everything))
    return Snapshot(tuple(instances), tuple(tasks))


def without_epochs(taken: Snapshot) -> Snapshot:
    """The snapshot with every ``lease_epoch`` at 0: a pass that writes nothing still takes an epoch."""
    instances = tuple(dataclasses.replace(record, lease_epoch=0) for record in taken.instances)
    return Snapshot(instances, taken.tasks)


class CompletionCounter:
    """Wraps a repo; counts, per ``(instance, task type)``, the applied writes that completed a node."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.completions: collections.Counter[tuple[int, str]] = collections.Counter()
        self._types: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @holds_cancellation  # nothing is awaited after the inner (held) write
    async def apply_step(self, step: Step) -> StepResult:
        if any(update.id not in self._types for update in step.updates):
            for row in await self.inner.load_task_instances(step.instance_id):
                self._types[row.id] = row.task_type
        result: StepResult = await self.inner.apply_step(step)
        if not result.applied:
            return result
        for row in result.inserted:
            self._types[row.id] = row.task_type
            if row.status == "completed":
                self.completions[(step.instance_id, row.task_type)] += 1
        for update in step.updates:
            if update.status == "completed":
                self.completions[(step.instance_id, self._types[update.id])] += 1
        return result


async def rows_by_type(repo: Any, instance_id: int) -> dict[str, TaskInstanceRecord]:
    return {row.task_type: row for row in await repo.load_task_instances(instance_id)}


@contextlib.asynccontextmanager
async def closing(*closables: Any) -> AsyncIterator[None]:
    """Close every object (``aclose()``) at the end of the block, in reverse order."""
    try:
        yield
    finally:
        for obj in reversed(closables):
            await obj.aclose()


async def stall_report(inner: Any, driver: WorkflowDriver) -> str:
    """Why a driver run did not finish: the driver's state, the active rows, the connection lanes and
    where every task waits (its whole chain of awaits)."""
    out = io.StringIO()
    print(f"driver: in flight {sorted(driver._inflight)}, rechecks {driver._rechecks}", file=out)
    print(f"driver stats: {driver.stats}", file=out)
    everything = await snapshot(inner)
    for record in everything.instances:
        if record.status in ("init", "running"):
            nodes = {t.task_type: t.status for t in everything.tasks if t.workflow_instance_id == record.id}
            print(f"instance {record.id}: {record.status} next_run_at {record.next_run_at} {nodes}", file=out)
    print(
        f"driver state: want_slots={driver._want_slots} wake={driver._wake.is_set()} "
        f"claim_hint={driver._claim_hint} query_hint={driver._query_hint} stopping={driver._stopping}",
        file=out,
    )
    lanes = getattr(getattr(inner, "_backend", None), "_lanes", None)
    if lanes is not None:
        print(
            f"lanes: busy={lanes._busy} wanting={lanes._wanting} idle={len(lanes._idle)} "
            f"slots={lanes._slots._value} waiters={len(lanes._slots._waiters or ())} "
            f"pool={inner._engine.sync_engine.pool.status()}",
            file=out,
        )
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=out)
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                print(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}", file=out)
            else:
                print(f"  awaiting {coro!r:.200}", file=out)
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return out.getvalue()
