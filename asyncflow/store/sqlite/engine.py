"""SQLite connection settings: the engine's connections and the backend's own alike.

``busy_timeout``, WAL and ``foreign_keys=ON`` on every connection; transactions begin with ``BEGIN
IMMEDIATE`` (the write lock up front, so two writers queue on ``busy_timeout`` instead of failing
with "database is locked" when a read transaction upgrades). These are engine event listeners, so
on an engine the caller passes in they apply to the caller's own connections too. Single statements
outside a transaction run on a view of the engine whose ``begin`` listener skips ``BEGIN``.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool

__all__ = [
    "PRAGMAS",
    "SQLITE_BUSY_TIMEOUT_MS",
    "autocommit_engine",
    "configure_engine",
    "connect",
    "engine_url",
]

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for the write lock before "database is locked"."""

PRAGMAS = (
    f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode = WAL",
    "PRAGMA foreign_keys = ON",
)

_AUTOCOMMIT_OPTION = "asyncflow_autocommit"
_CONFIGURED = "asyncflow_sqlite_configured"


def engine_url(url: URL, kwargs: dict[str, Any]) -> URL:
    """``url`` with the aiosqlite driver where it names none; for an in-memory database ``kwargs``
    (the engine's, changed in place) get a pool of exactly one connection."""
    if "+" not in url.drivername:
        url = url.set(drivername="sqlite+aiosqlite")
    if url.database in (None, "", ":memory:") and "poolclass" not in kwargs:
        # one private in-memory database per connection: keep exactly one, never shared at once
        kwargs.update(poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0)
    return url


def configure_engine(engine: AsyncEngine) -> None:
    """Install the SQLite connection settings on ``engine`` (once; nothing to do for PostgreSQL)."""
    sync_engine = engine.sync_engine
    if not event.contains(sync_engine, "connect", _sqlite_on_connect):
        event.listen(sync_engine, "connect", _sqlite_on_connect)
        event.listen(sync_engine, "checkout", _sqlite_on_checkout)
        event.listen(sync_engine, "begin", _sqlite_on_begin)


def autocommit_engine(engine: AsyncEngine) -> AsyncEngine:
    """A view of ``engine`` (same pool) whose connections run each statement in its own transaction."""
    return engine.execution_options(**{_AUTOCOMMIT_OPTION: True})


def _pragmas(connection: Any) -> None:
    cursor = connection.cursor()
    try:
        for pragma in PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _configure_sqlite(dbapi_connection: Any, connection_record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver never begins on its own: _sqlite_on_begin does
    _pragmas(dbapi_connection)
    connection_record.info[_CONFIGURED] = True


def connect(path: str) -> sqlite3.Connection:
    """A ``sqlite3`` connection to the file ``path`` with the same settings (autocommit mode)."""
    connection = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
    try:
        _pragmas(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    _configure_sqlite(dbapi_connection, connection_record)


def _sqlite_on_checkout(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    # connections pooled before the repo configured a caller's engine
    if not connection_record.info.get(_CONFIGURED):
        _configure_sqlite(dbapi_connection, connection_record)


def _sqlite_on_begin(conn: Any) -> None:
    if not conn.get_execution_options().get(_AUTOCOMMIT_OPTION):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
