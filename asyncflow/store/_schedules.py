"""The statements of schedules in the SQL repo (the same text on SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..records import NewWorkflowInstance, ScheduleState, WorkflowInstanceRecord
from ._json import check_text

__all__ = ["SqlSchedules"]

REGISTER = text(
    "INSERT INTO asyncflow_schedule (id, first_seen_at, fingerprint) VALUES (:id, :now, :fingerprint) "
    "ON CONFLICT (id) DO UPDATE SET "
    "first_seen_at = CASE WHEN asyncflow_schedule.fingerprint IS NULL "
    "THEN asyncflow_schedule.first_seen_at ELSE excluded.first_seen_at END, "
    "last_tick = CASE WHEN asyncflow_schedule.fingerprint IS NULL THEN asyncflow_schedule.last_tick END, "
    "fingerprint = excluded.fingerprint "
    "WHERE asyncflow_schedule.fingerprint IS NULL OR (asyncflow_schedule.fingerprint <> excluded.fingerprint "
    "AND asyncflow_schedule.first_seen_at < :since)"
)
"""A new schedule; a schedule of another definition recorded before ``since`` starts over; a row
stored before schema version 14 (no fingerprint) keeps its state and takes the fingerprint."""
STATES = text("SELECT id, first_seen_at, last_tick, fingerprint FROM asyncflow_schedule")
FIRE_TICK = text(
    "INSERT INTO asyncflow_schedule_tick (schedule_id, tick, fired_at) SELECT :id, :tick, :now "
    "WHERE NOT EXISTS (SELECT 1 FROM asyncflow_schedule WHERE id = :id AND last_tick >= :tick) "
    "ON CONFLICT (schedule_id, tick) DO NOTHING RETURNING tick"
)
"""Claims a tick: a row (then this transaction creates its instance) or none (someone fired it, or a
later tick). The ``last_tick`` check covers ticks whose rows were pruned: a driver that read the
schedule's state before another fired (and pruned) them would fire them again."""
TICK_INSTANCE = text(
    "UPDATE asyncflow_schedule_tick SET instance_id = :instance WHERE schedule_id = :id AND tick = :tick"
)
MARK_TICK = text(
    "UPDATE asyncflow_schedule SET last_tick = :tick "
    "WHERE id = :id AND (last_tick IS NULL OR last_tick < :tick)"
)
PRUNE_TICKS = text("DELETE FROM asyncflow_schedule_tick WHERE schedule_id = :id AND tick < :before")


class SqlSchedules:
    """Schedule state on the SQL repo's connections (``connection``/``transaction`` of the repo)."""

    def __init__(
        self,
        connection: Callable[[], AbstractAsyncContextManager[AsyncConnection]],
        transaction: Callable[[], AbstractAsyncContextManager[None]],
        create: Callable[[NewWorkflowInstance], Any],
    ) -> None:
        self._connection = connection
        self._transaction = transaction
        self._create = create

    async def states(self) -> dict[str, ScheduleState]:
        async with self._connection() as conn:
            rows = (await conn.execute(STATES)).all()
        return {row[0]: ScheduleState(row[0], row[1], row[2], row[3]) for row in rows}

    async def register(self, fingerprints: Mapping[str, str], now_ms: int, since_ms: int) -> None:
        for schedule_id, fingerprint in fingerprints.items():
            check_text(schedule_id, "schedule id")
            check_text(fingerprint, "schedule fingerprint")
        async with self._transaction(), self._connection() as conn:
            for schedule_id, fingerprint in fingerprints.items():
                values = {"id": schedule_id, "now": now_ms, "fingerprint": fingerprint, "since": since_ms}
                await conn.execute(REGISTER, values)

    async def fire(
        self, schedule_id: str, tick: str, new: NewWorkflowInstance, now_ms: int, prune_before: str
    ) -> int | None:
        async with self._transaction():
            async with self._connection() as conn:
                claimed = (
                    await conn.execute(FIRE_TICK, {"id": schedule_id, "tick": tick, "now": now_ms})
                ).first()
            if claimed is None:
                return None
            record: WorkflowInstanceRecord = await self._create(new)
            async with self._connection() as conn:
                await conn.execute(TICK_INSTANCE, {"id": schedule_id, "tick": tick, "instance": record.id})
                await conn.execute(MARK_TICK, {"id": schedule_id, "tick": tick})
                await conn.execute(PRUNE_TICKS, {"id": schedule_id, "before": prune_before})
        return record.id
