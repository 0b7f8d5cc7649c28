"""The leases of ``DatabaseWorkflowLock`` on SQLite: rows of ``asyncflow_lock``, bodies for
:func:`asyncflow.store.sqlite.sql.write` (one ``BEGIN IMMEDIATE`` transaction each). Times are the
callers' wall clock in milliseconds (processes sharing a database file share the host's clock)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["acquire", "release", "renew"]

_ACQUIRE = (
    "INSERT INTO asyncflow_lock (key, holder, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
    "WHERE asyncflow_lock.expires_at <= ? RETURNING 1"
)
_RENEW = "UPDATE asyncflow_lock SET expires_at = ? WHERE key = ? AND holder = ? AND expires_at > ?"
_RELEASE = "DELETE FROM asyncflow_lock WHERE key = ? AND holder = ?"


def acquire(db: Any, key: str, holder: str, ttl_ms: int, now_ms: int) -> bool:
    """Whether ``holder`` now holds ``key`` (until ``now_ms + ttl_ms``)."""
    return db.execute(_ACQUIRE, (key, holder, now_ms + ttl_ms, now_ms)).fetchone() is not None


def renew(db: Any, leases: Sequence[tuple[str, str, int]], now_ms: int) -> list[bool]:
    """Extend each ``(key, holder, ttl_ms)`` still held and unexpired; whether each was, in order."""
    return [
        db.execute(_RENEW, (now_ms + ttl_ms, key, holder, now_ms)).rowcount == 1
        for key, holder, ttl_ms in leases
    ]


def release(db: Any, key: str, holder: str) -> bool:
    """Delete ``key`` if ``holder`` still holds it; whether it did."""
    return bool(db.execute(_RELEASE, (key, holder)).rowcount == 1)
