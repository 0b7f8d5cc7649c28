"""The rows and the state of ``MemoryWorkflowRepo``: immutable rows, contexts kept as JSON text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .._frozen import positional, quick_init
from ..records import (
    Pager,
    ScheduleState,
    TaskInstanceRecord,
    WorkflowInstanceRecord,
    new_instance_record,
    new_task_record,
)
from ..status import RUNNABLE_INSTANCE_STATUSES
from ._json import copy_context, page_window
from ._prepare import StepChange, TaskChange

__all__ = [
    "Instance",
    "State",
    "Task",
    "changed_instance",
    "changed_task",
    "leased_instance",
    "new_instance_row",
    "new_task_row",
    "paged",
]


@quick_init  # built on every node: see asyncflow._frozen
@dataclass(frozen=True, slots=True)
class Instance:
    """A stored instance: the record's fields, the context as canonical JSON text."""

    id: int
    workflow_type: str
    business_id: str
    status: str
    workflow_context: str
    task_id: int
    created_at: int
    updated_at: int
    next_run_at: int
    version: int
    trace_context: str | None = None
    lease_epoch: int = 0
    parent_id: int | None = None
    parent_node: str | None = None
    child_key: str | None = None

    def record(self, plain: bool = False) -> WorkflowInstanceRecord:
        """The record; ``plain``: orjson wrote the context (see asyncflow.store._json.copy_context)."""
        return new_instance_record(  # the same fields in the same order (asyncflow._frozen.positional)
            self.id,
            self.workflow_type,
            self.business_id,
            self.status,
            copy_context(self.workflow_context, plain),
            self.task_id,
            self.created_at,
            self.updated_at,
            self.next_run_at,
            self.version,
            self.trace_context,
            self.lease_epoch,
            self.parent_id,
            self.parent_node,
            self.child_key,
        )


@quick_init  # built on every node: see asyncflow._frozen
@dataclass(frozen=True, slots=True)
class Task:
    """A stored node row: the record's fields, the context as canonical JSON text."""

    id: int
    workflow_instance_id: int
    task_type: str
    status: str
    node_context: str
    fail_count: int
    created_at: int
    updated_at: int
    started_at: int
    version: int

    def record(self) -> TaskInstanceRecord:
        return new_task_record(  # the same fields in the same order (asyncflow._frozen.positional)
            self.id,
            self.workflow_instance_id,
            self.task_type,
            self.status,
            copy_context(self.node_context),
            self.fail_count,
            self.created_at,
            self.updated_at,
            self.started_at,
            self.version,
        )


# Positional factories of the rows (asyncflow._frozen.positional): every field, in declaration order,
# with no keyword call and no __init__; a pass's every step builds its instance row and one per node
# row it writes. tests/unit/test_memory_rows.py checks that they build what the constructors build.
new_instance_row: Callable[
    [int, str, str, str, str, int, int, int, int, int, str | None, int, int | None, str | None, str | None],
    Instance,
] = positional(Instance)
"""``(id, workflow_type, business_id, status, workflow_context, task_id, created_at, updated_at,
next_run_at, version, trace_context, lease_epoch, parent_id, parent_node, child_key)``"""

new_task_row: Callable[[int, int, str, str, str, int, int, int, int, int], Task] = positional(Task)
"""``(id, workflow_instance_id, task_type, status, node_context, fail_count, created_at, updated_at,
started_at, version)``"""


