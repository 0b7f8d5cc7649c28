"""Frozen records and parameter objects shared by the service, the repos and the driver.

Repos return these records, never ORM rows. Timestamps ``created_at``/``updated_at``/``started_at``
are unix seconds (as in Go); ``next_run_at`` is unix milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ._frozen import positional, quick_init
from ._text import shown
from .errors import ParamInvalidError
from .status import RUNNABLE_INSTANCE_STATUSES

__all__ = [
    "InstanceFields",
    "InstanceWhere",
    "NewWorkflowInstance",
    "NodeExternalEvent",
    "Pager",
    "QueryTaskInstanceParams",
    "QueryWorkflowInstanceParams",
    "ScheduleState",
    "Step",
    "StepResult",
    "TaskFields",
    "TaskInsert",
    "TaskInstanceDetail",
    "TaskInstanceRecord",
    "TaskUpdate",
    "TaskWhere",
    "WorkflowInstance",
    "WorkflowInstanceDetail",
    "WorkflowInstanceRecord",
]

JSONDict = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Pager:
    """Paging of a query. ``page``/``size`` of 0 mean the defaults 1 and 10; negatives are invalid."""

    page: int = 1
    size: int = 10
    no_limit: bool = False

    def __post_init__(self) -> None:
        for name in ("page", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ParamInvalidError(f"Pager.{name} must be an int, got {shown(value)}")
            if value < 0:
                raise ParamInvalidError(f"Pager.{name} must not be negative, got {shown(value)}")

    def resolved(self) -> tuple[int, int]:
        """``(page, size)`` with the defaults applied (the object itself is never changed)."""
        return (self.page or 1, self.size or 10)

    @property
    def offset(self) -> int:
        page, size = self.resolved()
        return (page - 1) * size

    @property
    def limit(self) -> int:
        return self.resolved()[1]


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryWorkflowInstanceParams:
    """Filters of the instance queries, AND-ed (Go's ``QueryWorkflowInstanceParams``).

    Empty sequences and ``None`` mean "no filter". ``order_by_id_asc=None`` still pages in id order
    (ascending) so paging is stable. ``page`` is ignored by counts.
    """

    workflow_instance_id: int | None = None
    workflow_type_in: tuple[str, ...] = ()
    business_id: str | None = None
    status_in: tuple[str, ...] = ()
    id_greater_than: int | None = None
    task_id: int | None = None
    order_by_id_asc: bool | None = None
    page: Pager = field(default_factory=Pager)

    def __post_init__(self) -> None:
        # accept any sequence (a list is natural for callers) but store tuples so the object is hashable
        for name in ("workflow_type_in", "status_in"):
            value = getattr(self, name)
            if value is None:  # no filter, as the docstring says (it raised TypeError)
                value = ()
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                raise ParamInvalidError(f"{name} must be a sequence of strings, got {type(value).__name__}")
            try:
                object.__setattr__(self, name, tuple(str(v) for v in value))
            except ValueError:  # str() of an int of over 4,300 digits
                raise ParamInvalidError(
                    f"{name} must hold strings (an int too long to write is not one)"
                ) from None
        for name in ("workflow_instance_id", "id_greater_than", "task_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ParamInvalidError(f"{name} must be an int or None, got {shown(value)}")
        if self.business_id is not None and not isinstance(self.business_id, str):
            raise ParamInvalidError(f"business_id must be a str or None, got {shown(self.business_id)}")
        if not isinstance(self.page, Pager):
            raise ParamInvalidError(f"page must be a Pager, got {shown(self.page)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryTaskInstanceParams:
    """Filters of the node queries, AND-ed. ``page=None`` returns every matching row (ordered by id)."""

    id: int | None = None
    workflow_instance_id: int | None = None
    task_type: str | None = None
    status_in: tuple[str, ...] = ()
    id_greater_than: int | None = None
    order_by_id_asc: bool | None = None
    page: Pager | None = None


@quick_init  # built on every node: see asyncflow._frozen
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowInstanceRecord:
    """A ``workflow_instance`` row. ``workflow_context`` is a plain ``dict``."""

    id: int
    workflow_type: str
    business_id: str
    status: str
    workflow_context: JSONDict
    task_id: int
    created_at: int
    updated_at: int
    next_run_at: int = 0
    version: int = 1
    trace_context: str | None = None  # W3C traceparent of the request that created it
    lease_epoch: int = 0
    """The epoch of the newest pass (taken by ``load_instance_state(id, lease=True)``): a step that
    names an older one is refused (``StepResult.stale``)."""
    parent_id: int | None = None
    """A child workflow's parent instance (``af.start_child_workflow``); ``None`` for top-level ones."""
    parent_node: str | None = None
    """The parent's node that started this child (``None`` for top-level instances)."""
    child_key: str | None = None
    """The key the parent's node gave this child (``None`` for top-level instances)."""


@quick_init  # built on every node: see asyncflow._frozen
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowInstance:
    """What the service returns for an instance: the record's fields plus the definition if loaded."""

    id: int
    workflow_type: str
    business_id: str
    status: str
    workflow_context: JSONDict
    task_id: int
    created_at: int
    updated_at: int
    definition: Any = None  # WorkflowDefinition | None (kept Any to keep records free of definitions)
    parent_id: int | None = None  # a child workflow's parent instance; None for top-level ones

    @classmethod
    def from_record(
        cls,
        record: WorkflowInstanceRecord,
        definition: Any = None,
        *,
        status: str | None = None,
        updated_at: int | None = None,
    ) -> WorkflowInstance:
        """The record as the service returns it; ``status``/``updated_at`` replace the record's (a
        pass's result, without copying the record first)."""
        if cls is not WorkflowInstance:  # a subclass: its own constructor
            return cls(
                id=record.id,
                workflow_type=record.workflow_type,
                business_id=record.business_id,
                status=record.status if status is None else status,
                workflow_context=record.workflow_context,
                task_id=record.task_id,
                created_at=record.created_at,
                updated_at=record.updated_at if updated_at is None else updated_at,
                definition=definition,
                parent_id=record.parent_id,
            )
        return new_workflow_instance(
            record.id,
            record.workflow_type,
            record.business_id,
            record.status if status is None else status,
            record.workflow_context,
            record.task_id,
            record.created_at,
            record.updated_at if updated_at is None else updated_at,
            definition,
            record.parent_id,
        )


@quick_init  # built on every node: see asyncflow._frozen
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskInstanceRecord:
    """A ``task_instance`` row (one node of one instance).

    ``started_at`` is the node's timeout clock (set at creation and reset by restarts); ``version`` is
    bumped by every write and is what compare-and-set updates name.
    """

    id: int
    workflow_instance_id: int
    task_type: str
    status: str
    node_context: JSONDict
    fail_count: int
    created_at: int
    updated_at: int
    started_at: int
    version: int = 1


@quick_init  # built on every node: see asyncflow._frozen
@dataclass(frozen=True, slots=True, kw_only=True)
class NewWorkflowInstance:
    """What ``create_workflow_instance`` inserts (status ``init`` unless given)."""

    workflow_type: str
    business_id: str
    workflow_context: JSONDict
    task_id: int = 0
    status: str = "init"
    next_run_at: int = 0
    trace_context: str | None = None  # stored with the instance (observers' trace_context())
    unique: str | None = None  # "active" | "always": refused when a unique instance of the key exists
    # the instance's first lease epoch (0 or 1): 1 when its creator runs its first pass itself, as
    # create_workflow(run=True) does; an instance at 0 that a driver claims is handed to its pass as it
    # was created (the claim takes epoch 1 for it), one at 1 is read by its next pass (which takes 2)
    lease_epoch: int = 0


@quick_init  # built on every node: see asyncflow._frozen
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskInsert:
    """A node row to insert inside a :class:`Step` (or through ``create_task_instance``)."""

    task_type: str
    status: str
    node_context: JSONDict
    fail_count: int = 0
    started_at: int = 0  # 0: the repo's "now"


@quick_init  # built on every node: see asyncflow._frozen
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskUpdate:
    """A compare-and-set update of one node row inside a :class:`Step`.

    Applies only if the row still has ``expected_version``; ``None`` fields are left unchanged.
    """

    id: int
    expected_version: int
    status: str | None = None
    node_context: JSONDict | None = None
    fail_count: int | None = None
    started_at: int | None = None


@quick_init  # built on every node: see asyncflow._frozen
@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One atomic write of a pass: everything in it commits together or not at all.

    The repo applies it in one transaction:

    1. the instance row is updated (``updated_at``, ``version + 1`` and the optional ``instance_status``
       and ``next_run_at``) only if its status is in ``instance_status_in``; otherwise nothing is
       written and the result is not applied;
    2. each update applies only if the row's version is still ``expected_version``;
    3. each insert must not collide with an existing ``(instance, task_type)`` row;
    4. with ``cancel_other_tasks``, every other non-terminal node row of the instance becomes
       ``canceled``.

    With ``lease_epoch`` (a pass's fence) the instance row must also still be at that epoch: once a
    newer pass took the instance (or an update outside passes moved the epoch), the step writes
    nothing and returns ``StepResult(applied=False, stale=True)``.

    Any failed condition rolls the whole step back and returns ``StepResult(applied=False)``.
    """

    instance_id: int
    instance_status_in: tuple[str, ...] = RUNNABLE_INSTANCE_STATUSES
    instance_status: str | None = None
    next_run_at: int | None = None
    inserts: tuple[TaskInsert, ...] = ()
    updates: tuple[TaskUpdate, ...] = ()
    cancel_other_tasks: bool = False
    lease_epoch: int | None = None


@quick_init  # built on every node: see asyncflow._frozen
@dataclass(frozen=True, slots=True)
class StepResult:
    """``applied`` is False when a condition of the step failed (nothing was written).

    ``inserted`` holds the new rows, in the order of ``Step.inserts``. ``stale`` tells that the
    step's ``lease_epoch`` was no longer the instance's (the instance's status was as required): a
    newer pass began, so the step's pass must write nothing more.
    """

    applied: bool
    inserted: tuple[TaskInstanceRecord, ...] = ()
    stale: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceWhere:
    """Rows an instance update applies to (AND-ed). At least ``ids`` must be given."""

    ids: tuple[int, ...]
    status_in: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceFields:
    """Fields an instance update sets (``None`` = unchanged). ``updated_at`` and ``version`` always move."""

    status: str | None = None
    workflow_context: JSONDict | None = None
    next_run_at: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskWhere:
    """Rows a node update applies to (AND-ed). ``ids`` or ``workflow_instance_id`` must be given."""

    ids: tuple[int, ...] = ()
    workflow_instance_id: int | None = None
    task_type_in: tuple[str, ...] = ()
    status_in: tuple[str, ...] = ()
    version: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFields:
    """Fields a node update sets (``None`` = unchanged). ``updated_at`` and ``version`` always move."""

    status: str | None = None
    node_context: JSONDict | None = None
    fail_count: int | None = None
    started_at: int | None = None


@dataclass(frozen=True, slots=True)
class NodeExternalEvent:
    """An external event for a node: ``event_ts`` is its version, ``event_content`` any JSON value."""

    event_ts: int
    event_content: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskInstanceDetail:
    """One node of an instance in a detail query (``id`` 0 and status ``uncreated`` when no row)."""

    id: int
    workflow_instance_id: int
    task_type: str
    task_name: str
    status: str
    node_context: JSONDict | None
    fail_count: int
    created_at: int
    updated_at: int
    pre_nodes_keys: list[str]
    next_nodes_keys: list[str]
    started_at: int | None = None
    """When the node started (unix seconds; the clock of its ``max_wait_time_ts``, reset by a restart),
    ``None`` for a node without a row. A node stored ``running`` is in flight (see ``visible_after``)
    or waiting to be retried (``fail_count`` > 0)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowInstanceDetail:
    """An instance with one :class:`TaskInstanceDetail` per definition node, in definition order."""

    id: int
    workflow_type: str
    business_id: str
    status: str
    workflow_context: JSONDict
    task_id: int
    created_at: int
    updated_at: int
    task_instances: tuple[TaskInstanceDetail, ...]
    parent_id: int | None = None  # a child workflow's parent instance; None for top-level ones

    def node(self, task_type: str) -> TaskInstanceDetail:
        """The entry of ``task_type`` (``KeyError`` if the definition has no such node)."""
        for item in self.task_instances:
            if item.task_type == task_type:
                return item
        raise KeyError(task_type)


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """What the store knows of a schedule: first seen by a driver (unix ms), the latest tick fired, and
    the definition both are of (``Schedule.fingerprint()``; ``None``: stored before schema version 14)."""

    id: str
    first_seen_at: int
    last_tick: str | None = None
    fingerprint: str | None = None


# Positional factories of the records built on a node's hot path (asyncflow._frozen.positional): every
# field, in declaration order, without the keyword call's cost. Internal: the engine and the stores
# use them; tests/unit/test_frozen.py checks that each signature lists its class's fields in order.

new_instance_record: Callable[
    [
        int,
        str,
        str,
        str,
        JSONDict,
        int,
        int,
        int,
        int,
        int,
        str | None,
        int,
        int | None,
        str | None,
        str | None,
    ],
    WorkflowInstanceRecord,
] = positional(WorkflowInstanceRecord)
"""``(id, workflow_type, business_id, status, workflow_context, task_id, created_at, updated_at,
next_run_at, version, trace_context, lease_epoch, parent_id, parent_node, child_key)``"""

new_task_record: Callable[[int, int, str, str, JSONDict, int, int, int, int, int], TaskInstanceRecord]
new_task_record = positional(TaskInstanceRecord)
"""``(id, workflow_instance_id, task_type, status, node_context, fail_count, created_at, updated_at,
started_at, version)``"""

new_task_insert: Callable[[str, str, JSONDict, int, int], TaskInsert] = positional(TaskInsert)
"""``(task_type, status, node_context, fail_count, started_at)``"""

new_task_update: Callable[[int, int, str | None, JSONDict | None, int | None, int | None], TaskUpdate] = (
    positional(TaskUpdate)
)
"""``(id, expected_version, status, node_context, fail_count, started_at)``"""

new_step: Callable[
    [
        int,
        tuple[str, ...],
        str | None,
        int | None,
        tuple[TaskInsert, ...],
        tuple[TaskUpdate, ...],
        bool,
        int | None,
    ],
    Step,
] = positional(Step)
"""``(instance_id, instance_status_in, instance_status, next_run_at, inserts, updates,
cancel_other_tasks, lease_epoch)``"""

new_step_result: Callable[[bool, tuple[TaskInstanceRecord, ...], bool], StepResult] = positional(StepResult)
"""``(applied, inserted, stale)``"""

new_workflow_instance: Callable[
    [int, str, str, str, JSONDict, int, int, int, Any, int | None], WorkflowInstance
] = positional(WorkflowInstance)
"""``(id, workflow_type, business_id, status, workflow_context, task_id, created_at, updated_at,
definition, parent_id)``"""
