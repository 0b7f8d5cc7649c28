"""SQLite connection settings: the engine's connections and the backend's own alike.

``busy_timeout``, WAL and ``foreign_keys=ON`` on every connection; transactions begin with ``BEGIN
IMMEDIATE`` (the write lock up front, so two writers queue on ``busy_timeout`` instead of failing
with "database is locked" when a read transaction upgrades). These are engine event listeners, so
on an engine the caller passes in they apply to the caller's own connections too. Single statements
outside a transaction run on a view of the engine whose ``begin`` listener skips ``BEGIN``.

A connection SQLAlchemy invalidates (a statement cut by a cancellation or a timeout) has its running
statement stopped and its transaction rolled back before it is closed: see :func:`_sqlite_on_invalidate`.
An in-memory database's connection is not invalidated for a cut (:func:`_sqlite_on_error`): the
database would go with it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.util.concurrency import in_greenlet

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

CUT_CHECK_OPS = 1_000_000
"""Virtual machine steps between two looks of a statement at whether its connection was cut (some
tens of milliseconds of work; statements shorter than that, the hot path's, never look)."""

logger = logging.getLogger(__name__)

_AUTOCOMMIT_OPTION = "asyncflow_autocommit"
_CONFIGURED = "asyncflow_sqlite_configured"
_CUT = "asyncflow_sqlite_cut"


def engine_url(url: URL, kwargs: dict[str, Any]) -> URL:
    """``url`` with the aiosqlite driver where it names none; for an in-memory database ``kwargs``
    (the engine's, changed in place) get a pool of exactly one connection."""
    if "+" not in url.drivername:
        url = url.set(drivername="sqlite+aiosqlite")
    if _in_memory(url) and "poolclass" not in kwargs:
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
        event.listen(sync_engine, "invalidate", _sqlite_on_invalidate)
        if _in_memory(engine.url):
            event.listen(sync_engine, "handle_error", _sqlite_on_error)


def _in_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


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
    run_async = getattr(dbapi_connection, "run_async", None)  # aiosqlite (an async driver)
    if run_async is not None and in_greenlet():
        cut = _Cut()
        run_async(lambda driver: driver.set_progress_handler(cut, CUT_CHECK_OPS))
        connection_record.info[_CUT] = cut
    connection_record.info[_CONFIGURED] = True


class _Cut:
    """A connection's progress handler: true (stop the statement) once SQLAlchemy has invalidated it."""

    __slots__ = ("cut",)

    def __init__(self) -> None:
        self.cut = False

    def __call__(self) -> bool:
        return self.cut


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


def _sqlite_on_invalidate(
    dbapi_connection: Any, connection_record: Any, exception: BaseException | None
) -> None:
    """Stop the statement of a connection SQLAlchemy is about to close, and end its transaction.

    A cancellation (a timeout) that lands while aiosqlite runs a statement makes SQLAlchemy invalidate
    the connection and close it, in the connection's thread after the statement, however long that
    runs: the cancellation waited for it. And the close (``sqlite3_close_v2``) leaves the connection
    a zombie while the cut statement is not finalized (its cursor lives on in the cancellation's
    traceback), its transaction, and so the file's write lock (``BEGIN IMMEDIATE``), held until the
    garbage collector frees it: every other writer of the file waited out its ``busy_timeout``.

    So the statement stops at its next look at its progress handler (:class:`_Cut`, every
    :data:`CUT_CHECK_OPS` steps: ``sqlite3_interrupt`` instead would also stop the ROLLBACK when the
    statement has already returned its first row), and a ROLLBACK runs in the connection's thread
    before the close. A second cancellation stops the wait only (SQLAlchemy's close does the same):
    the ROLLBACK, queued, still runs first. Outside SQLAlchemy's greenlet (the garbage collector)
    nothing can be awaited: the statement is stopped only.
    """
    cut = connection_record.info.get(_CUT)
    if cut is None:
        return
    cut.cut = True
    if not in_greenlet():
        return
    try:
        dbapi_connection.run_async(_roll_back)
    except (Exception, asyncio.CancelledError) as error:  # the connection is closed next anyway
        logger.debug("could not roll back an invalidated SQLite connection: %r", error)


async def _roll_back(driver: Any) -> None:
    await asyncio.shield(driver.rollback())


def _sqlite_on_error(context: ExceptionContext) -> None:
    """A statement of an in-memory database cut by a cancellation (a timeout) does not invalidate its
    connection: SQLAlchemy takes such a cut for a lost connection and closes it, and the database,
    private to that connection, went with it (every later call: "no such table"). The connection is
    kept: its thread runs the cut statement to its end, and what comes next (the ROLLBACK of a
    ``transaction()``, the pool's reset) waits behind it, as a call outside ``transaction()`` does
    (:meth:`~asyncflow.store.sqlite.backend.SqliteBackend._on_sqlalchemy`)."""
    if context.is_disconnect and not isinstance(context.original_exception, Exception):
        context.is_disconnect = False