@dataclass(slots=True)
class State:
    instances: dict[int, Instance]
    tasks: dict[int, Task]
    task_keys: dict[tuple[int, str], int]  # UNIQUE(workflow_instance_id, task_type)
    last_instance_id: int = 0
    last_task_id: int = 0
    instance_tasks: dict[int, tuple[int, ...]] = field(default_factory=dict)  # ids by instance, ascending
    # (workflow_type, business_id) -> ids of the instances created unique (workflow_instance.unique_key)
    unique: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)
    schedules: dict[str, ScheduleState] = field(default_factory=dict)
    ticks: dict[tuple[str, str], int] = field(default_factory=dict)  # (schedule id, tick) -> instance id
    # (parent id, parent node, child key) -> child id (uq_workflow_instance_child)
    children: dict[tuple[int, str, str], int] = field(default_factory=dict)
    # ids of the instances in RUNNABLE_INSTANCE_STATUSES: the claim and next_due_at look at these only,
    # not at every instance ever created (kept by every write of a status: see track)
    runnable: set[int] = field(default_factory=set)

    def copy(self) -> State:
        # rows and the id tuples are immutable, so copying the maps is a full snapshot
        return State(
            dict(self.instances),
            dict(self.tasks),
            dict(self.task_keys),
            self.last_instance_id,
            self.last_task_id,
            dict(self.instance_tasks),
            dict(self.unique),
            dict(self.schedules),
            dict(self.ticks),
            dict(self.children),
            set(self.runnable),
        )

    def unique_holder(self, workflow_type: str, business_id: str, mode: str) -> int | None:
        """The unique instance of the key that refuses a new ``mode`` row (as the SQL indexes do)."""
        ids = self.unique.get((workflow_type, business_id), ())
        found = [self.instances[i] for i in ids if i in self.instances]
        active = [i.id for i in found if i.status in RUNNABLE_INSTANCE_STATUSES]
        if active:
            return max(active)
        if mode == "always" and found:
            return max(i.id for i in found)
        return None

    def track(self, instance: Instance) -> None:
        """Keep :attr:`runnable` for an instance just stored (its status set or changed)."""
        if instance.status in RUNNABLE_INSTANCE_STATUSES:
            self.runnable.add(instance.id)
        else:
            self.runnable.discard(instance.id)

    def add_task(self, task: Task) -> None:
        self.tasks[task.id] = task
        self.task_keys[(task.workflow_instance_id, task.task_type)] = task.id
        self.instance_tasks[task.workflow_instance_id] = (
            *self.instance_tasks.get(task.workflow_instance_id, ()),
            task.id,
        )

    def remove_instance(self, instance_id: int) -> None:
        """Drop an instance and every node row of it."""
        instance = self.instances.pop(instance_id)
        self.runnable.discard(instance_id)
        if instance.parent_id is not None:
            self.children.pop(
                (instance.parent_id, instance.parent_node or "", instance.child_key or ""), None
            )
        for task_id in self.instance_tasks.pop(instance_id, ()):
            task = self.tasks.pop(task_id)
            self.task_keys.pop((instance_id, task.task_type), None)

    def tasks_of(self, instance_id: int) -> list[Task]:
        """The node rows of one instance, ordered by id."""
        return [self.tasks[task_id] for task_id in self.instance_tasks.get(instance_id, ())]


Row = TypeVar("Row", Instance, Task)


def paged(rows: list[Row], ascending: bool | None, pager: Pager | None) -> list[Row]:
    rows = sorted(rows, key=lambda row: row.id, reverse=ascending is False)
    window = page_window(pager)
    return rows if window is None else rows[window[0] : window[0] + window[1]]


def changed_instance(instance: Instance, change: StepChange, now: int) -> Instance:
    # every field positionally, in declaration order (dataclasses.replace() costs ten times more: the
    # engine's every step changes its instance); tests/unit/test_memory_rows.py checks the order
    status, context, next_run_at = change
    return new_instance_row(
        instance.id,
        instance.workflow_type,
        instance.business_id,
        instance.status if status is None else status,
        instance.workflow_context if context is None else context,
        instance.task_id,
        instance.created_at,
        now,  # updated_at
        instance.next_run_at if next_run_at is None else next_run_at,
        instance.version + 1,
        instance.trace_context,
        instance.lease_epoch,
        instance.parent_id,
        instance.parent_node,
        instance.child_key,
    )


def leased_instance(instance: Instance, next_run_at: int | None = None) -> Instance:
    """The instance with a new lease epoch (a pass's leased read), or with ``next_run_at`` (a claim's
    lease), its version unchanged: a lease is no change of the row (positionally, as above)."""
    return new_instance_row(
        instance.id,
        instance.workflow_type,
        instance.business_id,
        instance.status,
        instance.workflow_context,
        instance.task_id,
        instance.created_at,
        instance.updated_at,
        instance.next_run_at if next_run_at is None else next_run_at,
        instance.version,
        instance.trace_context,
        instance.lease_epoch + 1 if next_run_at is None else instance.lease_epoch,
        instance.parent_id,
        instance.parent_node,
        instance.child_key,
    )


def changed_task(task: Task, change: TaskChange, now: int) -> Task:
    status, context, fail_count, started_at = change
    return new_task_row(  # positionally, as changed_instance
        task.id,
        task.workflow_instance_id,
        task.task_type,
        task.status if status is None else status,
        task.node_context if context is None else context,
        task.fail_count if fail_count is None else fail_count,
        task.created_at,
        now,  # updated_at
        task.started_at if started_at is None else started_at,
        task.version + 1,
    )
