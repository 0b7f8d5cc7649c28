"""``MemoryWorkflowRepo``: the whole ``WorkflowRepo`` contract in process memory.

A real implementation, not a mock: it passes the same contract suite as the SQL repo. Rows keep their
contexts as canonical JSON text, so callers never alias stored state, and values are accepted or
refused exactly as on SQLite and PostgreSQL (same checks, same normalization). One ``asyncio.Lock``
serializes writers: a ``transaction()`` holds it until it ends and restores a snapshot on rollback.
Nothing is persisted; the data lives as long as the object.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import replace
from operator import attrgetter

from .._held import holds_cancellation
from ..clock import SYSTEM_CLOCK, Clock
from ..errors import DuplicateWorkflowError, InvalidStateError, StoreError, UniqueViolationError
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
    new_step_result,
)
from ..status import RUNNABLE_INSTANCE_STATUSES, TERMINAL_TASK_STATUSES
from . import _prepare as prep
from ._json import (
    check_int,
    check_text,
    check_texts,
    validate_instance_query,
    validate_task_query,
)
from ._memory_leases import MemoryLeases
from ._memory_rows import (
    Instance,
    State,
    Task,
    changed_instance,
    changed_task,
    leased_instance,
    new_instance_row,
    new_task_row,
    paged,
)
from ._records import inserted_task_records
from .migrations import IN_TRANSACTION

__all__ = ["MemoryWorkflowRepo"]

_RUNNABLE = RUNNABLE_INSTANCE_STATUSES
_TERMINAL = TERMINAL_TASK_STATUSES
_CANCELED = prep.TaskChange("canceled", None, None, None)
_DUE_ORDER = attrgetter("next_run_at", "id")  # (next_run_at, id), in C: the claim sorts every due row


class _MemTx:
    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = True


class MemoryWorkflowRepo:
    """The :class:`~asyncflow.store.protocol.WorkflowRepo` in memory (for tests and single processes)."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock: Clock = clock if clock is not None else SYSTEM_CLOCK
        self._state = State({}, {}, {})
        self._leases = MemoryLeases()  # DatabaseWorkflowLock's, outside transactions (never rolled back)
        self._lock = asyncio.Lock()
        self._tx: ContextVar[_MemTx | None] = ContextVar(f"asyncflow_memory_tx_{id(self):x}", default=None)

    def _now(self) -> int:
        return int(self._clock.time())

    async def __aenter__(self) -> MemoryWorkflowRepo:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def migrate(self) -> None:
        """Nothing to create or upgrade (idempotent); inside :meth:`transaction` ``InvalidStateError``,
        as on the SQL repo."""
        if self._joined():
            raise InvalidStateError(IN_TRANSACTION)

    async def create_schema(self) -> None:
        """The same as :meth:`migrate`."""
        await self.migrate()

    async def aclose(self) -> None:
        """Nothing to release; the data stays readable."""

    def _joined(self) -> bool:
        tx = self._tx.get()
        if tx is None:
            return False
        if not tx.active:
            raise StoreError("the transaction() this task runs in has already ended")
        return True

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """One transaction: all or nothing; nested use (and tasks spawned inside) join it."""
        if self._joined():
            yield
            return
        async with self._lock:
            snapshot = self._state.copy()
            tx = _MemTx()
            token = self._tx.set(tx)
            try:
                yield
            except BaseException:
                self._state = snapshot
                raise
            finally:
                tx.active = False
                self._tx.reset(token)

    def _ready(self) -> State | None:
        """The state if this call may use it at once, else ``None`` (enter :meth:`_unit`): inside the
        task's transaction, or while no transaction holds the lock. A call that awaits nothing while it
        uses the state cannot interleave with another, so it needs no lock of its own: the pass's calls
        (apply_step, create, the leased read, the claim) skip ``_unit``'s generator and the lock's
        acquire and release on every step."""
        tx = self._tx.get()
        if tx is not None:
            if not tx.active:
                raise StoreError("the transaction() this task runs in has already ended")
            return self._state
        return None if self._lock.locked() else self._state

    @asynccontextmanager
    async def _unit(self) -> AsyncIterator[State]:
        """The state for one call: inside the open transaction, or once no transaction holds it."""
        if self._joined():
            yield self._state
            return
        async with self._lock:
            yield self._state

    # ------------------------------------------------------------------------------- instances

    def _insert_instance(self, state: State, row: prep.InstanceRow, now: int) -> Instance:
        key = (row.workflow_type, row.business_id)
        if row.unique is not None:
            existing = state.unique_holder(*key, row.unique)
            if existing is not None:
                raise DuplicateWorkflowError(
                    f"a workflow instance of type {row.workflow_type!r} with business id "
                    f"{row.business_id!r} exists (id {existing}; unique={row.unique!r})",
                    instance_id=existing,
                )
            state.unique[key] = (*state.unique.get(key, ()), state.last_instance_id + 1)
        state.last_instance_id = instance_id = state.last_instance_id + 1
        state.instances[instance_id] = instance = new_instance_row(  # positional, in field order
            instance_id,
            row.workflow_type,
            row.business_id,
            row.status,
            row.context,
            row.task_id,
            now,  # created_at
            now,  # updated_at
            row.next_run_at,
            1,  # version
            row.trace_context,
            row.lease_epoch,
            None,  # parent_id
            None,  # parent_node
            None,  # child_key
        )
        if row.status in _RUNNABLE:
            state.runnable.add(instance_id)
        return instance

    async def create_workflow_instance(self, new: NewWorkflowInstance) -> WorkflowInstanceRecord:
        """Insert one instance and return it with its id."""
        row = prep.instance_row(new)
        state = self._ready()
        if state is None:
            async with self._unit() as state:
                return self._insert_instance(state, row, self._now()).record(row.plain)
        return self._insert_instance(state, row, self._now()).record(row.plain)

    async def create_child_instance(
        self, new: NewWorkflowInstance, *, parent_id: int, parent_node: str, child_key: str
    ) -> tuple[WorkflowInstanceRecord, bool]:
        """Insert a child of ``parent_id``'s node ``parent_node`` under ``child_key``, unless that
        triple has a child already; ``(the child, whether this call created it)``."""
        row = prep.instance_row(new)
        key = prep.child_key(parent_id, parent_node, child_key)
        async with self._unit() as state:
            existing = state.children.get(key)
            if existing is not None and existing in state.instances:
                return state.instances[existing].record(), False
            instance = self._insert_instance(state, row, self._now())
            instance = replace(instance, parent_id=key[0], parent_node=key[1], child_key=key[2])
            state.instances[instance.id] = instance
            state.children[key] = instance.id
            return instance.record(), True

    async def query_child_instances(self, parent_id: int) -> list[WorkflowInstanceRecord]:
        """The children of one instance (``af.start_child_workflow``), ordered by id."""
        check_int(parent_id, "parent_id")
        async with self._unit() as state:
            return [
                i.record()
                for i in sorted(state.instances.values(), key=lambda i: i.id)
                if i.parent_id == parent_id
            ]

    async def create_workflow_instances(self, news: Sequence[NewWorkflowInstance]) -> list[int]:
        """Bulk insert; ids in input order."""
        rows = [prep.instance_row(new) for new in news]
        async with self._unit() as state:
            now = self._now()
            return [self._insert_or_existing(state, row, now) for row in rows]

    def _insert_or_existing(self, state: State, row: prep.InstanceRow, now: int) -> int:
        try:
            return self._insert_instance(state, row, now).id
        except DuplicateWorkflowError as duplicate:
            return duplicate.instance_id

    async def get_workflow_instance(self, instance_id: int) -> WorkflowInstanceRecord | None:
        """The instance, or ``None``."""
        check_int(instance_id, "instance_id")
        async with self._unit() as state:
            instance = state.instances.get(instance_id)
            return None if instance is None else instance.record()

    def _matching(self, state: State, params: QueryWorkflowInstanceParams) -> list[Instance]:
        validate_instance_query(params)
        result = []
        for item in state.instances.values():
            if params.workflow_instance_id is not None and item.id != params.workflow_instance_id:
                continue
            if params.workflow_type_in and item.workflow_type not in params.workflow_type_in:
                continue
            if params.business_id is not None and item.business_id != params.business_id:
                continue
            if params.status_in and item.status not in params.status_in:
                continue
            if params.id_greater_than is not None and item.id <= params.id_greater_than:
                continue
            if params.task_id is not None and item.task_id != params.task_id:
                continue
            result.append(item)
        return result

    async def query_workflow_instances(
        self, params: QueryWorkflowInstanceParams
    ) -> list[WorkflowInstanceRecord]:
        """Filtered (AND), ordered by id (descending only for ``order_by_id_asc=False``), paged."""
        async with self._unit() as state:
            rows = self._matching(state, params)
            return [row.record() for row in paged(rows, params.order_by_id_asc, params.page)]

    async def count_workflow_instances(self, params: QueryWorkflowInstanceParams) -> int:
        """How many instances match the filters (paging and order ignored)."""
        async with self._unit() as state:
            return len(self._matching(state, params))

    async def update_workflow_instances(self, where: InstanceWhere, fields: InstanceFields) -> int:
        """Conditional update; bumps ``updated_at`` and ``version``; returns the rows changed."""
        ids, status_in = prep.instance_where(where)
        change = prep.instance_change(fields)
        async with self._unit() as state:
            now = self._now()
            changed = {}
            for instance_id in dict.fromkeys(ids):
                instance = state.instances.get(instance_id)
                if instance is None or (status_in and instance.status not in status_in):
                    continue
                after = changed_instance(instance, change, now)
                # an update outside passes fences the passes in flight
                changed[instance_id] = after = replace(after, lease_epoch=after.lease_epoch + 1)
                if after.status in _RUNNABLE and instance.status not in _RUNNABLE:
                    self._check_reopen(state, after)
            state.instances.update(changed)
            for after in changed.values():
                state.track(after)
            return len(changed)

    @staticmethod
    def _check_reopen(state: State, after: Instance) -> None:
        """As ``uq_workflow_instance_active``: a unique instance made active again must be the only one."""
        key = (after.workflow_type, after.business_id)
        if after.id not in state.unique.get(key, ()):
            return
        holder = state.unique_holder(*key, "active")
        if holder is not None and holder != after.id:
            raise UniqueViolationError(
                f"update_workflow_instances failed: instance {holder} is the active unique instance of {key}"
            )

    # ----------------------------------------------------------------------------------- nodes

    def _insert_task(self, state: State, instance_id: int, row: prep.TaskRow, now: int) -> Task:
        if instance_id not in state.instances:
            raise StoreError(f"create_task_instance failed: no workflow_instance {instance_id} (foreign key)")
        task_type, status, context, fail_count, started_at, _ = row
        if (instance_id, task_type) in state.task_keys:
            raise UniqueViolationError(
                f"create_task_instance failed: instance {instance_id} already has a {task_type!r} row"
            )
        state.last_task_id += 1
        task = new_task_row(  # positional, in field order
            state.last_task_id,
            instance_id,
            task_type,
            status,
            context,
            fail_count,
            now,  # created_at
            now,  # updated_at
            started_at or now,
            1,  # version
        )
        state.add_task(task)
        return task

    async def create_task_instance(self, instance_id: int, new: TaskInsert) -> TaskInstanceRecord:
        """Insert one node row; a duplicate ``(instance, task_type)`` raises ``UniqueViolationError``."""
        check_int(instance_id, "instance_id")
        row = prep.task_row(new)
        async with self._unit() as state:
            return self._insert_task(state, instance_id, row, self._now()).record()

    async def query_task_instances(self, params: QueryTaskInstanceParams) -> list[TaskInstanceRecord]:
        """Filtered (AND) node rows, ordered by id."""
        validate_task_query(params)
        status_in = tuple(params.status_in)
        async with self._unit() as state:
            candidates = (
                state.tasks.values()
                if params.workflow_instance_id is None
                else state.tasks_of(params.workflow_instance_id)
            )
            rows = [
                task
                for task in candidates
                if (params.id is None or task.id == params.id)
                and (
                    params.workflow_instance_id is None
                    or task.workflow_instance_id == params.workflow_instance_id
                )
                and (params.task_type is None or task.task_type == params.task_type)
                and (not status_in or task.status in status_in)
                and (params.id_greater_than is None or task.id > params.id_greater_than)
            ]
            return [row.record() for row in paged(rows, params.order_by_id_asc, params.page)]

    async def load_task_instances(self, instance_id: int) -> list[TaskInstanceRecord]:
        """Every node row of one instance, ordered by id."""
        check_int(instance_id, "instance_id")
        async with self._unit() as state:
            return [row.record() for row in state.tasks_of(instance_id)]

    async def purge_workflow_instances(
        self,
        *,
        updated_before: int,
        statuses: Sequence[str],
        workflow_types: Sequence[str] | None = None,
        limit: int | None = None,
        batch_size: int = 500,
    ) -> int:
        """Delete instances in ``statuses`` last updated before ``updated_before`` (unix seconds), with
        their node rows, at most ``batch_size`` per step (oldest ids first); returns how many. A child
        whose parent is still active stays."""
        total = 0
        while limit is None or total < limit:
            size = batch_size if limit is None else min(batch_size, limit - total)
            async with self._unit() as state:
                ids = sorted(
                    i.id
                    for i in state.instances.values()
                    if i.status in statuses
                    and i.updated_at < updated_before
                    and (workflow_types is None or i.workflow_type in workflow_types)
                    and not _parent_waits(state, i)
                )[:size]
                for instance_id in ids:
                    state.remove_instance(instance_id)
            total += len(ids)
            if len(ids) < size:
                break
            await asyncio.sleep(0)  # let other calls in between batches
        return total

    async def load_instance_state(
        self, instance_id: int, *, lease: bool = False
    ) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None:
        """The instance and every node row of it (ordered by id), read together; ``None`` if missing.

        ``lease=True`` also takes a new lease epoch (``lease_epoch + 1``, returned on the record).
        """
        check_int(instance_id, "instance_id")
        state = self._ready()
        if state is None:
            async with self._unit() as state:
                return self._read_instance(state, instance_id, lease)
        return self._read_instance(state, instance_id, lease)

    @staticmethod
    def _read_instance(
        state: State, instance_id: int, lease: bool
    ) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None:
        instance = state.instances.get(instance_id)
        if instance is None:
            return None
        if lease:
            instance = state.instances[instance_id] = leased_instance(instance)
        tasks = state.tasks
        return instance.record(), [tasks[i].record() for i in state.instance_tasks.get(instance_id, ())]

    def _matching_tasks(self, state: State, filt: prep.TaskFilter) -> Iterable[Task]:
        if filt.ids:
            candidates: Iterable[Task] = (state.tasks[i] for i in dict.fromkeys(filt.ids) if i in state.tasks)
        elif filt.workflow_instance_id is not None:
            candidates = state.tasks_of(filt.workflow_instance_id)
        else:
            candidates = list(state.tasks.values())
        for task in candidates:
            if (
                filt.workflow_instance_id is not None
                and task.workflow_instance_id != filt.workflow_instance_id
            ):
                continue
            if filt.task_type_in and task.task_type not in filt.task_type_in:
                continue
            if filt.status_in and task.status not in filt.status_in:
                continue
            if filt.version is not None and task.version != filt.version:
                continue
            yield task

    async def update_task_instances(self, where: TaskWhere, fields: TaskFields) -> int:
        """Conditional update; bumps ``updated_at`` and ``version``; returns the rows changed."""
        filt = prep.task_filter(where)
        change = prep.task_change(fields)
        async with self._unit() as state:
            now = self._now()
            matched = list(self._matching_tasks(state, filt))
            for task in matched:
                state.tasks[task.id] = changed_task(task, change, now)
            return len(matched)

    # ------------------------------------------------------------------------------------ step

    @holds_cancellation  # nothing is awaited once the state is held: a cancellation never splits it
    async def apply_step(self, step: Step) -> StepResult:
        """Apply one pass step atomically: every condition is checked before anything is written."""
        p = prep.prepared_step(step)
        state = self._ready()
        if state is None:
            async with self._unit() as state:
                return self._step(state, p, self._now())
        return self._step(state, p, self._now())

    @staticmethod
    def _step(state: State, p: prep.PreparedStep, now: int) -> StepResult:
        """:meth:`apply_step` on the held state. (Inline loops, no helpers: every step of every pass.)"""
        instance_id, status_in, change, updates, inserts, cancel, epoch = p
        instance = state.instances.get(instance_id)
        if instance is None or (status_in and instance.status not in status_in):
            return new_step_result(False, (), False)
        if epoch is not None and instance.lease_epoch != epoch:
            return new_step_result(False, (), True)  # stale
        tasks = state.tasks
        for task_id, expected_version, _ in updates:
            task = tasks.get(task_id)
            if task is None or task.workflow_instance_id != instance_id or task.version != expected_version:
                return new_step_result(False, (), False)
        if len(updates) > 1 and len(updates) != len({task_id for task_id, _, _ in updates}):
            return new_step_result(False, (), False)  # the second update of a row sees a stale version
        task_keys = state.task_keys
        if inserts:
            if len(inserts) > 1 and len({row[0] for row in inserts}) != len(inserts):
                return new_step_result(False, (), False)  # two rows of one task_type
            for row in inserts:
                if (instance_id, row[0]) in task_keys:  # row[0]: task_type
                    return new_step_result(False, (), False)
        state.instances[instance_id] = changed_instance(instance, change, now)
        status = change[0]  # the new status (StepChange: status, context, next_run_at)
        if status is not None:  # State.track, inline
            if status in _RUNNABLE:
                state.runnable.add(instance_id)
            else:
                state.runnable.discard(instance_id)
        for task_id, _, task_change in updates:
            tasks[task_id] = changed_task(tasks[task_id], task_change, now)
        if cancel:  # before the inserts: the rows this step writes stay as it writes them
            updated = {task_id for task_id, _, _ in updates}
            for task_id in state.instance_tasks.get(instance_id, ()):
                task = tasks[task_id]
                if task_id not in updated and task.status not in _TERMINAL:
                    tasks[task_id] = changed_task(task, _CANCELED, now)
        if not inserts:
            return new_step_result(True, (), False)
        # State.add_task of each row, inline; the records are built from the rows (as the SQL repos
        # do), their contexts read back from the text (callers never alias a stored context)
        first = state.last_task_id + 1
        state.last_task_id += len(inserts)
        ids = range(first, first + len(inserts))
        for task_id, (task_type, status, context, fail_count, started_at, _) in zip(
            ids, inserts, strict=True
        ):
            tasks[task_id] = new_task_row(  # positional, in field order
                task_id, instance_id, task_type, status, context, fail_count, now, now, started_at or now, 1
            )
            task_keys[(instance_id, task_type)] = task_id
        state.instance_tasks[instance_id] = (*state.instance_tasks.get(instance_id, ()), *ids)
        return new_step_result(True, inserted_task_records(instance_id, ids, inserts, now), False)

    # ---------------------------------------------------------------------------------- driver

    def _due(self, state: State, now_ms: int, types: tuple[str, ...]) -> list[Instance]:
        # the runnable instances only (State.runnable), not every one still stored
        instances = state.instances
        due = [
            item
            for item in map(instances.__getitem__, state.runnable)
            if item.next_run_at <= now_ms and (not types or item.workflow_type in types)
        ]
        return sorted(due, key=_DUE_ORDER)

    async def claim_due_instances(
        self, *, now_ms: int, limit: int, lease_ms: int, workflow_types: Sequence[str] | None = None
    ) -> list[int]:
        """Lease up to ``limit`` due ``init``/``running`` instances, oldest due first."""
        lease, types = prep.claim_args(now_ms, limit, lease_ms, workflow_types)
        async with self._unit() as state:
            picked = self._due(state, now_ms, types)[:limit]
            for item in picked:
                state.instances[item.id] = leased_instance(item, lease)
            return [item.id for item in picked]

    async def claim_due_states(
        self, *, now_ms: int, limit: int, lease_ms: int, workflow_types: Sequence[str] | None = None
    ) -> list[tuple[int, WorkflowInstanceRecord | None]]:
        """:meth:`claim_due_instances`, with the record (as claimed) of each instance nobody has run yet:
        no node row, never leased, never written since its creation; such an instance takes lease
        epoch 1 (the epoch of the pass it is handed to)."""
        lease, types = prep.claim_args(now_ms, limit, lease_ms, workflow_types)
        async with self._unit() as state:
            claimed: list[tuple[int, WorkflowInstanceRecord | None]] = []
            for item in self._due(state, now_ms, types)[:limit]:
                leased = leased_instance(item, lease)
                if item.version == 1 and item.lease_epoch == 0 and not state.instance_tasks.get(item.id):
                    leased = replace(leased, lease_epoch=1)  # the epoch of the pass it is handed to
                    claimed.append((item.id, leased.record()))
                else:
                    claimed.append((item.id, None))
                state.instances[item.id] = leased
            return claimed

    _HANDS_OVER_WITH = (claim_due_states, claim_due_instances, load_instance_state)
    """The claim that hands new instances over, and what it stands for, as this class defines them: a
    driver hands over only while the repo's class still has these (not a subclass's, not a patch)."""

    async def acquire_lease(self, key: str, holder: str, ttl_ms: int) -> bool:
        """Take ``key`` for ``holder`` for ``ttl_ms`` if it is free or expired (DatabaseWorkflowLock)."""
        check_text(key, "key")
        check_text(holder, "holder")
        check_int(ttl_ms, "ttl_ms", minimum=1)
        return self._leases.acquire(key, holder, ttl_ms)

    async def renew_leases(self, held: Sequence[tuple[str, str, int]]) -> list[bool]:
        """Extend each ``(key, holder, ttl_ms)`` still held and unexpired; whether each was."""
        return self._leases.renew(held)

    async def release_lease(self, key: str, holder: str) -> bool:
        """Free ``key`` if ``holder`` still holds it; whether it did."""
        return self._leases.release(key, holder)

    async def next_due_at(self, workflow_types: Sequence[str] | None = None) -> int | None:
        """The smallest ``next_run_at`` among ``init``/``running`` instances, or ``None``."""
        types = check_texts(workflow_types or (), "workflow_types")
        async with self._unit() as state:
            instances = state.instances
            values = [
                item.next_run_at
                for item in map(instances.__getitem__, state.runnable)
                if not types or item.workflow_type in types
            ]
            return min(values) if values else None

    # ------------------------------------------------------------------------------- schedules

    async def schedule_states(self) -> dict[str, ScheduleState]:
        """Every schedule a driver has seen, by id."""
        async with self._unit() as state:
            return dict(state.schedules)

    async def register_schedules(self, fingerprints: Mapping[str, str], now_ms: int, since_ms: int) -> None:
        """Record schedules first seen now; one stored with another fingerprint recorded before
        ``since_ms`` starts over (see :class:`~asyncflow.store.protocol.StoresSchedules`)."""
        ids = check_texts(fingerprints, "schedule id")
        prints = check_texts([fingerprints[schedule_id] for schedule_id in ids], "schedule fingerprint")
        async with self._unit() as state:
            for schedule_id, fingerprint in zip(ids, prints, strict=True):
                known = state.schedules.get(schedule_id)
                if known is None or (
                    known.fingerprint not in (None, fingerprint) and known.first_seen_at < since_ms
                ):
                    state.schedules[schedule_id] = ScheduleState(schedule_id, now_ms, None, fingerprint)
                elif known.fingerprint is None:
                    state.schedules[schedule_id] = replace(known, fingerprint=fingerprint)

    async def fire_schedule_tick(
        self, schedule_id: str, tick: str, new: NewWorkflowInstance, *, now_ms: int, prune_before: str
    ) -> int | None:
        """Create ``new`` for ``tick`` unless that tick, or a later one, was fired already (then ``None``)."""
        row = prep.instance_row(new)
        async with self._unit() as state:
            known = state.schedules.get(schedule_id) or ScheduleState(id=schedule_id, first_seen_at=now_ms)
            if (schedule_id, tick) in state.ticks or (
                known.last_tick is not None and known.last_tick >= tick
            ):
                return None  # fired, or a later tick was (its row may be pruned)
            instance = self._insert_instance(state, row, self._now())
            state.ticks[(schedule_id, tick)] = instance.id
            for key in [key for key in state.ticks if key[0] == schedule_id and key[1] < prune_before]:
                del state.ticks[key]
            if known.last_tick is None or known.last_tick < tick:
                state.schedules[schedule_id] = replace(known, last_tick=tick)
            return instance.id


def _parent_waits(state: State, instance: Instance) -> bool:
    """The instance is a child whose parent is still active (its node may still read the child)."""
    parent = None if instance.parent_id is None else state.instances.get(instance.parent_id)
    return parent is not None and parent.status in RUNNABLE_INSTANCE_STATUSES
