"""PostgreSQL wake-ups for ``wait_for_workflow``: a trigger NOTIFYs when an instance that a waiter
watches ends, and one LISTEN connection per service (its waiters') fans the notifications out to them.

Migration 5 installed the trigger function (:data:`FINISHED_DDL`): after an UPDATE that moves an
instance from ``init``/``running`` to a terminal status it calls ``pg_notify('asyncflow_finished',
'<schema> <id>')``. NOTIFY is transactional: the waiter hears of the end once it is committed.

Migration 10 (:data:`FINISHED_DDL_V10`) fires it only for instances whose ``notify_finished`` is set:
a transaction that NOTIFYs holds a database-wide lock from its pre-commit through its WAL flush, so
notifying every finished instance serialized the commits of concurrent group-committed steps (each
batch that ended an instance), for waiters that mostly did not exist. A waiter first sets the flag
(:data:`WATCH_FINISHED`, :func:`watch_finished`), then reads the instance. The flag's ``UPDATE`` takes
the row's lock, so it waits for a step in flight that ends the instance, and then finds the instance
terminal (nothing set; the waiter's read sees the end). Any step that ends the instance afterwards
updates the flagged row, and its trigger fires. No end between the two is missed.

Migration 12 (:data:`FINISHED_DDL_V12`) keeps those NOTIFYs and moves the status test from the
trigger's ``WHEN`` into its function: PostgreSQL parses a ``WHEN`` clause again for every statement
that updates the column, which cost every status-changing step; ``WHEN (NEW.notify_finished)`` is one
column read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from .._sql import RUNNABLE_SQL, TERMINAL_SQL
from .notify import DueNotifier

__all__ = [
    "FINISHED_CHANNEL",
    "FINISHED_DDL",
    "FINISHED_DDL_V10",
    "FINISHED_DDL_V12",
    "WATCH_FINISHED",
    "FinishedNotifier",
    "watch_finished",
]

FINISHED_CHANNEL = "asyncflow_finished"

_FUNCTION = f"""
CREATE OR REPLACE FUNCTION asyncflow_notify_finished() RETURNS trigger LANGUAGE plpgsql AS $asyncflow$
BEGIN
    PERFORM pg_notify('{FINISHED_CHANNEL}', TG_TABLE_SCHEMA || ' ' || NEW.id);
    RETURN NULL;
END
$asyncflow$
"""

FINISHED_DDL = (
    _FUNCTION,
    "DROP TRIGGER IF EXISTS asyncflow_finished_notify ON workflow_instance",
    f"""CREATE TRIGGER asyncflow_finished_notify
AFTER UPDATE OF status ON workflow_instance
FOR EACH ROW
WHEN (NEW.status IN ({TERMINAL_SQL}) AND OLD.status IN ({RUNNABLE_SQL}))
EXECUTE FUNCTION asyncflow_notify_finished()""",
)
"""Migration 5 (PostgreSQL): the function and the trigger."""

FINISHED_DDL_V10 = (
    "DROP TRIGGER IF EXISTS asyncflow_finished_notify ON workflow_instance",
    f"""CREATE TRIGGER asyncflow_finished_notify
AFTER UPDATE OF status ON workflow_instance
FOR EACH ROW
WHEN (NEW.notify_finished AND NEW.status IN ({TERMINAL_SQL}) AND OLD.status IN ({RUNNABLE_SQL}))
EXECUTE FUNCTION asyncflow_notify_finished()""",
)
"""Migration 10 (PostgreSQL): the trigger again, for watched instances only (the function is 5's)."""

FINISHED_DDL_V12 = (
    f"""
CREATE OR REPLACE FUNCTION asyncflow_notify_finished() RETURNS trigger LANGUAGE plpgsql AS $asyncflow$
BEGIN
    IF NEW.status IN ({TERMINAL_SQL}) AND OLD.status IN ({RUNNABLE_SQL}) THEN
        PERFORM pg_notify('{FINISHED_CHANNEL}', TG_TABLE_SCHEMA || ' ' || NEW.id);
    END IF;
    RETURN NULL;
END
$asyncflow$
""",
    "DROP TRIGGER IF EXISTS asyncflow_finished_notify ON workflow_instance",
    """CREATE TRIGGER asyncflow_finished_notify
AFTER UPDATE OF status ON workflow_instance
FOR EACH ROW
WHEN (NEW.notify_finished)
EXECUTE FUNCTION asyncflow_notify_finished()""",
)
"""Migration 12 (PostgreSQL): the same NOTIFYs, with the status test moved from the trigger's ``WHEN``
into its function. PostgreSQL parses a row trigger's ``WHEN`` clause again for every statement that
updates the column (a step's ``UPDATE`` of the instance), and the two status lists made that about a
tenth of a step's server CPU; ``WHEN (NEW.notify_finished)`` is one column read. The function now runs
for every status change of a watched instance (watched instances are the few someone waits for) and
NOTIFYs only when one leaves ``init``/``running`` for a terminal status, as before."""

WATCH_FINISHED = (
    "UPDATE workflow_instance SET notify_finished = true "
    f"WHERE id = $1::bigint AND status IN ({RUNNABLE_SQL}) AND NOT notify_finished"
)
"""A waiter's flag (no change to ``version``/``updated_at``: nobody's compare-and-set sees it)."""


async def watch_finished(conn: Any, instance_id: int) -> None:
    """Ask for the NOTIFY of ``instance_id``'s end (on an asyncpg connection, in a statement of its own)."""
    await conn.execute(WATCH_FINISHED, instance_id)


class FinishedNotifier(DueNotifier):
    """LISTENs on :data:`FINISHED_CHANNEL`: ``callback(instance_id)`` per finished instance of this
    schema, ``callback(None)`` when LISTEN (re)starts (whatever ended while nobody listened)."""

    channel = FINISHED_CHANNEL
    detached = True  # the waiters' own reads share the pool: the LISTEN must not take one of its connections

    def __init__(self, engine: AsyncEngine, callback: Callable[[int | None], None]) -> None:
        super().__init__(engine, lambda: callback(None), install=False)
        self._on_finished = callback

    def _deliver(self, payload: str, schema: str) -> None:
        found, _, instance_id = payload.rpartition(" ")
        if found == schema and instance_id.isdigit():
            self._on_finished(int(instance_id))
