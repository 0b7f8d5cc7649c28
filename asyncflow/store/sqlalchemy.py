"""``SQLAlchemyWorkflowRepo``: the repo on SQLAlchemy Core (asyncio), for SQLite and PostgreSQL.

One code path serves ``sqlite+aiosqlite://`` and ``postgresql+asyncpg://``; what differs lives in
:mod:`asyncflow.store._dialect`. Outside ``transaction()`` every call is its own short unit of work: a
single statement runs on an autocommit connection (one round trip, no BEGIN/COMMIT); ``apply_step`` and
bulk creates run in a transaction of their own. Inside ``transaction()`` (in the task that opened it
or a task it spawned) calls share its connection, one at a time, and ``apply_step`` runs in a
SAVEPOINT so that a step that does not apply leaves the outer transaction usable.

The calls a workflow pass makes (create, get, load, load_instance_state, step, claim) take a faster
route outside ``transaction()``, with the same semantics: one driver-level unit each, and on
PostgreSQL concurrent creates, pass reads and steps grouped into one statement per kind
(:mod:`asyncflow.store._hot`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ParamInvalidError
from ..records import (
    InstanceFields,
    InstanceWhere,
    NewWorkflowInstance,
    QueryTaskInstanceParams,
    QueryWorkflowInstanceParams,
    Step,
    StepResult,
    TaskFields,
    TaskInsert,
    TaskInstanceRecord,
    TaskWhere,
    WorkflowInstanceRecord,
)
from . import _dialect, migrations
from . import _prepare as prep
from . import _statements as st
from ._core_step import StepConflict, apply_core
from ._hot import FunctionMissing, HotPath
from ._json import check_int, check_texts, copy_context, validate_instance_query, validate_task_query
from ._units import ConnectionUnits, StoreErrors
from .postgres import schema as pg_schema
from .sqlite import schema as sqlite_schema

__all__ = ["SQLAlchemyWorkflowRepo"]

BULK_PAGE_SIZE = 2000
"""Rows per multi-row INSERT of ``create_workflow_instances`` (9 parameters a row, under both limits)."""


class SQLAlchemyWorkflowRepo:
    """The :class:`~asyncflow.store.protocol.WorkflowRepo` on SQLAlchemy Core.

    ``engine_or_url`` is an ``AsyncEngine`` (the caller keeps owning it: ``aclose()`` leaves it alone)
    or a URL (the repo builds the engine with ``engine_kwargs`` and disposes it in ``aclose()``).
    ``sqlite://`` and ``postgresql://`` URLs get the aiosqlite / asyncpg drivers. On SQLite the repo
    installs connection settings (WAL, ``busy_timeout``, ``foreign_keys=ON``, ``BEGIN IMMEDIATE``) on
    the engine, which also affect the caller's own use of an engine it passed in.
    """

    def __init__(
        self, engine_or_url: AsyncEngine | str | URL, *, clock: Clock | None = None, **engine_kwargs: Any
    ) -> None:
        if isinstance(engine_or_url, AsyncEngine):
            if engine_kwargs:
                raise ParamInvalidError("engine keyword arguments need a URL, not an engine")
            self._engine, self._owns_engine = engine_or_url, False
        elif isinstance(engine_or_url, str | URL):
            self._engine = _dialect.create_engine_from_url(engine_or_url, engine_kwargs)
            self._owns_engine = True
        else:
            raise ParamInvalidError(f"expected an AsyncEngine or a URL, got {type(engine_or_url).__name__}")
        _dialect.configure_engine(self._engine)
        self._units = ConnectionUnits(self._engine)
        self._connection = self._units.connection
        self._atomic = self._units.atomic
        self._claim_is_one_statement = _dialect.claim_is_one_statement(self._engine)
        self._hot = HotPath(self._units, self._engine)
        self._clock: Clock = clock if clock is not None else SYSTEM_CLOCK
        self._schema = pg_schema if self._engine.dialect.name == "postgresql" else sqlite_schema

    @property
    def engine(self) -> AsyncEngine:
        """The engine the repo runs on."""
        return self._engine

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
        """
        schema = self._schema
        with StoreErrors("migrate"):
            await migrations.migrate(
                self._atomic, schema.lock_schema, schema.MIGRATIONS, self._now, schema.REPAIR
            )
        self._hot.step_function = self._hot.kind == "pg"
        if self._hot.pg_batches is not None:
            self._hot.pg_batches.enabled = True

    async def create_schema(self) -> None:
        """The same as :meth:`migrate` (the 0.1 name)."""
        await self.migrate()

    async def aclose(self) -> None:
        """Dispose the engine if the repo built it (idempotent); a caller's engine is left alone."""
        if self._units.closed:
            return
        await self._hot.aclose()
        await self._units.close()
        if self._owns_engine:
            await self._engine.dispose()

    # ---------------------------------------------------------------------------- transactions

    def transaction(self) -> AbstractAsyncContextManager[None]:
        """One transaction: commit on success, roll back on any exception (``CancelledError`` too).

        Nested use (also from tasks spawned inside) joins the outer transaction. A commit failure is
        raised as ``StoreError``. On SQLite the transaction holds the write lock from its start.
        """
        return self._units.transaction()

    # ------------------------------------------------------------------------------- instances

    async def create_workflow_instance(self, new: NewWorkflowInstance) -> WorkflowInstanceRecord:
        """Insert one instance (``created_at = updated_at = now``) and return it with its id."""
        row = prep.instance_row(new)
        now = self._now()
        with StoreErrors("create_workflow_instance"):
            if self._hot.usable():
                instance_id = await self._hot.create(row, now)
            else:
                async with self._connection() as conn:
                    result = await conn.execute(st.INSERT_INSTANCE, st.instance_params(row, now))
                    instance_id = result.scalar_one()
        return WorkflowInstanceRecord(
            id=instance_id,
            workflow_type=row.workflow_type,
            business_id=row.business_id,
            status=row.status,
            workflow_context=copy_context(row.context),
            task_id=row.task_id,
            created_at=now,
            updated_at=now,
            next_run_at=row.next_run_at,
            version=1,
        )

    async def create_workflow_instances(self, news: Sequence[NewWorkflowInstance]) -> list[int]:
        """Bulk insert: one multi-row ``INSERT ... RETURNING id`` per page, all in one transaction."""
        rows = [prep.instance_row(new) for new in news]
        if not rows:
            return []
        now = self._now()
        params = [st.instance_params(row, now) for row in rows]
        ids: list[int] = []
        with StoreErrors("create_workflow_instances"):
            async with self._atomic() as conn:
                for start in range(0, len(params), BULK_PAGE_SIZE):
                    page = params[start : start + BULK_PAGE_SIZE]
                    result = await conn.execute(st.INSERT_INSTANCE, page)
                    # ids come from one sequence in VALUES order: sorted ids are the input order
                    ids.extend(sorted(result.scalars().all()))
        return ids

    async def get_workflow_instance(self, instance_id: int) -> WorkflowInstanceRecord | None:
        """The instance, or ``None``."""
        check_int(instance_id, "instance_id")
        with StoreErrors("get_workflow_instance"):
            if self._hot.usable():
                return await self._hot.get(instance_id)
            async with self._connection() as conn:
                row = (await conn.execute(st.GET_INSTANCE, {"id": instance_id})).first()
        return None if row is None else st.instance_record(row)

    async def query_workflow_instances(
        self, params: QueryWorkflowInstanceParams
    ) -> list[WorkflowInstanceRecord]:
        """Filtered (AND), ordered by id (ascending unless ``order_by_id_asc`` is False), paged."""
        validate_instance_query(params)
        query = st.query_instances(params)
        with StoreErrors("query_workflow_instances"):
            async with self._connection() as conn:
                rows = (await conn.execute(query)).all()
        return [st.instance_record(row) for row in rows]

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
                return (await conn.execute(stmt, params)).rowcount

    # ----------------------------------------------------------------------------------- nodes

    async def create_task_instance(self, instance_id: int, new: TaskInsert) -> TaskInstanceRecord:
        """Insert one node row; a duplicate ``(instance, task_type)`` raises ``UniqueViolationError``."""
        check_int(instance_id, "instance_id")
        row = prep.task_row(new)
        now = self._now()
        with StoreErrors("create_task_instance"):
            async with self._connection() as conn:
                result = await conn.execute(st.INSERT_TASK, st.task_params(instance_id, row, now))
                task_id = result.scalar_one()
        return st.inserted_task_record(task_id, instance_id, row, now)

    async def query_task_instances(self, params: QueryTaskInstanceParams) -> list[TaskInstanceRecord]:
        """Filtered (AND) node rows, ordered by id."""
        validate_task_query(params)
        query = st.query_tasks(params)
        with StoreErrors("query_task_instances"):
            async with self._connection() as conn:
                rows = (await conn.execute(query)).all()
        return [st.task_record(row) for row in rows]

    async def load_task_instances(self, instance_id: int) -> list[TaskInstanceRecord]:
        """Every node row of one instance, ordered by id."""
        check_int(instance_id, "instance_id")
        with StoreErrors("load_task_instances"):
            if self._hot.usable():
                return await self._hot.load(instance_id)
            async with self._connection() as conn:
                rows = (await conn.execute(st.LOAD_TASKS, {"workflow_instance_id": instance_id})).all()
        return [st.task_record(row) for row in rows]

    async def load_instance_state(
        self, instance_id: int
    ) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None:
        """The instance and every node row of it (ordered by id), read together; ``None`` if missing.

        One statement on PostgreSQL (concurrent reads share it), one read transaction on SQLite.
        """
        check_int(instance_id, "instance_id")
        with StoreErrors("load_instance_state"):
            if self._hot.usable():
                return await self._hot.load_state(instance_id)
            async with self._atomic() as conn:
                row = (await conn.execute(st.GET_INSTANCE, {"id": instance_id})).first()
                if row is None:
                    return None
                tasks = (await conn.execute(st.LOAD_TASKS, {"workflow_instance_id": instance_id})).all()
        return st.instance_record(row), [st.task_record(task) for task in tasks]

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
                return (await conn.execute(stmt, params)).rowcount

    # ------------------------------------------------------------------------------------ step

    async def apply_step(self, step: Step) -> StepResult:
        """Apply one pass step atomically (see :class:`~asyncflow.records.Step`).

        Order: the instance row (which also takes its row lock on PostgreSQL, so a concurrent cancel
        serializes against the step), the node updates, the inserts, then ``cancel_other_tasks``. A
        failed condition rolls everything back: ``applied=False``. On PostgreSQL the step is one call
        of the ``asyncflow_step_v1()`` function that ``create_schema()`` installs (with
        ``asyncflow_steps_v1()``, which applies concurrent steps in one statement, each on its own).
        """
        prepared = prep.prepared_step(step)
        now = self._now()
        try:
            with StoreErrors("apply_step"):
                inserted = await self._apply(prepared, now)
        except StepConflict:
            return StepResult(applied=False)
        return StepResult(applied=True, inserted=inserted)

    async def _apply(self, step: prep.PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]:
        hot = self._hot
        try:
            if hot.steps_usable():
                return await hot.apply(step, now)
            if hot.function_in_transaction():
                async with self._atomic() as conn:
                    return await hot.apply_on(conn, step, now)
        except FunctionMissing:
            pass
        async with self._atomic() as conn:
            return await apply_core(conn, step, now)

    # ---------------------------------------------------------------------------------- driver

    async def claim_due_instances(
        self, *, now_ms: int, limit: int, lease_ms: int, workflow_types: Sequence[str] | None = None
    ) -> list[int]:
        """Lease up to ``limit`` due ``init``/``running`` instances, oldest due first.

        Claimed rows get ``next_run_at = now_ms + lease_ms`` in the same statement (PostgreSQL, with
        ``FOR UPDATE SKIP LOCKED``) or the same write transaction (SQLite), so concurrent claimers
        never get the same id. A claim is a lease, not a change: ``updated_at``/``version`` stay.
        """
        check_int(now_ms, "now_ms", minimum=0)
        check_int(lease_ms, "lease_ms", minimum=0)
        check_int(now_ms + lease_ms, "now_ms + lease_ms", minimum=0)
        if check_int(limit, "limit", minimum=0) == 0:
            return []
        types = check_texts(workflow_types or (), "workflow_types")
        if self._hot.usable():
            with StoreErrors("claim_due_instances"):
                return await self._hot.claim(now_ms=now_ms, limit=limit, lease_ms=lease_ms, types=types)
        unit = self._connection() if self._claim_is_one_statement else self._atomic()
        with StoreErrors("claim_due_instances"):
            async with unit as conn:
                return await _dialect.claim_due(
                    conn, now_ms=now_ms, limit=limit, lease_ms=lease_ms, types=types
                )

    async def next_due_at(self, workflow_types: Sequence[str] | None = None) -> int | None:
        """The smallest ``next_run_at`` among ``init``/``running`` instances, or ``None``."""
        types = check_texts(workflow_types or (), "workflow_types")
        stmt, params = (st.NEXT_DUE_TYPED, {"types": list(types)}) if types else (st.NEXT_DUE, {})
        with StoreErrors("next_due_at"):
            async with self._connection() as conn:
                value: int | None = (await conn.execute(stmt, params)).scalar()
        return value
