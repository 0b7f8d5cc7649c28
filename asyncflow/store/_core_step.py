"""``apply_step`` as SQLAlchemy Core statements in a transaction (or SAVEPOINT) the caller opened.

The fallback of the hot path: used on SQLite inside ``transaction()``, on SQLite when aiosqlite's
thread cannot be reached directly, and on PostgreSQL when the step function is missing (a schema made
without ``create_schema()``).
"""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..records import TaskInstanceRecord
from . import _dialect
from . import _prepare as prep
from . import _statements as st

__all__ = ["StepConflict", "apply_core"]


class StepConflict(Exception):
    """A condition of a step failed: roll it back and report ``applied=False``."""


async def apply_core(
    conn: AsyncConnection, step: prep.PreparedStep, now: int
) -> tuple[TaskInstanceRecord, ...]:
    """Order: the instance row (which also takes its row lock on PostgreSQL, so a concurrent cancel
    serializes against the step), the node updates, the inserts (one multi-row statement), then
    ``cancel_other_tasks``. A failed condition raises :class:`StepConflict`.
    """
    params = st.instance_change_params(step.instance_change, now)
    params["p_ids"] = [step.instance_id]
    stmt = st.UPDATE_INSTANCES
    if step.instance_status_in:
        stmt, params["p_status_in"] = st.UPDATE_INSTANCES_IN_STATUS, list(step.instance_status_in)
    if (await conn.execute(stmt, params)).rowcount != 1:
        raise StepConflict
    touched = []
    update_stmt = st.update_tasks(True, True, False, False, True)
    for task_id, expected_version, change in step.updates:
        params = st.task_change_params(change, now)
        params.update(p_ids=[task_id], p_instance=step.instance_id, p_version=expected_version)
        if (await conn.execute(update_stmt, params)).rowcount != 1:
            raise StepConflict
        touched.append(task_id)
    inserted: tuple[TaskInstanceRecord, ...] = ()
    if step.inserts:
        rows = [st.task_params(step.instance_id, row, now) for row in step.inserts]
        try:
            result = await conn.execute(st.INSERT_TASK, rows)
        except IntegrityError as error:
            if not _dialect.is_unique_violation(error):
                raise
            raise StepConflict from None
        ids_by_type = {task_type: task_id for task_id, task_type in result.all()}
        inserted = tuple(
            st.inserted_task_record(ids_by_type[row.task_type], step.instance_id, row, now)
            for row in step.inserts
        )
        touched.extend(record.id for record in inserted)
    if step.cancel_other_tasks:
        cancel = {"p_now": now, "p_instance": step.instance_id, "p_exclude": touched}
        await conn.execute(st.CANCEL_OTHER_TASKS, cancel)
    return inserted
