"""SQL text built from the status sets of :mod:`asyncflow.status` (both backends' statements use these)."""

from __future__ import annotations

from collections.abc import Iterable

from ..status import RUNNABLE_INSTANCE_STATUSES, TERMINAL_TASK_STATUSES

__all__ = [
    "RUNNABLE",
    "RUNNABLE_SQL",
    "TERMINAL",
    "TERMINAL_SQL",
    "UNIQUE_MODES",
    "marks",
    "refused_by",
    "sql_list",
]

RUNNABLE = RUNNABLE_INSTANCE_STATUSES
TERMINAL = TERMINAL_TASK_STATUSES  # node statuses: a step's cancel leaves these rows alone
UNIQUE_MODES = ("active", "always")
"""The values of ``workflow_instance.unique_key`` besides NULL (``create_workflow(unique=...)``)."""


def sql_list(values: Iterable[str]) -> str:
    """``'a', 'b'``: literals for ``IN (...)`` (the planner matches them to partial indexes)."""
    items = list(values)
    for value in items:
        if not value.replace("_", "").isalnum():
            raise ValueError(f"not a status name: {value!r}")
    return ", ".join(f"'{value}'" for value in items)


def marks(count: int) -> str:
    """``?, ?, ?``: ``count`` SQLite parameter markers."""
    return ", ".join("?" * count)


RUNNABLE_SQL = sql_list(RUNNABLE)
"""``'init', 'running'``."""
TERMINAL_SQL = sql_list(TERMINAL)
"""``'completed', 'failed', 'canceled', 'skipped'``."""


def refused_by(workflow_type: str, business_id: str, mode: str) -> str:
    """A scalar query: the unique instance that refuses a row of this key and ``mode`` (SQL
    expressions): the active one, else (``'always'``) the latest."""
    return (
        f"SELECT w.id FROM workflow_instance w WHERE w.workflow_type = {workflow_type} "
        f"AND w.business_id = {business_id} AND w.unique_key IS NOT NULL "
        f"AND ({mode} = 'always' OR w.status IN ({RUNNABLE_SQL})) "
        f"ORDER BY CASE WHEN w.status IN ({RUNNABLE_SQL}) THEN 0 ELSE 1 END, w.id DESC LIMIT 1"
    )
