"""The statements of schedules in the SQL repo (the same text on SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..records import NewWorkflowInstance, ScheduleState, WorkflowInstanceRecord
from ._json import check_text

__all__ = ["SqlSchedules"]

REGISTER = text(
    "INSERT INTO asyncflow_schedule (id, first_seen_at) VALUES (:id, :now) ON CONFLICT (id) DO NOTHING"
)
STATES = text("SELECT id, first_seen_at, last_tick FROM asyncflow_schedule")
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
        return {row[0]: ScheduleState(id=row[0], first_seen_at=row[1], last_tick=row[2]) for row in rows}

    async def register(self, ids: Sequence[str], now_ms: int) -> None:
        for schedule_id in ids:
            check_text(schedule_id, "schedule id")
        async with self._transaction(), self._connection() as conn:
            for schedule_id in ids:
                await conn.execute(REGISTER, {"id": schedule_id, "now": now_ms})

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
