"""``SQLAlchemyWorkflowRepo``: the repo on SQLAlchemy (asyncio), for SQLite and PostgreSQL.

The repo picks its backend once, from the engine's dialect (:func:`asyncflow.store._backend.backend_for`):
:mod:`asyncflow.store.postgres` or :mod:`asyncflow.store.sqlite`, each holding everything its database
does differently: migrations, connections, and the per-instance calls of a workflow pass (create,
get, load, load_instance_state, step, claim), each written once. The repo checks arguments, maps
errors and runs the shared Core statements (queries, counts, updates, node inserts).

Outside ``transaction()`` every call is its own short unit of work: a single statement runs on an
autocommit connection (one round trip, no BEGIN/COMMIT); ``apply_step`` and bulk creates run in a
transaction of their own. Inside ``transaction()`` (in the task that opened it or a task it spawned)
calls share its connection, one at a time, and ``apply_step`` runs in a SAVEPOINT so that a step
that does not apply leaves the outer transaction usable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from .._held import holds_cancellation
from ..clock import SYSTEM_CLOCK, Clock
from ..errors import DuplicateWorkflowError, InvalidStateError, ParamInvalidError, StoreError
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
    new_instance_record,
    new_step_result,
)
from ..status import RUNNABLE_INSTANCE_STATUSES
from . import _prepare as prep
from . import _statements as st
from . import migrations, tables
from ._backend import SqlBackend, backend_for
from ._engine import create_engine_from_url
from ._errors import DB_ERRORS, StaleStep, StepConflict, StoreErrors, store_error
from ._json import (
    check_int,
    check_text,
    check_texts,
    copy_context,
    validate_instance_query,
    validate_task_query,
)
from ._lanes import to_completion
from ._records import inserted_task_record, instance_record, task_record
from ._schedules import SqlSchedules
from ._session import caller_connection
from ._units import ConnectionUnits
from .protocol import DueListener

__all__ = ["SQLAlchemyWorkflowRepo"]

_DUPLICATE_READS = 5
"""Inserts of a unique row at most, while the instance that refuses it is not visible to the insert
(it committed after the insert's snapshot was taken, or ended since)."""


def _duplicate_message(row: prep.InstanceRow, existing: int) -> str:
    which = "an active" if row.unique == "active" else "a"
    return (
        f"{which} workflow instance of type {row.workflow_type!r} with business id {row.business_id!r} "
        f"exists (id {existing}; unique={row.unique!r})"
    )


class SQLAlchemyWorkflowRepo:
    """The :class:`~asyncflow.store.protocol.WorkflowRepo` on SQLAlchemy Core.

    ``engine_or_url`` is an ``AsyncEngine`` (the caller keeps owning it: ``aclose()`` leaves it alone)
    or a URL (the repo builds the engine with ``engine_kwargs`` and disposes it in ``aclose()``).
    ``sqlite://`` and ``postgresql://`` URLs get the aiosqlite / asyncpg drivers. On SQLite the repo
    installs connection settings (WAL, ``busy_timeout``, ``foreign_keys=ON``, ``BEGIN IMMEDIATE``, a
    progress handler that stops a statement cut by a cancellation, whose transaction is then rolled
    back) on the engine, which also affect the caller's own use of an engine it passed in.
    """

    def __init__(
        self, engine_or_url: AsyncEngine | str | URL, *, clock: Clock | None = None, **engine_kwargs: Any
    ) -> None:
        if isinstance(engine_or_url, AsyncEngine):
            if engine_kwargs:
                raise ParamInvalidError("engine keyword arguments need a URL, not an engine")
            self._engine, self._owns_engine = engine_or_url, False
        elif isinstance(engine_or_url, str | URL):
            self._engine = create_engine_from_url(engine_or_url, engine_kwargs)
            self._owns_engine = True
        else:
            raise ParamInvalidError(f"expected an AsyncEngine or a URL, got {type(engine_or_url).__name__}")
        self._clock: Clock = clock if clock is not None else SYSTEM_CLOCK
        try:
            self._backend: SqlBackend = backend_for(self._engine)
        except BaseException:
            if self._owns_engine:
                self._engine.sync_engine.dispose()
            raise
        self._units: ConnectionUnits = self._backend.units
        self._connection = self._units.connection
        self._atomic = self._units.atomic
        self._schedules = SqlSchedules(self._connection, self.transaction, self.create_workflow_instance)

    @property
    def engine(self) -> AsyncEngine:
        """The engine the repo runs on."""
        return self._engine

    @property
    def shared_by_processes(self) -> bool:
        """Whether the backend is a database server that many worker processes usually share
        (PostgreSQL), so that a lock local to one process does not keep one runner per instance;
        ``False`` for an embedded file (SQLite). The CLI picks its default lock by it."""
        return self._backend.shared_by_processes

    def _now(self) -> int:
        return int(self._clock.time())

    # ------------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> SQLAlchemyWorkflowRepo:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def migrate(self) -> None:
        """Create the schema, or upgrade it to :data:`~asyncflow.store.tables.SCHEMA_VERSION`.

        Forward-only: each missing version (:mod:`asyncflow.store.migrations`) is applied in a
        transaction of its own and recorded in ``asyncflow_schema``. Concurrent calls, from any number
        of processes, are safe (an advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite). A
        database recorded with a newer version than this code knows raises ``StoreError``. On a
        database of asyncflow 0.1.0 it keeps every row; on PostgreSQL it installs the step functions
        the repo needs. Version 1 builds the claim index ``ix_workflow_instance_due`` only if it is
        missing, with a plain ``CREATE INDEX`` (blocking writes while it runs: 47 ms for 100,000
        runnable rows on a 2-core test machine); on a large live table made before it existed, build
        it first with ``CREATE INDEX CONCURRENTLY ix_workflow_instance_due ON workflow_instance
        (next_run_at, id) WHERE status IN ('init', 'running')``.

        Inside :meth:`transaction` it raises ``InvalidStateError`` and does nothing: its versions
        would be savepoints of the caller's transaction, committed (and seen by other connections,
        this repo's own among them) only with it, while the schema's lock and the tables' DDL locks
        were held until then, stalling every other migrator and, for some versions, every step.
        """
        if self._units.in_transaction():
            raise InvalidStateError(migrations.IN_TRANSACTION)
        schema = self._backend.schema
        with StoreErrors("migrate"):
            await migrations.migrate(
                self._atomic,
                schema.lock_schema,
                schema.MIGRATIONS,
                self._now,
                schema.has_version_table,
                schema.repair,
            )
        self._backend.migrated()

    async def create_schema(self) -> None:
        """The same as :meth:`migrate` (the 0.1 name)."""
        await self.migrate()

    async def schema_version(self) -> int:
        """The highest schema version recorded in the database (``asyncflow_schema``): 0 when there is
        none yet (no asyncflow tables, or tables made from ``metadata`` by other tools). Below
        :data:`~asyncflow.store.tables.SCHEMA_VERSION`, :meth:`migrate` has versions to apply; above
        it, a newer asyncflow migrated the database."""
        with StoreErrors("schema_version"):
            async with self._connection() as conn:
                if not await self._backend.schema.has_version_table(conn):
                    return 0
                return await migrations.recorded_version(conn)

    async def aclose(self) -> None:
        """Dispose the engine if the repo built it (idempotent); a caller's engine is left alone.

        The engine is disposed even if the wait for the batches in flight is cut (a cancellation, a
        timeout), and the dispose runs to its end even if it is cut itself (the pool stops closing
        its connections at the cut): a later call returns at once, so nothing else would close the
        pooled sessions."""
        if self._units.closed:
            return
        self._units.close()
        try:
            await self._backend.aclose()
        finally:
            if self._owns_engine:
                await to_completion(self._engine.dispose())

    # ---------------------------------------------------------------------------- transactions

    def transaction(self) -> AbstractAsyncContextManager[None]:
        """One transaction: commit on success, roll back on any exception (``CancelledError`` too).

        Nested use (also from tasks spawned inside) joins the outer transaction. A commit failure is
        raised as ``StoreError``. On SQLite the transaction holds the write lock from its start.
        """
        return self._units.transaction()

    @asynccontextmanager
    async def joined(self, session: object) -> AsyncIterator[None]:
        """Calls inside the block run in the transaction of ``session`` (an ``AsyncSession`` or
        ``AsyncConnection`` of the caller, in an open transaction on this repo's database; else
        ``ParamInvalidError``). The caller commits or rolls back; nothing is begun or ended here."""
        conn = await caller_connection(session, self._engine)
        async with self._units.join(conn):
            yield

    # ------------------------------------------------------------------------------- instances

    async def create_workflow_instance(self, new: NewWorkflowInstance) -> WorkflowInstanceRecord:
        """Insert one instance (``created_at = updated_at = now``) and return it with its id.

        With ``new.unique`` set, a unique instance of the same key that refuses it (see
        :class:`~asyncflow.records.NewWorkflowInstance`) raises ``DuplicateWorkflowError`` carrying its
        id; the unique indexes decide, so concurrent creates leave exactly one.
        """
        row = prep.instance_row(new)
        for _ in range(_DUPLICATE_READS):
            now = self._now()
            with StoreErrors("create_workflow_instance"):
                [instance_id] = await self._backend.create([row], now)
                if isinstance(instance_id, prep.Refused):
                    existing = instance_id.existing
                    if existing is None:
                        # it committed after the insert began (or ended since): insert again, which
                        # either sees it or succeeds
                        continue
                    raise DuplicateWorkflowError(_duplicate_message(row, existing), instance_id=existing)
            break
        else:
            raise StoreError(
                f"could not create {row.workflow_type!r}/{row.business_id!r}: keys keep changing"
            )
        return new_instance_record(  # positional (asyncflow._frozen.positional): every create
            instance_id,
            row.workflow_type,
            row.business_id,
            row.status,
            copy_context(row.context, row.plain),
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

    async def create_child_instance(
        self, new: NewWorkflowInstance, *, parent_id: int, parent_node: str, child_key: str
    ) -> tuple[WorkflowInstanceRecord, bool]:
        """Insert a child of ``parent_id``'s node ``parent_node`` under ``child_key``, unless that
        triple has a child already; ``(the child, whether this call created it)``.

        The unique index ``uq_workflow_instance_child`` decides (``INSERT ... ON CONFLICT DO
        NOTHING``), so retries, crashes and concurrent calls leave exactly one child.
        """
        row = prep.instance_row(new)
        parent, node, key = prep.child_key(parent_id, parent_node, child_key)
        names = {"parent_id": parent, "parent_node": node, "child_key": key}
        params = {
            "workflow_type": row.workflow_type,
            "business_id": row.business_id,
            "status": row.status,
            "workflow_context": row.context,
            "task_id": row.task_id,
            "now": self._now(),
            "next_run_at": row.next_run_at,
            "trace_context": row.trace_context,
            **names,
        }
        insert = self._backend.insert_child
        # two single statements, no transaction around them: the insert is atomic by itself, and a
        # row it conflicted with is committed when it returns (PostgreSQL waits for the inserting
        # transaction; SQLite writes one at a time), so the read sees it unless it was deleted since
        for _ in range(_DUPLICATE_READS):
            with StoreErrors("create_child_instance"):
                async with self._connection() as conn:
                    inserted = (await conn.execute(insert, params)).first()
                    if inserted is not None:
                        return instance_record(inserted), True
                    found = (await conn.execute(st.CHILD_OF, names)).first()
            if found is not None:
                return instance_record(found), False
        raise StoreError(f"child {key!r} of node {node!r} of instance {parent}: its row keeps vanishing")

    async def query_child_instances(self, parent_id: int) -> list[WorkflowInstanceRecord]:
        """The children of one instance (``af.start_child_workflow``), ordered by id."""
        check_int(parent_id, "parent_id")
        with StoreErrors("query_child_instances"):
            async with self._connection() as conn:
                rows = (await conn.execute(st.CHILDREN, {"parent_id": parent_id})).all()
        return [instance_record(row) for row in rows]

    async def create_workflow_instances(self, news: Sequence[NewWorkflowInstance]) -> list[int]:
        """Bulk insert in one transaction (a few multi-row statements); ids in input order."""
        rows = [prep.instance_row(new) for new in news]
        if not rows:
            return []
        with StoreErrors("create_workflow_instances"):
            ids = await self._backend.create(rows, self._now())
            return [
                await self._existing_id(row, i) if isinstance(i, prep.Refused) else i
                for row, i in zip(rows, ids, strict=True)
            ]

    async def _existing(self, row: prep.InstanceRow) -> int | None:
        """The unique instance of ``row``'s key that refused it, or ``None`` if it is gone."""
        stmt = st.UNIQUE_ANY if row.unique == "always" else st.UNIQUE_ACTIVE
        async with self._connection() as conn:
            key = {"workflow_type": row.workflow_type, "business_id": row.business_id}
            found: int | None = (await conn.execute(stmt, key)).scalar()
        return found

    async def _existing_id(self, row: prep.InstanceRow, refused: prep.Refused) -> int:
        found = refused.existing or await self._existing(row)
        if found is None:
            raise StoreError(
                f"{row.workflow_type!r}/{row.business_id!r}: a duplicate vanished; create it again"
            )
        return found

    async def get_workflow_instance(self, instance_id: int) -> WorkflowInstanceRecord | None:
        """The instance, or ``None``."""
        check_int(instance_id, "instance_id")
        with StoreErrors("get_workflow_instance"):
            return await self._backend.get(instance_id)

    async def query_workflow_instances(
        self, params: QueryWorkflowInstanceParams
    ) -> list[WorkflowInstanceRecord]:
        """Filtered (AND), ordered by id (ascending unless ``order_by_id_asc`` is False), paged."""
        validate_instance_query(params)
        query = st.query_instances(params)
        with StoreErrors("query_workflow_instances"):
            async with self._connection() as conn:
                rows = (await conn.execute(query)).all()
        return [instance_record(row) for row in rows]

    async def count_workflow_instances(self, params: QueryWorkflowInstanceParams) -> int:
        """How many instances match the filters (paging and order ignored)."""
        validate_instance_query(params)
        query = st.count_instances(params)
        with StoreErrors("count_workflow_instances"):
            async with self._connection() as conn:
                count: int = (await conn.execute(query)).scalar_one()
        return count

    async def update_workflow_instances(self, where: InstanceWhere, fields: InstanceFields) -> int:
        """Conditional update; bumps ``updated_at`` and ``version``; returns the rows changed."""
        ids, status_in = prep.instance_where(where)
        change = prep.instance_change(fields)
        params = st.instance_change_params(change, self._now())
        params["p_ids"] = list(ids)
        stmt = st.UPDATE_INSTANCES
        if status_in:
            stmt, params["p_status_in"] = st.UPDATE_INSTANCES_IN_STATUS, list(status_in)
        with StoreErrors("update_workflow_instances"):
            async with self._connection() as conn:
                changed: int = (await conn.execute(stmt, params)).rowcount
                return changed

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
        their node rows: at most ``batch_size`` per transaction (oldest ids first), so no lock is held
        long; returns how many. Each batch re-checks the filter in its ``DELETE``, so an instance
        restarted meanwhile stays. A child whose parent is still active stays too: the parent's node
        reads it once its siblings have ended."""
        wi, ti = tables.workflow_instance, tables.task_instance
        parent = wi.alias("parent")
        waits = select(parent.c.id).where(
            parent.c.id == wi.c.parent_id, parent.c.status.in_(RUNNABLE_INSTANCE_STATUSES)
        )
        cond = [wi.c.status.in_(list(statuses)), wi.c.updated_at < updated_before, ~waits.exists()]
        if workflow_types is not None:
            cond.append(wi.c.workflow_type.in_(list(workflow_types)))
        total = 0
        while limit is None or total < limit:
            size = batch_size if limit is None else min(batch_size, limit - total)
            batch = select(wi.c.id).where(*cond).order_by(wi.c.id).limit(size).scalar_subquery()
            with StoreErrors("purge_workflow_instances"):
                async with self._units.atomic() as conn:
                    gone = delete(wi).where(wi.c.id.in_(batch), *cond).returning(wi.c.id)
                    ids = list((await conn.execute(gone)).scalars())
                    if ids:  # PostgreSQL's trigger did it; SQLite may run without foreign keys
                        await conn.execute(delete(ti).where(ti.c.workflow_instance_id.in_(ids)))
            total += len(ids)
            if len(ids) < size:
                break
        return total

    # ----------------------------------------------------------------------------------- nodes

    async def create_task_instance(self, instance_id: int, new: TaskInsert) -> TaskInstanceRecord:
        """Insert one node row; a duplicate ``(instance, task_type)`` raises ``UniqueViolationError``."""
        check_int(instance_id, "instance_id")
        row = prep.task_row(new)
        now = self._now()
        with StoreErrors("create_task_instance"):
            async with self._connection() as conn:
                result = await conn.execute(self._backend.insert_task, st.task_params(instance_id, row, now))
                task_id = result.scalar_one_or_none()
        if task_id is None:
            raise StoreError(f"create_task_instance failed: no workflow_instance {instance_id} (foreign key)")
        return inserted_task_record(task_id, instance_id, row, now)

    async def query_task_instances(self, params: QueryTaskInstanceParams) -> list[TaskInstanceRecord]:
        """Filtered (AND) node rows, ordered by id."""
        validate_task_query(params)
        query = st.query_tasks(params)
        with StoreErrors("query_task_instances"):
            async with self._connection() as conn:
                rows = (await conn.execute(query)).all()
        return [task_record(row) for row in rows]

    async def load_task_instances(self, instance_id: int) -> list[TaskInstanceRecord]:
        """Every node row of one instance, ordered by id."""
        check_int(instance_id, "instance_id")
        with StoreErrors("load_task_instances"):
            return await self._backend.load(instance_id)

    async def load_instance_state(
        self, instance_id: int, *, lease: bool = False
    ) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None:
        """The instance and every node row of it (ordered by id), read together; ``None`` if missing.

        One statement on PostgreSQL (concurrent reads share it), one read transaction on SQLite.
        ``lease=True`` (a pass's first read) also takes a new lease epoch in the same statement
        (transaction on SQLite): ``lease_epoch + 1``, returned on the record.
        """
        check_int(instance_id, "instance_id")
        with StoreErrors("load_instance_state"):
            return await self._backend.load_state(instance_id, bool(lease))

    async def update_task_instances(self, where: TaskWhere, fields: TaskFields) -> int:
        """Conditional update; bumps ``updated_at`` and ``version``; returns the rows changed."""
        filt = prep.task_filter(where)
        params = st.task_change_params(prep.task_change(fields), self._now())
        stmt = st.update_tasks(
            bool(filt.ids),
            filt.workflow_instance_id is not None,
            bool(filt.task_type_in),
            bool(filt.status_in),
            filt.version is not None,
        )
        params.update(
            p_ids=list(filt.ids),
            p_instance=filt.workflow_instance_id,
            p_task_type_in=list(filt.task_type_in),
            p_status_in=list(filt.status_in),
            p_version=filt.version,
        )
        with StoreErrors("update_task_instances"):
            async with self._connection() as conn:
                changed: int = (await conn.execute(stmt, params)).rowcount
                return changed

    # ------------------------------------------------------------------------------------ step

    @holds_cancellation
    async def apply_step(self, step: Step) -> StepResult:
        """Apply one pass step atomically (see :class:`~asyncflow.records.Step`).

        Called by the engine's pass (``asyncflow._held.HOLD_STEPS`` set), a cancellation of the caller
        while the step is in flight waits for it: a step that was written is returned and the
        cancellation raised at the caller's next ``await``. Other callers get the cancellation at once
        (the statement in flight may still land).

        Order: the instance row (which also takes its row lock on PostgreSQL, so a concurrent cancel
        serializes against the step), the node updates, the inserts, then ``cancel_other_tasks``. A
        failed condition rolls everything back: ``applied=False``. On PostgreSQL the step is one call
        of the ``asyncflow_step_v1()`` function that ``migrate()`` installs (with
        ``asyncflow_steps_v1()``, which applies concurrent steps in one statement, each on its own).
        """
        prepared = prep.prepared_step(step)
        try:  # StoreErrors("apply_step") without its context manager (every step of every pass)
            inserted = await self._backend.apply_step(prepared, int(self._clock.time()))
        except StepConflict as conflict:
            return StepResult(applied=False, stale=isinstance(conflict, StaleStep))
        except DB_ERRORS as error:
            wrapped = store_error(error, "apply_step")
            raise wrapped from wrapped.__cause__
        return new_step_result(True, inserted, False)  # applied; positional (asyncflow._frozen): every step

    # ---------------------------------------------------------------------------------- driver

    async def claim_due_instances(
        self, *, now_ms: int, limit: int, lease_ms: int, workflow_types: Sequence[str] | None = None
    ) -> list[int]:
        """Lease up to ``limit`` due ``init``/``running`` instances, oldest due first.

        Claimed rows get ``next_run_at = now_ms + lease_ms`` in the same statement (PostgreSQL, with
        ``FOR UPDATE SKIP LOCKED``) or the same write transaction (SQLite), so concurrent claimers
        never get the same id. A claim is a lease, not a change: ``updated_at``/``version`` stay.
        """
        _, types = prep.claim_args(now_ms, limit, lease_ms, workflow_types)
        if limit == 0:
            return []
        with StoreErrors("claim_due_instances"):
            return await self._backend.claim(now_ms=now_ms, limit=limit, lease_ms=lease_ms, types=types)

    async def claim_due_states(
        self, *, now_ms: int, limit: int, lease_ms: int, workflow_types: Sequence[str] | None = None
    ) -> list[tuple[int, WorkflowInstanceRecord | None]]:
        """:meth:`claim_due_instances`, and with each claimed instance that nobody has run yet (no node
        row; never leased, never written since its creation) its record as claimed; ``None`` for the
        others. A driver on an in-process lock starts such an instance's pass from the record
        (``LocalWorkflowLock.handoffs``). PostgreSQL: one call of ``asyncflow_claim_states_v1`` (without
        it, ``asyncflow_claim_v1`` and no records, until ``migrate()``); SQLite: the claim's transaction."""
        _, types = prep.claim_args(now_ms, limit, lease_ms, workflow_types)
        if limit == 0:
            return []
        with StoreErrors("claim_due_states"):
            return await self._backend.claim_states(
                now_ms=now_ms, limit=limit, lease_ms=lease_ms, types=types
            )

    _HANDS_OVER_WITH = (claim_due_states, claim_due_instances, load_instance_state)
    """The claim that hands new instances over, and what it stands for, as this class defines them: a
    driver hands over only while the repo's class still has these (not a subclass's, not a patch)."""

    async def next_due_at(self, workflow_types: Sequence[str] | None = None) -> int | None:
        """The smallest ``next_run_at`` among ``init``/``running`` instances, or ``None``."""
        types = check_texts(workflow_types or (), "workflow_types")
        stmt, params = (st.NEXT_DUE_TYPED, {"types": list(types)}) if types else (st.NEXT_DUE, {})
        with StoreErrors("next_due_at"):
            async with self._connection() as conn:
                value: int | None = (await conn.execute(stmt, params)).scalar()
        return value

    # ---------------------------------------------------------------------------------- leases

    async def acquire_lease(self, key: str, holder: str, ttl_ms: int) -> bool:
        """Take ``key`` for ``holder`` for ``ttl_ms`` if it is free or expired (``asyncflow_lock``).

        What :class:`~asyncflow.lock.database.DatabaseWorkflowLock` is built on. On PostgreSQL the
        lease calls run on a connection of their own (never in ``transaction()``) and expiry is the
        database's clock; on SQLite the host's clock.
        """
        check_text(key, "key")
        check_text(holder, "holder")
        check_int(ttl_ms, "ttl_ms", minimum=1)
        with StoreErrors("acquire_lease"):
            return await self._backend.acquire_lease(key, holder, ttl_ms)

    async def renew_leases(self, held: Sequence[tuple[str, str, int]]) -> list[bool]:
        """Extend each ``(key, holder, ttl_ms)`` still held and unexpired; whether each was."""
        if not held:
            return []
        with StoreErrors("renew_leases"):
            return await self._backend.renew_leases(list(held))

    async def release_lease(self, key: str, holder: str) -> bool:
        """Free ``key`` if ``holder`` still holds it; whether it did."""
        with StoreErrors("release_lease"):
            return await self._backend.release_lease(key, holder)

    def listen_due(self, callback: Callable[[], None]) -> DueListener | None:
        """Wake-ups for a driver, if the backend has them (PostgreSQL's LISTEN/NOTIFY), else ``None``.

        The returned object's ``run()`` (a task of the caller's) calls ``callback()`` whenever an
        instance may have become due; ``listening`` tells whether wake-ups arrive right now.
        """
        return self._backend.listen_due(callback)

    def listen_finished(self, callback: Callable[[int | None], None]) -> DueListener | None:
        """Wake-ups for ``wait_for_workflow`` (PostgreSQL's LISTEN/NOTIFY), else ``None``.

        The returned object's ``run()`` calls ``callback(instance_id)`` when an instance ends in any
        process, and ``callback(None)`` when listening (re)starts.
        """
        return self._backend.listen_finished(callback)

    async def watch_finished(self, instance_id: int) -> None:
        """Ask that ``instance_id``'s end wakes listeners in every process (``wait_for_workflow`` calls
        it before it reads the instance). On PostgreSQL it sets ``workflow_instance.notify_finished``
        unless the instance has ended already: only flagged instances NOTIFY ``asyncflow_finished``.
        Always outside ``transaction()``; nothing on SQLite."""
        with StoreErrors("watch_finished"):
            await self._backend.watch_finished(instance_id)

    # ------------------------------------------------------------------------------- schedules

    async def schedule_states(self) -> dict[str, ScheduleState]:
        """Every schedule a driver has seen, by id."""
        with StoreErrors("schedule_states"):
            return await self._schedules.states()

    async def register_schedules(self, fingerprints: Mapping[str, str], now_ms: int, since_ms: int) -> None:
        """Record schedules first seen now; one stored with another fingerprint recorded before
        ``since_ms`` starts over (see :class:`~asyncflow.store.protocol.StoresSchedules`)."""
        with StoreErrors("register_schedules"):
            await self._schedules.register(fingerprints, now_ms, since_ms)

    async def fire_schedule_tick(
        self, schedule_id: str, tick: str, new: NewWorkflowInstance, *, now_ms: int, prune_before: str
    ) -> int | None:
        """Create ``new`` for ``tick`` unless that tick, or a later one, was fired already (then
        ``None``), in one transaction with the tick's row, whose primary key lets exactly one caller
        fire it."""
        with StoreErrors("fire_schedule_tick"):
            return await self._schedules.fire(schedule_id, tick, new, now_ms, prune_before)
