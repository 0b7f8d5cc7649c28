"""The leases of ``DatabaseWorkflowLock`` on PostgreSQL: rows of ``asyncflow_lock``, timed by the
database's clock (so the processes' clocks need not agree).

Every statement runs on a lane of its own (autocommit), also when the caller is inside
``transaction()``: a lease must be visible to other processes at once, and must outlive a rollback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["acquire", "release", "renew"]

_NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
_ACQUIRE = (
    "INSERT INTO asyncflow_lock AS l (key, holder, expires_at) "
    f"VALUES ($1::text, $2::text, {_NOW_MS} + $3::bigint) "
    "ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
    f"WHERE l.expires_at <= {_NOW_MS} RETURNING 1"
)
"""Take a free or expired key (an expired holder's row is taken over in the same statement)."""
_RENEW = (
    f"UPDATE asyncflow_lock AS l SET expires_at = {_NOW_MS} + r.ttl "
    "FROM unnest($1::text[], $2::text[], $3::bigint[]) AS r(key, holder, ttl) "
    f"WHERE l.key = r.key AND l.holder = r.holder AND l.expires_at > {_NOW_MS} RETURNING l.key"
)
_RELEASE = "DELETE FROM asyncflow_lock WHERE key = $1::text AND holder = $2::text"


async def acquire(db: Any, key: str, holder: str, ttl_ms: int) -> bool:
    """Whether ``holder`` now holds ``key`` (for ``ttl_ms``)."""
    return await db.fetchval(_ACQUIRE, key, holder, ttl_ms) is not None


async def renew(db: Any, leases: Sequence[tuple[str, str, int]]) -> list[bool]:
    """Extend each ``(key, holder, ttl_ms)`` still held and unexpired; whether each was, in order."""
    rows = await db.fetch(
        _RENEW, [lease[0] for lease in leases], [lease[1] for lease in leases], [lease[2] for lease in leases]
    )
    renewed = {row[0] for row in rows}
    return [key in renewed for key, _, _ in leases]


async def release(db: Any, key: str, holder: str) -> bool:
    """Delete ``key`` if ``holder`` still holds it; whether it did."""
    status: str = await db.execute(_RELEASE, key, holder)
    return status.endswith(" 1")
