"""``WorkflowRepo``: the narrow storage Protocol the engine and the driver need."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

from ..records import (
    InstanceFields,
    InstanceWhere,
    NewWorkflowInstance,
    QueryTaskInstanceParams,
    QueryWorkflowInstanceParams,
    ScheduleState,
    Step,
    StepResult,
    TaskFields,
    TaskInsert,
    TaskInstanceRecord,
    TaskWhere,
    WorkflowInstanceRecord,
)

__all__ = [
    "DueListener",
    "JoinsSessions",
    "KeepsLeases",
    "ListensDue",
    "ListensFinished",
    "StoresSchedules",
    "WatchesFinished",
    "WorkflowRepo",
]


@runtime_checkable
class WorkflowRepo(Protocol):
    """Storage of instances and node rows.

    Every method raises ``StoreError`` (driver error as ``__cause__``) for database failures and
    ``ParamInvalidError`` for invalid arguments (negative paging, a NUL in a business id, empty
    where/fields). Methods called inside ``transaction()`` (in the same task or a task it spawned)
    run in that transaction.
    """

    async def migrate(self) -> None:
        """Create the schema or upgrade it to ``SCHEMA_VERSION`` (forward-only, idempotent, concurrent);
        ``InvalidStateError`` inside ``transaction()``."""

    async def create_schema(self) -> None:
        """The same as :meth:`migrate` (the 0.1 name)."""

    async def aclose(self) -> None:
        """Release what the repo owns (an engine it created); a caller's engine is left alone."""

    def transaction(self) -> AbstractAsyncContextManager[None]:
        """One transaction: commit on success, roll back on any exception (``CancelledError`` too).

        Nested use joins the outer transaction. Commit failures are raised as ``StoreError``.
        """

    async def create_workflow_instance(self, new: NewWorkflowInstance) -> WorkflowInstanceRecord:
        """Insert one instance (``created_at = updated_at = now``) and return it with its id."""

    async def create_workflow_instances(self, news: Sequence[NewWorkflowInstance]) -> list[int]:
        """Bulk insert (one statement per batch); ids in input order."""

    async def create_child_instance(
        self, new: NewWorkflowInstance, *, parent_id: int, parent_node: str, child_key: str
    ) -> tuple[WorkflowInstanceRecord, bool]:
        """Insert a child instance unless ``(parent_id, parent_node, child_key)`` has one already
        (a unique index decides, also under concurrency); ``(the child, whether it was created)``."""

    async def query_child_instances(self, parent_id: int) -> list[WorkflowInstanceRecord]:
        """The children of one instance, ordered by id."""

    async def get_workflow_instance(self, instance_id: int) -> WorkflowInstanceRecord | None:
        """The instance, or ``None``."""

    async def query_workflow_instances(
        self, params: QueryWorkflowInstanceParams
    ) -> list[WorkflowInstanceRecord]:
        """Filtered (AND), ordered by id (ascending unless ``order_by_id_asc`` is False), paged."""

    async def count_workflow_instances(self, params: QueryWorkflowInstanceParams) -> int:
        """How many instances match the filters (paging and order ignored)."""

    async def create_task_instance(self, instance_id: int, new: TaskInsert) -> TaskInstanceRecord:
        """Insert one node row; a duplicate ``(instance, task_type)`` raises ``UniqueViolationError``."""

    async def query_task_instances(self, params: QueryTaskInstanceParams) -> list[TaskInstanceRecord]:
        """Filtered (AND) node rows, ordered by id."""

    async def load_task_instances(self, instance_id: int) -> list[TaskInstanceRecord]:
        """Every node row of one instance, ordered by id."""

    async def load_instance_state(
        self, instance_id: int, *, lease: bool = False
    ) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None:
        """The instance and every node row of it (ordered by id), read together; ``None`` if missing.

        What a pass reads first (under the instance lock), with ``lease=True``: the same statement
        takes a new lease epoch (``lease_epoch + 1``, returned on the record), which the pass's steps
        name (``Step.lease_epoch``), so an older pass of the instance can write nothing more. One
        statement on PostgreSQL's hot path and one transaction on SQLite, so the rows are those of
        the instance as returned; inside ``transaction()`` the reads share the caller's transaction
        (and its isolation level).
        """

    async def update_workflow_instances(self, where: InstanceWhere, fields: InstanceFields) -> int:
        """Conditional update; bumps ``updated_at``, ``version`` and ``lease_epoch`` (an update
        outside passes fences the passes in flight); returns the rows changed."""

    async def update_task_instances(self, where: TaskWhere, fields: TaskFields) -> int:
        """Conditional update; bumps ``updated_at`` and ``version``; returns the rows changed."""

    async def apply_step(self, step: Step) -> StepResult:
        """Apply one pass step atomically (see :class:`~asyncflow.records.Step`)."""

    async def purge_workflow_instances(
        self,
        *,
        updated_before: int,
        statuses: Sequence[str],
        workflow_types: Sequence[str] | None = None,
        limit: int | None = None,
        batch_size: int = 500,
    ) -> int:
        """Delete instances in ``statuses`` last updated before ``updated_before`` (unix seconds) with
        their node rows, ``batch_size`` at a time (one transaction each); returns how many."""
        ...

    async def claim_due_instances(
        self, *, now_ms: int, limit: int, lease_ms: int, workflow_types: Sequence[str] | None = None
    ) -> list[int]:
        """Pick up to ``limit`` instances in ``init``/``running`` with ``next_run_at <= now_ms``.

        Oldest due first. Claimed rows get ``next_run_at = now_ms + lease_ms`` in the same statement
        or transaction, so concurrent claimers (other driver processes) never get the same id.

        A repo may also offer ``claim_due_states`` (same arguments; ``[(id, record or None), ...]``):
        the same claim, with the record of each claimed instance nobody has run yet (no node row,
        version 1, lease epoch 0), which it moves to lease epoch 1. asyncflow's repos do; a driver on
        ``LocalWorkflowLock`` then starts those passes from the records (``LocalWorkflowLock.handoffs``).
        It is not part of this protocol: a repo without it is claimed from as before.
        """

    async def next_due_at(self, workflow_types: Sequence[str] | None = None) -> int | None:
        """The smallest ``next_run_at`` among ``init``/``running`` instances, or ``None``."""


