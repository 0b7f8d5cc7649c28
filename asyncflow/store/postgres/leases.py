"""The leases of ``DatabaseWorkflowLock`` on PostgreSQL: rows of ``asyncflow_lock``, timed by the
database's clock (so the processes' clocks need not agree).

Every statement runs on a lane of its own (autocommit), also when the caller is inside
``transaction()``: a lease must be visible to other processes at once, and must outlive a rollback.
Acquires and releases that wait at the same time go as one statement (:class:`LeaseBatches`, with the
group commit of :mod:`asyncflow.store._batcher`), as steps do. Every statement that locks several
rows locks them in key order, so two of them never deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .lanes import PgLanes

__all__ = ["LeaseBatches", "acquire", "release", "renew"]

_NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
_ACQUIRE = (
    "INSERT INTO asyncflow_lock AS l (key, holder, expires_at) "
    f"SELECT r.key, r.holder, {_NOW_MS} + r.ttl "
    "FROM unnest($1::text[], $2::text[], $3::bigint[]) AS r(key, holder, ttl) ORDER BY r.key "
    "ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
    f"WHERE l.expires_at <= {_NOW_MS} RETURNING l.key, l.holder"
)
"""Take free or expired keys (an expired holder's row is taken over in the same statement)."""
_LOCKED = (
    "WITH r AS (SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) AS r(key, holder, ttl)), "
    "mine AS (SELECT l.key, r.ttl FROM asyncflow_lock AS l JOIN r ON l.key = r.key AND l.holder = r.holder"
    "{alive} ORDER BY l.key FOR UPDATE OF l) "
)
_RENEW = (
    _LOCKED.format(alive=f" WHERE l.expires_at > {_NOW_MS}")
    + f"UPDATE asyncflow_lock AS l SET expires_at = {_NOW_MS} + mine.ttl FROM mine WHERE l.key = mine.key "
    "RETURNING l.key, l.holder"
)
_RELEASE = (
    _LOCKED.format(alive="")
    + "DELETE FROM asyncflow_lock AS l USING mine WHERE l.key = mine.key RETURNING l.key, l.holder"
)


async def acquire(db: Any, leases: Sequence[tuple[str, str, int]]) -> list[bool]:
    """Take each ``(key, holder, ttl_ms)`` whose key is free or expired; whether each was taken.

    Keys must be distinct.
    """
    rows = await db.fetch(_ACQUIRE, *_columns(leases))
    taken = {(row[0], row[1]) for row in rows}
    return [(key, holder) in taken for key, holder, _ in leases]


async def renew(db: Any, leases: Sequence[tuple[str, str, int]]) -> list[bool]:
    """Extend each ``(key, holder, ttl_ms)`` still held and unexpired; whether each was, in order."""
    renewed = {(row[0], row[1]) for row in await db.fetch(_RENEW, *_columns(leases))}
    return [(key, holder) in renewed for key, holder, _ in leases]


async def release(db: Any, leases: Sequence[tuple[str, str]]) -> list[bool]:
    """Delete each ``(key, holder)`` still held; whether each was."""
    rows = await db.fetch(_RELEASE, *_columns([(key, holder, 0) for key, holder in leases]))
    deleted = {(row[0], row[1]) for row in rows}
    return [(key, holder) in deleted for key, holder in leases]


def _columns(leases: Sequence[tuple[str, str, int]]) -> tuple[list[str], list[str], list[int]]:
    return [lease[0] for lease in leases], [lease[1] for lease in leases], [lease[2] for lease in leases]


class LeaseBatches:
    """Acquires (``(key, holder, ttl_ms)`` items) or releases (``(key, holder, 0)``) that wait at the
    same time, as one statement; outcomes are whether each applied. An acquire of a key already in the
    batch is not applied (one holder at a time: the first one tries); a release repeated in the batch
    (same key and holder) has nothing left to free."""

    def __init__(self, lanes: PgLanes, *, release: bool = False) -> None:
        self._lanes = lanes
        self._release = release

    async def __call__(self, items: Sequence[tuple[str, str, int]]) -> list[Any]:
        first: dict[tuple[str, str], int] = {}
        for index, (key, holder, _) in enumerate(items):
            first.setdefault((key, holder) if self._release else (key, ""), index)
        distinct = [items[index] for index in first.values()]
        async with self._lanes.lane() as conn:
            if self._release:
                done = await release(conn, [(key, holder) for key, holder, _ in distinct])
            else:
                done = await acquire(conn, distinct)
        outcome = dict(zip(first.values(), done, strict=True))
        return [outcome.get(index, False) for index in range(len(items))]
