"""The SQLite backend: every per-instance call as one trip to its own connection's thread.

Outside ``transaction()``, on a database file, a call is one function of :mod:`.sql` run on the
backend's own ``sqlite3`` connection in its worker thread (:mod:`.lane`): a write in ``BEGIN
IMMEDIATE ... COMMIT``, a pass read in one read transaction; steps that wait at the same time go
together, one transaction with a SAVEPOINT per step (group commit). Inside ``transaction()``, and on
an in-memory database, the same functions run on the SQLAlchemy connection (``run_sync``), in the
transaction (a SAVEPOINT) or a transaction of their own. Every unit holds the in-process write gate.
Units on the own connection are reported to :mod:`asyncflow.store._observers`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from ..._held import HOLD_STEPS, held_if_asked
from ...records import TaskInstanceRecord, WorkflowInstanceRecord
from .._batcher import StepBatcher
from .._errors import StaleStep, StepConflict
from .._lanes import to_completion
from .._observers import notify
from .._prepare import InstanceRow, PreparedStep, Refused
from .._statements import INSERT_TASK
from .._units import ConnectionUnits
from . import leases, schema
from . import sql as lite
from .engine import autocommit_engine, configure_engine
from .lane import SqliteLane

__all__ = ["SqliteBackend"]


def _now_ms() -> int:
    return int(time.time() * 1000)


class _RolledBack(Exception):
    """A body returned ``None``: leave the transaction (or SAVEPOINT) without its writes."""


def _on(sync_conn: Connection, body: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return body(lite.SyncConnection(sync_conn), *args)


class SqliteBackend:
    """The :class:`~asyncflow.store._backend.SqlBackend` of SQLite (aiosqlite for SQLAlchemy's units)."""

    schema = schema
    insert_child = lite.INSERT_CHILD
    insert_task = INSERT_TASK
    shared_by_processes = False  # an embedded file: one process drives it

    def __init__(self, engine: AsyncEngine) -> None:
        configure_engine(engine)
        self._lane = SqliteLane(engine)
        self.units = ConnectionUnits(engine, autocommit_engine(engine), self._lane.exclusive)
        self._observed = engine.sync_engine
        # one writer at a time: one batch in flight, the rest gather
        self._batcher: StepBatcher[Any] | None = None
        if self._lane.own:
            self._batcher = StepBatcher(self._apply_batch, slots=1, max_batch=lite.MAX_BATCH)

    def _direct(self) -> bool:
        """Whether a call runs on the own connection (outside ``transaction()``, a database file)."""
        return self.units.outside_transaction() and self._lane.own

    async def _write(self, body: Callable[..., Any], *args: Any) -> Any:
        """``body`` as one write unit; ``None`` (nothing kept) if it returned ``None``."""
        if self._direct():
            async with self._lane.thread() as thread:
                result = await thread.run(lite.write, body, *args)
            notify(self._observed, True)
            return result
        return await self._on_sqlalchemy(self._sa_write(body, args))

    async def _sa_write(self, body: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            async with self.units.atomic() as conn:
                result = await conn.run_sync(_on, body, args)
                if result is None or result is lite.STALE:
                    raise _RolledBack(result)
        except _RolledBack as rolled_back:
            return rolled_back.args[0]
        return result

    async def _on_sqlalchemy(self, unit: Coroutine[Any, Any, Any]) -> Any:
        """A unit on SQLAlchemy's connection; outside ``transaction()`` (an in-memory database) a
        cancelled caller does not cancel it: a connection cancelled mid-statement would be discarded,
        and an in-memory database with it."""
        if self.units.in_transaction():
            return await unit
        return await to_completion(unit)

    async def _read(self, body: Callable[..., Any], *args: Any, snapshot: bool = False) -> Any:
        """``body`` as one read (``snapshot``: several statements in one read transaction)."""
        if self._direct():
            async with self._lane.thread() as thread:
                result = await (thread.run(lite.read, body, *args) if snapshot else thread.run(body, *args))
            notify(self._observed, False)
            return result
        return await self._on_sqlalchemy(self._sa_read(body, args, snapshot))

    async def _sa_read(self, body: Callable[..., Any], args: tuple[Any, ...], snapshot: bool) -> Any:
        async with self.units.atomic() if snapshot else self.units.connection() as conn:
            return await conn.run_sync(_on, body, args)

    async def create(self, rows: Sequence[InstanceRow], now: int) -> list[int | Refused]:
        ids: list[int | Refused] = await self._write(lite.create_instances, [(row, now) for row in rows])
        return ids

    async def get(self, instance_id: int) -> WorkflowInstanceRecord | None:
        record: WorkflowInstanceRecord | None = await self._read(lite.get_instance, instance_id)
        return record

    async def load(self, instance_id: int) -> list[TaskInstanceRecord]:
        rows: list[TaskInstanceRecord] = await self._read(lite.load_tasks, instance_id)
        return rows

    async def load_state(
        self, instance_id: int, lease: bool
    ) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None:
        """One read transaction; ``lease``: one write transaction that also takes a new lease epoch."""
        state: tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None
        if lease:
            state = await self._write(lite.load_state, instance_id, True)
        else:
            state = await self._read(lite.load_state, instance_id, snapshot=True)
        return state

    async def apply_step(self, step: PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]:
        """One transaction (or SAVEPOINT); ``StepConflict`` (nothing written) if a condition failed."""
        if self._batcher is not None and self._direct():
            # the engine's step (asyncflow._held) holds a cancellation until its outcome
            outcome = await self._batcher.submit(step[0], (step, now), hold=HOLD_STEPS.get())
            if outcome is None:
                raise StepConflict
            if outcome is lite.STALE:
                raise StaleStep
            notify(self._observed, True)
            inserted: tuple[TaskInstanceRecord, ...] = outcome
            return inserted
        ids = await held_if_asked(self._write(lite.step, step, now))
        if ids is None:
            raise StepConflict
        if ids is lite.STALE:
            raise StaleStep
        return lite.inserted(step, ids, now)

    async def _apply_batch(self, steps: Sequence[tuple[PreparedStep, int]]) -> list[Any]:
        async with self._lane.thread() as thread:
            return list(await thread.run(lite.apply_steps, steps))

    async def claim(self, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]) -> list[int]:
        """A SELECT and an UPDATE that re-checks the due condition, in one write transaction."""
        ids: list[int] = await self._write(lite.claim_due, now_ms, limit, lease_ms, tuple(types))
        return ids

    async def claim_states(
        self, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]
    ) -> list[tuple[int, WorkflowInstanceRecord | None]]:
        """:meth:`claim`, with the records of the claimed instances nobody has run yet (one transaction)."""
        claimed: list[tuple[int, WorkflowInstanceRecord | None]] = await self._write(
            lite.claim_due_states, now_ms, limit, lease_ms, tuple(types)
        )
        return claimed

    async def acquire_lease(self, key: str, holder: str, ttl_ms: int) -> bool:
        """DatabaseWorkflowLock's leases (:mod:`.leases`), each one write transaction (inside
        ``transaction()`` it joins it: SQLite has one writer, which the transaction already is)."""
        return bool(await self._write(leases.acquire, key, holder, ttl_ms, _now_ms()))

    async def renew_leases(self, held: Sequence[tuple[str, str, int]]) -> list[bool]:
        renewed: list[bool] = await self._write(leases.renew, held, _now_ms())
        return renewed

    async def release_lease(self, key: str, holder: str) -> bool:
        return bool(await self._write(leases.release, key, holder))

    def listen_due(self, callback: Callable[[], None]) -> None:
        """No wake-ups on SQLite: drivers poll."""
        return None

    def listen_finished(self, callback: Callable[[int | None], None]) -> None:
        """No wake-ups on SQLite: waiters poll."""
        return None

    async def watch_finished(self, instance_id: int) -> None:
        """Nothing to ask for: no wake-ups on SQLite."""

    def migrated(self) -> None:
        """Nothing to re-enable."""

    async def aclose(self) -> None:
        """Wait for the batch in flight, then close the own connection. Cut (a cancellation, a
        timeout), the thread still ends once the unit it runs is done, and refuses any after it."""
        try:
            if self._batcher is not None:
                await self._batcher.aclose()
            await self._lane.aclose()
        finally:
            self._lane.shutdown()
