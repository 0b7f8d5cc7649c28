"""The PostgreSQL backend: every per-instance call as one statement on asyncpg, grouped when concurrent.

Outside ``transaction()`` a call runs on a kept asyncpg connection (:mod:`.lanes`) as one autocommit
statement, past SQLAlchemy's per-statement machinery; calls of one kind that wait at the same time
share one statement (:mod:`.batches`): steps (one commit; a step refused there is sorted out step by step),
creates (one multi-row insert) and pass reads (instances and node rows of several passes). Inside
``transaction()`` the same statements (:mod:`.sql`) run on the transaction's connection, a step in a
SAVEPOINT. Units that bypass SQLAlchemy are reported to :mod:`asyncflow.store._observers`.

A step is the ``asyncflow_step_v1()`` function that ``migrate()`` installs; without it a step raises
``StoreError`` naming the fix. A claim is ``asyncflow_claim_v1()``; without it (a database at schema
version 12) claims use the statement version 12 used, with a warning, until the function is there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from ..._held import HOLD_STEPS, held_if_asked
from ...errors import ParamInvalidError, StoreError
from ...records import TaskInstanceRecord, WorkflowInstanceRecord
from .._batcher import StepBatcher
from .._errors import StaleStep, StepConflict, sqlstate
from .._observers import notify
from .._prepare import InstanceRow, PreparedStep, Refused
from .._units import ConnectionUnits
from . import leases, schema
from . import sql as pg
from .batches import BATCH_SLOTS, MAX_BATCH, RUN_ALONE, PgCreateBatches, PgStateReads, PgStepBatches
from .finished import FinishedNotifier, watch_finished
from .lanes import PgLanes, lane_limit
from .notify import DueNotifier

__all__ = ["BULK_PAGE_SIZE", "CLAIM_FUNCTION_RETRY_EVERY", "PostgresBackend"]

logger = logging.getLogger(__name__)

CLAIM_FUNCTION_RETRY_EVERY = 100
"""After a claim found no ``asyncflow_claim_v1`` (a database at schema version 12), this many claims run
the older statement before one tries the function again: ``asyncflow migrate`` in another process
installs it while this one runs (a failed try costs one round trip)."""

BULK_PAGE_SIZE = 2000
"""Rows per statement of a bulk create."""


class PostgresBackend:
    """The :class:`~asyncflow.store._backend.SqlBackend` of PostgreSQL (asyncpg)."""

    schema = schema
    insert_child = pg.INSERT_CHILD
    insert_task = pg.INSERT_TASK
    shared_by_processes = True  # a server: every worker process on it shares the database lock

    def __init__(self, engine: AsyncEngine) -> None:
        if engine.dialect.driver != "asyncpg":
            raise ParamInvalidError(
                f"PostgreSQL needs the asyncpg driver (postgresql+asyncpg://), not {engine.dialect.driver!r}"
            )
        self._engine = engine
        self.units = ConnectionUnits(engine, engine.execution_options(isolation_level="AUTOCOMMIT"))
        # outside ``transaction()`` (raises ``StoreError`` if the repo is closed): every call asks
        self._direct = self.units.outside_transaction
        self._lanes = PgLanes(engine, lane_limit(engine))
        self._observed = engine.sync_engine
        self._steps: PgStepBatches | None = None
        self._step_batcher: StepBatcher[Any] | None = None
        self._creates: StepBatcher[Any] | None = None
        self._reads: StepBatcher[Any] | None = None
        self._leased_reads: StepBatcher[Any] | None = None
        self._acquires: StepBatcher[Any] | None = None
        self._releases: StepBatcher[Any] | None = None
        self._claims_until_retry = 0  # claims by the older statement before trying the function again
        self._claim_warned = False
        self._states_until_retry = 0  # claims without rows before trying asyncflow_claim_states_v1 again
        if self._lanes.limit > 0:
            slots = min(BATCH_SLOTS, self._lanes.limit)
            self._steps = PgStepBatches(self._lanes)
            self._step_batcher = StepBatcher(self._steps, slots=slots, max_batch=MAX_BATCH)
            self._creates = StepBatcher(PgCreateBatches(self._lanes), slots=slots, max_batch=MAX_BATCH)
            self._reads = StepBatcher(PgStateReads(self._lanes), slots=slots, max_batch=MAX_BATCH)
            self._leased_reads = StepBatcher(
                PgStateReads(self._lanes, lease=True), slots=slots, max_batch=MAX_BATCH
            )
            self._acquires = StepBatcher(leases.LeaseBatches(self._lanes), slots=slots, max_batch=MAX_BATCH)
            self._releases = StepBatcher(
                leases.LeaseBatches(self._lanes, release=True), slots=slots, max_batch=MAX_BATCH
            )

    @asynccontextmanager
    async def _db(self, wrote: bool) -> AsyncIterator[Any]:
        """A connection for one statement: the transaction's, or a lane (reported to observers)."""
        if not self._direct():
            async with self.units.connection() as conn:
                yield pg.TxConnection(conn)
            return
        async with self._lanes.lane() as driver:
            yield driver
        notify(self._observed, wrote)

    async def create(self, rows: Sequence[InstanceRow], now: int) -> list[int | Refused]:
        """Insert instances; their ids in order, :class:`Refused` for a refused unique row (concurrent
        single creates share a statement)."""
        stamped = [(row, now) for row in rows]
        if len(stamped) == 1 and self._creates is not None and self._direct():
            outcome = await self._creates.enqueue(0, stamped[0])  # submit() without its coroutine
            if outcome is not RUN_ALONE:
                notify(self._observed, True)
                return [outcome]
        if len(stamped) == 1:
            async with self._db(wrote=True) as db:
                return await pg.create_instances(db, stamped)
        ids: list[int | Refused] = []
        async with self.units.atomic() as conn:
            for page in pg.create_pages(stamped, BULK_PAGE_SIZE):
                ids += await pg.create_instances(pg.TxConnection(conn), page)
        return ids

    async def get(self, instance_id: int) -> WorkflowInstanceRecord | None:
        async with self._db(wrote=False) as db:
            return await pg.get_instance(db, instance_id)

    async def load(self, instance_id: int) -> list[TaskInstanceRecord]:
        async with self._db(wrote=False) as db:
            return await pg.load_tasks(db, instance_id)

    async def load_state(
        self, instance_id: int, lease: bool
    ) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None:
        """One statement (concurrent reads outside ``transaction()`` share it); ``lease``: it also
        takes a new lease epoch."""
        reads = self._leased_reads if lease else self._reads
        if reads is not None and self._direct():
            state: tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None
            state = await reads.enqueue(instance_id, instance_id)  # submit() without its coroutine
            if state is not RUN_ALONE:
                notify(self._observed, lease)
                return state
        async with self._db(wrote=lease) as db:
            return (await pg.load_states(db, (instance_id,), lease)).get(instance_id)

    async def apply_step(self, step: PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]:
        """The step function; ``StepConflict`` (nothing written) if a condition failed.

        Outside ``transaction()`` it is held for the engine (:mod:`asyncflow._held`): the batch's
        outcome, or the single statement's, is returned even if the caller is cancelled meanwhile (the
        cancellation is then deferred). (One coroutine, not one per case, and the batch's future
        awaited here, not through ``StepBatcher.submit``: every step of every pass.)"""
        try:
            if not self._direct():
                return await held_if_asked(self._apply_in_transaction(step, now))
            batcher, steps = self._step_batcher, self._steps
            outcome: Any = RUN_ALONE
            if batcher is not None and steps is not None and steps.enabled:
                hold = HOLD_STEPS.get()
                future = batcher.enqueue(step[0], pg.step_json(step, now), hold)  # [0]: instance_id
                try:
                    outcome = await future
                except asyncio.CancelledError as cancel:
                    if not hold:
                        raise
                    outcome = batcher.held_outcome(future, cancel)
            if outcome is RUN_ALONE:
                inserted = await held_if_asked(self._apply_alone(step, now))
            elif outcome.__class__ is str:  # refused in the batch: its SQLSTATE (see PgStepBatches)
                raise StaleStep if outcome == pg.STALE_SQLSTATE else StepConflict
            else:  # the ids of the inserted rows
                inserted = pg.inserted_records(step, outcome, now)
        except StepConflict:
            raise
        except Exception as error:
            _step_error(error)
            raise
        notify(self._observed, True)
        return inserted

    async def _apply_in_transaction(self, step: PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]:
        async with self.units.atomic() as conn:  # a SAVEPOINT: a conflict leaves the rest usable
            try:
                return await pg.apply_step(pg.TxConnection(conn), step, now)
            except Exception as error:
                _step_error(error)
                raise

    async def _apply_alone(self, step: PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]:
        async with self._lanes.lane() as driver:
            return await pg.apply_step(driver, step, now)

    async def claim(self, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]) -> list[int]:
        """One call of ``asyncflow_claim_v1`` (``FOR UPDATE SKIP LOCKED``, then the lease's update).

        Without the function (a database this version has not migrated yet) claims go through the
        statement schema version 12 used, with one warning, and try the function again every
        :data:`CLAIM_FUNCTION_RETRY_EVERY` claims (``migrate()`` may run in another process; a busy
        driver claims many times a second) and at once after this repo's ``migrate()``. Inside
        ``transaction()`` the failed call has aborted the transaction: ``StoreError`` naming the fix."""
        async with self._db(wrote=True) as db:
            if self._claims_until_retry > 0:
                self._claims_until_retry -= 1
            else:
                try:
                    return await pg.claim_due(db, now_ms=now_ms, limit=limit, lease_ms=lease_ms, types=types)
                except Exception as error:
                    self._claim_function_missing(error, in_transaction=isinstance(db, pg.TxConnection))
            return await pg.claim_due(
                db, now_ms=now_ms, limit=limit, lease_ms=lease_ms, types=types, function=False
            )

    async def claim_states(
        self, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]
    ) -> list[tuple[int, WorkflowInstanceRecord | None]]:
        """:meth:`claim` through ``asyncflow_claim_states_v1``: with each new instance its record.

        Outside ``transaction()`` only (a driver's claim). Without the function (a database this
        release has not migrated yet: it comes with revision 2 of the definitions) the claim is
        :meth:`claim`'s, without records, and the function is tried again every
        :data:`CLAIM_FUNCTION_RETRY_EVERY` claims and at once after this repo's ``migrate()``."""
        if self._states_until_retry > 0 or not self._direct():
            self._states_until_retry = max(0, self._states_until_retry - 1)
        else:
            try:
                async with self._db(wrote=True) as db:
                    return await pg.claim_due_states(
                        db, now_ms=now_ms, limit=limit, lease_ms=lease_ms, types=types
                    )
            except Exception as error:
                if sqlstate(error) != pg.UNDEFINED_FUNCTION_SQLSTATE or "asyncflow_claim_states" not in str(
                    error
                ):
                    raise
                self._states_until_retry = CLAIM_FUNCTION_RETRY_EVERY
                logger.info(
                    "the database has no asyncflow_claim_states_v1() function yet: claims use "
                    "asyncflow_claim_v1 until `asyncflow migrate` (or `repo.migrate()`) installs it"
                )
        ids = await self.claim(now_ms=now_ms, limit=limit, lease_ms=lease_ms, types=types)
        return [(instance_id, None) for instance_id in ids]

    def _claim_function_missing(self, error: Exception, *, in_transaction: bool) -> None:
        """After a failed claim call: return (claims take the older statement for a while) only if the
        function is missing and the call did not abort a transaction; else raise."""
        if sqlstate(error) != pg.UNDEFINED_FUNCTION_SQLSTATE or "asyncflow_claim" not in str(error):
            raise error
        missing = "the database has no asyncflow_claim_v1() function (schema version 13)"
        if in_transaction:
            raise StoreError(
                f"{missing}: run `await repo.migrate()` (or `asyncflow migrate`) to install it ({error})"
            ) from error
        self._claims_until_retry = CLAIM_FUNCTION_RETRY_EVERY
        level = logging.DEBUG if self._claim_warned else logging.WARNING
        self._claim_warned = True
        logger.log(
            level,
            "%s: claims use the statement of version 12 until `asyncflow migrate` (or `repo.migrate()`) "
            "installs it (tried again every %d claims)",
            missing,
            CLAIM_FUNCTION_RETRY_EVERY,
        )

    async def acquire_lease(self, key: str, holder: str, ttl_ms: int) -> bool:
        """DatabaseWorkflowLock's leases (:mod:`.leases`): on a lane, never in ``transaction()``;
        concurrent acquires (and releases) share a statement."""
        return await self._lease_call(self._acquires, (key, holder, ttl_ms), leases.acquire)

    async def renew_leases(self, held: Sequence[tuple[str, str, int]]) -> list[bool]:
        self.units.check_open()
        async with self._lanes.lane() as db:
            return await leases.renew(db, held)

    async def release_lease(self, key: str, holder: str) -> bool:
        return await self._lease_call(self._releases, (key, holder, 0), _release_one)

    async def _lease_call(
        self, batcher: StepBatcher[Any] | None, item: tuple[str, str, int], alone: Any
    ) -> bool:
        self.units.check_open()
        if batcher is not None:
            return bool(await batcher.enqueue(0, item))
        async with self._lanes.lane() as db:
            [done] = await alone(db, [item])
            return bool(done)

    def listen_due(self, callback: Callable[[], None]) -> DueNotifier:
        """LISTEN/NOTIFY wake-ups (:mod:`.notify`): ``callback()`` when an instance becomes due."""
        return DueNotifier(self._engine, callback)

    async def watch_finished(self, instance_id: int) -> None:
        """Flag the instance so that its end NOTIFYs (:mod:`.finished`): on a lane, never in
        ``transaction()`` (the flag must be visible to whatever ends the instance, and its row lock
        must not outlive the statement)."""
        self.units.check_open()
        async with self._lanes.lane() as db:
            await watch_finished(db, instance_id)

    def listen_finished(self, callback: Callable[[int | None], None]) -> FinishedNotifier:
        """LISTEN/NOTIFY (:mod:`.finished`): ``callback(id)`` when an instance ends in any process."""
        return FinishedNotifier(self._engine, callback)

    def migrated(self) -> None:
        """The functions are installed: grouped steps and the claim function may run again."""
        if self._steps is not None:
            self._steps.enabled = True
        self._claims_until_retry, self._claim_warned = 0, False
        self._states_until_retry = 0

    async def aclose(self) -> None:
        """Wait for the batches in flight, then return the lanes."""
        for batcher in (
            self._step_batcher,
            self._creates,
            self._reads,
            self._leased_reads,
            self._acquires,
            self._releases,
        ):
            if batcher is not None:
                await batcher.aclose()
        await self._lanes.aclose()


async def _release_one(db: Any, items: Sequence[tuple[str, str, int]]) -> list[bool]:
    return await leases.release(db, [(key, holder) for key, holder, _ in items])


def _step_error(error: Exception) -> None:
    """A conflict becomes :class:`StepConflict`; a missing function a ``StoreError`` naming the fix."""
    code = sqlstate(error)
    if code == pg.CONFLICT_SQLSTATE:
        raise StepConflict from None
    if code == pg.STALE_SQLSTATE:
        raise StaleStep from None
    if code == pg.UNDEFINED_FUNCTION_SQLSTATE and "asyncflow_step" in str(error):
        raise StoreError(
            "the database has no asyncflow_step_v1() function: run `await repo.migrate()` "
            f"(or `asyncflow migrate`) to install it ({error})"
        ) from error
