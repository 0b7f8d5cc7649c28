"""SQL text built from the status sets of :mod:`asyncflow.status` (both backends' statements use these)."""

from __future__ import annotations

from collections.abc import Iterable

from ..status import RUNNABLE_INSTANCE_STATUSES, TERMINAL_TASK_STATUSES

__all__ = ["RUNNABLE", "RUNNABLE_SQL", "TERMINAL", "TERMINAL_SQL", "marks", "sql_list"]

RUNNABLE = RUNNABLE_INSTANCE_STATUSES
TERMINAL = TERMINAL_TASK_STATUSES  # node statuses: a step's cancel leaves these rows alone


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
