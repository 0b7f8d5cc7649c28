"""Count the transactions an engine commits, to measure commits per workflow.

Explicit transactions are counted at ``COMMIT``; a write run on an autocommit connection (one statement
is one transaction) counts as one commit too, and so does a writing unit of the repo's hot path, which
runs on the driver connection past SQLAlchemy's events (:mod:`asyncflow.store._observers`). Reads
outside transactions are not commits.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from ._observers import add_observer, remove_observer

__all__ = ["CommitCounter"]

_WRITES = ("INSERT", "UPDATE", "DELETE", "WITH")
_AUTOCOMMIT_MARKERS = ("asyncflow_autocommit",)


class CommitCounter:
    """``with CommitCounter(repo.engine) as counter: ...`` then read ``counter.commits``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine.sync_engine
        self.commits = 0

    def _on_commit(self, conn: Any) -> None:
        self.commits += 1

    def _on_hot_unit(self, wrote: bool) -> None:
        if wrote:
            self.commits += 1

    def _on_execute(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        options = context.execution_options if context is not None else {}
        autocommit = options.get("isolation_level") == "AUTOCOMMIT" or any(
            options.get(marker) for marker in _AUTOCOMMIT_MARKERS
        )
        if autocommit and statement.lstrip()[:6].upper().startswith(_WRITES):
            self.commits += 1

    def __enter__(self) -> CommitCounter:
        event.listen(self._engine, "commit", self._on_commit)
        event.listen(self._engine, "after_cursor_execute", self._on_execute)
        add_observer(self._engine, self._on_hot_unit)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        event.remove(self._engine, "commit", self._on_commit)
        event.remove(self._engine, "after_cursor_execute", self._on_execute)
        remove_observer(self._engine, self._on_hot_unit)
