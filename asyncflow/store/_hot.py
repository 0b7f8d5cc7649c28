"""The SQL repo's hot path: create, get, load, step and claim as one driver-level unit each.

Outside ``transaction()`` these calls bypass SQLAlchemy's per-statement machinery and run on a kept
connection (:mod:`asyncflow.store._lanes`): on PostgreSQL one autocommit statement on asyncpg
(:mod:`asyncflow.store._pg_fast`), on SQLite one trip to aiosqlite's thread
(:mod:`asyncflow.store._sqlite_fast`). On PostgreSQL, calls of one kind that wait at the same time
share one statement (:mod:`asyncflow.store._pg_batch`): steps (one commit, each step in a
subtransaction of its own), creates (one multi-row insert) and pass reads (``load_instance_state``:
instances and node rows of several passes). Inside ``transaction()`` the repo uses
its Core statements on the transaction's connection, except that a PostgreSQL step still runs the
step function (in the SAVEPOINT the repo opens around it). Units that bypass SQLAlchemy are reported
to :mod:`asyncflow.store._observers`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..errors import StoreError
from ..records import TaskInstanceRecord, WorkflowInstanceRecord
from . import _pg_fast as pg
from . import _sqlite_fast as lite
from ._batcher import StepBatcher
from ._core_step import StepConflict
from ._dialect import sqlstate
from ._observers import notify
from ._pg_batch import BATCH_SLOTS, MAX_BATCH, RUN_ALONE, PgCreateBatches, PgStateReads, PgStepBatches
from ._prepare import InstanceRow, PreparedStep
from ._units import ConnectionUnits

__all__ = ["FunctionMissing", "HotPath"]

logger = logging.getLogger(__name__)


class FunctionMissing(Exception):
    """The database has no step function (schema made without ``create_schema()``): use Core."""


class HotPath:
    """Dispatches the hot-path calls to the backend's driver-level implementation."""

    def __init__(self, units: ConnectionUnits, engine: AsyncEngine) -> None:
        self._units = units
        self._engine = engine.sync_engine
        dialect = engine.dialect
        self.kind: str | None = None
        if dialect.name == "postgresql" and dialect.driver == "asyncpg":
            self.kind = "pg"
        elif dialect.name == "sqlite" and dialect.driver == "aiosqlite" and lite.SUPPORTED:
            self.kind = "sqlite"
        self.step_function = self.kind == "pg"  # until the database says it has none
        lanes = units.pg_lanes
        self.pg_batches: PgStepBatches | None = None
        self._batcher: StepBatcher[Any] | None = None
        self._creates: StepBatcher[Any] | None = None
        self._reads: StepBatcher[Any] | None = None
        if self.kind == "pg" and lanes is not None and lanes.limit > 0:
            self.pg_batches = PgStepBatches(lanes)
            slots = min(BATCH_SLOTS, lanes.limit)
            self._batcher = StepBatcher(self.pg_batches, slots=slots, max_batch=MAX_BATCH)
            self._creates = StepBatcher(PgCreateBatches(lanes), slots=slots, max_batch=MAX_BATCH)
            self._reads = StepBatcher(PgStateReads(lanes), slots=slots, max_batch=MAX_BATCH)
        elif self.kind == "sqlite":  # one writer at a time: one batch in flight, the rest gather
            self._batcher = StepBatcher(self._sqlite_batch, slots=1, max_batch=lite.MAX_BATCH)

    def usable(self) -> bool:
        """Whether this call can take the hot path (raises ``StoreError`` if the repo is closed)."""
        return not self._units.in_transaction() and self.kind is not None

    def steps_usable(self) -> bool:
        """Whether ``apply_step`` can take the hot path."""
        return self.usable() and (self.kind == "sqlite" or self.step_function)

    def function_in_transaction(self) -> bool:
        """Whether ``apply_step`` inside ``transaction()`` runs the PostgreSQL step function."""
        return self.kind == "pg" and self.step_function

    async def _sqlite(self, fn: Any, *args: Any) -> Any:
        async with self._units.lane() as aio:
            return await lite.run(aio, fn, *args)

    async def create(self, row: InstanceRow, now: int) -> int:
        """Insert one instance; its id."""
        if self.kind == "pg":
            outcome: Any = RUN_ALONE
            if self._creates is not None:
                self._check_open()
                outcome = await self._creates.submit(0, (row, now))
            if outcome is RUN_ALONE:
                async with self._units.lane() as conn:
                    outcome = await pg.create_instance(conn, row, now)
            instance_id: int = outcome
        else:
            instance_id = await self._sqlite(lite.create_instance, row, now)
        notify(self._engine, True)
        return instance_id

    async def get(self, instance_id: int) -> WorkflowInstanceRecord | None:
        """The instance, or ``None``."""
        if self.kind == "pg":
            async with self._units.lane() as conn:
                record = await pg.get_instance(conn, instance_id)
        else:
            record = await self._sqlite(lite.get_instance, instance_id)
        notify(self._engine, False)
        return record

    async def load_state(
        self, instance_id: int
    ) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None:
        """The instance and its node rows (ordered by id) in one unit, or ``None``."""
        state: tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None
        if self.kind == "pg":
            if self._reads is not None:
                self._check_open()
                state = await self._reads.submit(instance_id, instance_id)
            else:
                async with self._units.lane() as conn:
                    state = (await pg.load_states(conn, (instance_id,))).get(instance_id)
        else:
            state = await self._sqlite(lite.load_state, instance_id)
        notify(self._engine, False)
        return state

    def _check_open(self) -> None:
        if self._units.closed:
            raise StoreError("the repo is closed")

    async def load(self, instance_id: int) -> list[TaskInstanceRecord]:
        """Every node row of one instance, ordered by id."""
        if self.kind == "pg":
            async with self._units.lane() as conn:
                rows = await pg.load_tasks(conn, instance_id)
        else:
            rows = await self._sqlite(lite.load_tasks, instance_id)
        notify(self._engine, False)
        return rows

    async def apply(self, step: PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]:
        """Apply a step; ``StepConflict`` if a condition failed (nothing written)."""
        if self.kind == "pg":
            try:
                inserted = await self._apply_pg(step, now)
            except Exception as error:
                self._step_error(error)
                raise
        else:
            self._check_open()
            assert self._batcher is not None
            result = await self._batcher.submit(step.instance_id, (step, now))
            if result is None:
                raise StepConflict
            inserted = result
        notify(self._engine, True)
        return inserted

    async def _sqlite_batch(self, steps: Sequence[tuple[PreparedStep, int]]) -> list[Any]:
        return list(await self._sqlite(lite.apply_steps, steps))

    async def _apply_pg(self, step: PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]:
        batcher = self._batcher
        if batcher is not None and self.pg_batches is not None and self.pg_batches.enabled:
            self._check_open()
            outcome = await batcher.submit(step.instance_id, pg.step_json(step, now))
            if outcome is not RUN_ALONE:
                code, ids = outcome
                if code == pg.CONFLICT_SQLSTATE:
                    raise StepConflict
                return pg.inserted_records(step, ids, now)
        async with self._units.lane() as conn:
            return await pg.apply_step(conn, step, now)

    async def aclose(self) -> None:
        """Wait for the batches in flight."""
        for batcher in (self._batcher, self._creates, self._reads):
            if batcher is not None:
                await batcher.aclose()

    async def apply_on(
        self, conn: AsyncConnection, step: PreparedStep, now: int
    ) -> tuple[TaskInstanceRecord, ...]:
        """The PostgreSQL step function on ``conn`` (inside a SAVEPOINT the caller holds)."""
        try:
            result = await conn.exec_driver_sql(pg.STEP_CALL, (pg.step_json(step, now),))
        except Exception as error:
            self._step_error(error)
            raise
        return pg.inserted_records(step, result.scalar_one(), now)

    def _step_error(self, error: Exception) -> None:
        code = sqlstate(error)
        if code == pg.CONFLICT_SQLSTATE:
            raise StepConflict from None
        if code == pg.UNDEFINED_FUNCTION_SQLSTATE and "asyncflow_step_v1" in str(error):
            if self.step_function:  # once, not once per step already in flight
                self.step_function = False
                logger.warning(
                    "the database has no asyncflow_step_v1() function (run create_schema() to install "
                    "it): steps use the slower multi-statement path (%s)",
                    error,
                )
            raise FunctionMissing from error

    async def claim(self, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]) -> list[int]:
        """Lease up to ``limit`` due instances, ordered by ``(next_run_at, id)``."""
        if self.kind == "pg":
            async with self._units.lane() as conn:
                ids = await pg.claim_due(conn, now_ms=now_ms, limit=limit, lease_ms=lease_ms, types=types)
        else:
            ids = await self._sqlite(lite.claim_due, now_ms, limit, lease_ms, tuple(types))
        notify(self._engine, True)
        return ids