class DueListener(Protocol):
    """Wake-ups for a driver: ``run()`` (a task of the driver's, until cancelled) calls back whenever an
    instance may have become due; ``listening`` tells whether wake-ups arrive right now."""

    @property
    def listening(self) -> bool: ...

    async def run(self) -> None: ...


@runtime_checkable
class ListensDue(Protocol):
    """An optional capability of a repo: wake-ups when instances become due (the driver polls without)."""

    def listen_due(self, callback: Callable[[], None]) -> DueListener | None:
        """A listener calling ``callback()``, or ``None`` when this database has no wake-ups."""


@runtime_checkable
class KeepsLeases(Protocol):
    """An optional capability of a repo: lock leases kept in its own database (``asyncflow_lock``),
    what :class:`~asyncflow.lock.database.DatabaseWorkflowLock` is built on. ``ttl_ms`` counts from
    the moment the database runs the call."""

    async def acquire_lease(self, key: str, holder: str, ttl_ms: int) -> bool:
        """Take ``key`` for ``holder`` if it is free or its lease expired; whether it did."""

    async def renew_leases(self, held: Sequence[tuple[str, str, int]]) -> list[bool]:
        """Extend each ``(key, holder, ttl_ms)`` still held by ``holder`` and unexpired; whether each was."""

    async def release_lease(self, key: str, holder: str) -> bool:
        """Free ``key`` if ``holder`` still holds it; whether it did."""


@runtime_checkable
class ListensFinished(Protocol):
    """An optional capability of a repo: wake-ups when instances end (``wait_for_workflow`` polls without)."""

    def listen_finished(self, callback: Callable[[int | None], None]) -> DueListener | None:
        """A listener calling ``callback(id)`` per ended instance and ``callback(None)`` when it (re)starts
        listening; ``None`` when this database has no wake-ups."""


@runtime_checkable
class WatchesFinished(Protocol):
    """An optional capability of a repo with :class:`ListensFinished`: a waiter's instance is watched,
    so that its end reaches the listeners of every process (a repo without it wakes them for every
    instance that ends, or not at all)."""

    async def watch_finished(self, instance_id: int) -> None:
        """Ask for the wake-up of ``instance_id``'s end; called before the waiter reads the instance,
        so an end from then on wakes it."""


@runtime_checkable
class JoinsSessions(Protocol):
    """An optional capability of a repo: running calls in a caller's SQLAlchemy transaction."""

    def joined(self, session: object) -> AbstractAsyncContextManager[None]:
        """Calls inside the block run in ``session``'s open transaction (``ParamInvalidError`` if it
        has none or is on another database)."""


@runtime_checkable
class StoresSchedules(Protocol):
    """An optional capability of a repo: the state of cron schedules (drivers fire them with it)."""

    async def schedule_states(self) -> dict[str, ScheduleState]:
        """Every schedule a driver has seen, by id."""

    async def register_schedules(self, fingerprints: Mapping[str, str], now_ms: int, since_ms: int) -> None:
        """Record schedules (id: ``Schedule.fingerprint()``) first seen now. One stored with another
        fingerprint recorded before ``since_ms`` starts over (first seen now, no tick fired); one
        recorded since is left as it is; one stored without one keeps its state and takes this one."""

    async def fire_schedule_tick(
        self, schedule_id: str, tick: str, new: NewWorkflowInstance, *, now_ms: int, prune_before: str
    ) -> int | None:
        """Create ``new`` for ``tick`` (one transaction) unless it, or a later tick of the schedule, was
        fired already (``None``)."""
