"""``create_workflow``'s 0.2 arguments: delayed starts, uniqueness, the caller's session.

Each check raises ``ParamInvalidError`` naming the argument before anything is written.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import datetime, timedelta
from typing import Literal

from .._numbers import finite
from .._text import shown
from ..errors import DuplicateWorkflowError, ParamInvalidError
from ..records import NewWorkflowInstance, WorkflowInstanceRecord
from ..store.protocol import JoinsSessions, WorkflowRepo

__all__ = ["ON_DUPLICATE", "UNIQUE_MODES", "UniqueFlights", "check_unique", "session_scope", "start_ms"]

UNIQUE_MODES = ("active", "always")
"""The values of ``create_workflow(unique=...)`` besides ``None`` (the store's unique_key values)."""

ON_DUPLICATE = ("return", "raise")
"""The values of ``create_workflow(on_duplicate=...)``."""


def start_ms(start_at: object, start_in: object, now_ms: int) -> int | None:
    """The start time (unix ms) asked for by ``start_at`` or ``start_in``, or ``None`` (start now).

    ``start_at`` must be a timezone-aware ``datetime``; ``start_in`` a finite non-negative number of
    seconds or a ``timedelta``; not both.
    """
    if start_at is not None and start_in is not None:
        raise ParamInvalidError("give start_at or start_in, not both")
    if start_at is not None:
        if not isinstance(start_at, datetime):
            raise ParamInvalidError(f"start_at must be a datetime, got {type(start_at).__name__}")
        if start_at.tzinfo is None or start_at.utcoffset() is None:
            raise ParamInvalidError(
                f"start_at must be timezone-aware (e.g. datetime.now(timezone.utc)), got naive {start_at}"
            )
        return max(0, math.ceil(start_at.timestamp() * 1000))
    if start_in is None:
        return None
    if isinstance(start_in, timedelta):
        seconds = start_in.total_seconds()
    elif isinstance(start_in, int | float) and not isinstance(start_in, bool):
        seconds = float(start_in) if finite(start_in) else math.inf  # float() of 10**400 overflows
    else:
        raise ParamInvalidError(
            f"start_in must be seconds (int/float) or a timedelta, got {type(start_in).__name__}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ParamInvalidError(f"start_in must be a finite number of seconds >= 0, got {shown(start_in)}")
    return now_ms + math.ceil(seconds * 1000)


def check_unique(unique: object, on_duplicate: object) -> Literal["active", "always"] | None:
    """``unique`` (``None``, ``"active"``, ``"always"``) after checking it and ``on_duplicate``."""
    if on_duplicate not in ON_DUPLICATE:
        raise ParamInvalidError(f"on_duplicate must be one of {ON_DUPLICATE}, got {shown(on_duplicate)}")
    if unique is None:
        return None
    if unique == "active":
        return "active"
    if unique == "always":
        return "always"
    raise ParamInvalidError(f"unique must be None, 'active' or 'always', got {shown(unique)}")


def session_scope(repo: WorkflowRepo, session: object, run: bool) -> AbstractAsyncContextManager[None]:
    """Where the create runs: in ``session``'s transaction (an SQL repo's ``joined``), or on its own."""
    if session is None:
        return nullcontext()
    if run:
        raise ParamInvalidError("run=True cannot run an instance inside the caller's session (not committed)")
    if not isinstance(repo, JoinsSessions):
        raise ParamInvalidError(f"session= needs an SQL repo, not {type(repo).__name__}")
    return repo.joined(session)


class UniqueFlights:
    """Concurrent unique creates of one key in this service go to the database one at a time.

    The first (the leader) inserts; the others wait for it. If it inserted an instance, they are
    duplicates of it (they overlapped with its insert, so they may be ordered right after it) and
    need no database trip; otherwise (refused, failed) the next one inserts. Creates in a caller's
    session never take part: their row is not committed yet.
    """

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], asyncio.Future[int | None]] = {}

    async def create(
        self,
        new: NewWorkflowInstance,
        insert: Callable[[NewWorkflowInstance], Awaitable[WorkflowInstanceRecord]],
    ) -> WorkflowInstanceRecord:
        key = (new.workflow_type, new.business_id)
        while (pending := self._pending.get(key)) is not None:
            created = await asyncio.shield(pending)
            if created is not None:
                raise DuplicateWorkflowError(
                    f"a workflow instance of type {key[0]!r} with business id {key[1]!r} was just created "
                    f"(id {created}; unique={new.unique!r})",
                    instance_id=created,
                )
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            record = await insert(new)
            future.set_result(record.id)
            return record
        finally:
            if not future.done():
                future.set_result(None)
            if self._pending.get(key) is future:
                del self._pending[key]
