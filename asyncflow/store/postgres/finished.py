"""PostgreSQL wake-ups for ``wait_for_workflow``: a trigger NOTIFYs when an instance ends, and one
LISTEN connection per repo fans the notifications out to every waiter of that repo.

Migration 4 installs the trigger (:data:`FINISHED_DDL`): after an UPDATE that moves an instance
from ``init``/``running`` to a terminal status it calls ``pg_notify('asyncflow_finished',
'<schema> <id>')``. NOTIFY is transactional: the waiter hears of the end once it is committed. The
cost is one notification per finished instance (in the transaction that ends it: a group-committed
batch of steps notifies once per batch commit, not once per row).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from .._sql import RUNNABLE_SQL, TERMINAL_SQL
from .notify import DueNotifier

__all__ = ["FINISHED_CHANNEL", "FINISHED_DDL", "FinishedNotifier"]

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
"""Migration 4 (PostgreSQL): the function and the trigger."""


class FinishedNotifier(DueNotifier):
    """LISTENs on :data:`FINISHED_CHANNEL`: ``callback(instance_id)`` per finished instance of this
    schema, ``callback(None)`` when LISTEN (re)starts (whatever ended while nobody listened)."""

    channel = FINISHED_CHANNEL

    def __init__(self, engine: AsyncEngine, callback: Callable[[int | None], None]) -> None:
        super().__init__(engine, lambda: callback(None), install=False)
        self._on_finished = callback

    def _deliver(self, payload: str, schema: str) -> None:
        found, _, instance_id = payload.rpartition(" ")
        if found == schema and instance_id.isdigit():
            self._on_finished(int(instance_id))
