"""Every difference between SQLite and PostgreSQL the SQL repo has to know about, in one place.

* Engines built from a URL: a missing driver names the extra to install; asyncpg gets a connect
  timeout so an unreachable server fails fast instead of hanging.
* SQLite connections get ``busy_timeout``, WAL and ``foreign_keys=ON``; transactions begin with
  ``BEGIN IMMEDIATE`` (the write lock up front, so two writers queue on ``busy_timeout`` instead of
  failing with "database is locked" when a read transaction upgrades). These are engine event
  listeners, so on an engine the caller passes in they apply to the caller's own connections too.
* Single statements outside a transaction run on an autocommit connection (no BEGIN/COMMIT round
  trips): PostgreSQL's ``AUTOCOMMIT`` isolation level; on SQLite the ``begin`` listener skips BEGIN.
* Unique violations: SQLSTATE ``23505`` or ``SQLITE_CONSTRAINT_UNIQUE``.
* Claiming due instances: one ``UPDATE ... FOR UPDATE SKIP LOCKED ... RETURNING`` on PostgreSQL
  (autocommit); on SQLite, which can neither lock rows nor return a sub-select's columns, a SELECT and
  an UPDATE that re-checks the due condition, in one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from sqlalchemy import event, exc, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from ..errors import ParamInvalidError, StoreError, UniqueViolationError
from . import _statements as st

__all__ = [
    "DB_ERRORS",
    "POSTGRES_CONNECT_TIMEOUT",
    "SQLITE_BUSY_TIMEOUT_MS",
    "autocommit_engine",
    "claim_due",
    "claim_is_one_statement",
    "configure_engine",
    "create_engine_from_url",
    "is_unique_violation",
    "lock_schema",
    "sqlstate",
    "store_error",
]

POSTGRES_CONNECT_TIMEOUT = 5.0
"""Seconds asyncpg may take to connect (engines built from a URL; override with ``connect_args``)."""

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for the write lock before "database is locked"."""

_AUTOCOMMIT_OPTION = "asyncflow_autocommit"
_CONFIGURED = "asyncflow_sqlite_configured"
_SCHEMA_LOCK_KEY = 0x61737966  # "asyf": serializes concurrent create_schema() on PostgreSQL

_errors: list[type[BaseException]] = [exc.SQLAlchemyError, OSError, TimeoutError, sqlite3.Error]
try:  # asyncpg is an optional extra
    import asyncpg as _asyncpg
except ImportError:  # pragma: no cover - depends on the installed extras
    pass
else:
    # InternalClientError: a query on a connection the server just dropped (seen under pg_terminate_backend)
    _errors += [_asyncpg.PostgresError, _asyncpg.InterfaceError, _asyncpg.InternalClientError]
DB_ERRORS: tuple[type[BaseException], ...] = tuple(_errors)
"""What a database call may raise besides our own errors; repos turn these into ``StoreError``."""


def create_engine_from_url(url: str | URL, engine_kwargs: dict[str, Any]) -> AsyncEngine:
    """Build an engine the repo will own. ``sqlite://`` / ``postgresql://`` get the async driver."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError as error:
        raise ParamInvalidError(f"not a database URL: {url!r}") from error
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    kwargs = dict(engine_kwargs)
    if backend == "postgresql":
        if "+" not in parsed.drivername:
            parsed = parsed.set(drivername="postgresql+asyncpg")
            driver = "asyncpg"
        if driver == "asyncpg":
            try:
                import asyncpg  # noqa: F401
            except ImportError as error:
                raise ImportError(
                    "postgresql+asyncpg URLs need the asyncpg driver: pip install 'asyncflow[postgres]'"
                ) from error
            connect_args = dict(kwargs.get("connect_args") or {})
            connect_args.setdefault("timeout", POSTGRES_CONNECT_TIMEOUT)
            kwargs["connect_args"] = connect_args
    elif backend == "sqlite":
        if "+" not in parsed.drivername:
            parsed = parsed.set(drivername="sqlite+aiosqlite")
        if parsed.database in (None, "", ":memory:") and "poolclass" not in kwargs:
            # one private in-memory database per connection: keep exactly one, never shared at once
            kwargs.update(poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0)
    else:
        raise ParamInvalidError(
            f"unsupported database {backend!r}: use sqlite+aiosqlite:// or postgresql+asyncpg://"
        )
    try:
        return create_async_engine(parsed, **kwargs)
    except exc.InvalidRequestError as error:
        raise ParamInvalidError(f"cannot use {parsed.drivername!r} with asyncio: {error}") from error


def configure_engine(engine: AsyncEngine) -> None:
    """Install the SQLite connection settings on ``engine`` (once; nothing to do for PostgreSQL)."""
    if engine.dialect.name != "sqlite":
        return
    sync_engine = engine.sync_engine
    if not event.contains(sync_engine, "connect", _sqlite_on_connect):
        event.listen(sync_engine, "connect", _sqlite_on_connect)
        event.listen(sync_engine, "checkout", _sqlite_on_checkout)
        event.listen(sync_engine, "begin", _sqlite_on_begin)


def autocommit_engine(engine: AsyncEngine) -> AsyncEngine:
    """A view of ``engine`` (same pool) whose connections run each statement in its own transaction."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(**{_AUTOCOMMIT_OPTION: True})
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def _configure_sqlite(dbapi_connection: Any, connection_record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver never begins on its own: _sqlite_on_begin does
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()
    connection_record.info[_CONFIGURED] = True


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    _configure_sqlite(dbapi_connection, connection_record)


def _sqlite_on_checkout(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    # connections pooled before the repo configured a caller's engine
    if not connection_record.info.get(_CONFIGURED):
        _configure_sqlite(dbapi_connection, connection_record)


def _sqlite_on_begin(conn: Any) -> None:
    if not conn.get_execution_options().get(_AUTOCOMMIT_OPTION):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


async def lock_schema(conn: AsyncConnection) -> None:
    """Serialize concurrent ``create_schema()`` calls (SQLite's BEGIN IMMEDIATE already does)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})


def claim_is_one_statement(engine: AsyncEngine) -> bool:
    """Whether :func:`claim_due` is a single statement (else it needs a transaction of its own)."""
    return engine.dialect.name == "postgresql"


async def claim_due(
    conn: AsyncConnection, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]
) -> list[int]:
    """Lease up to ``limit`` due instances; ids ordered by ``(next_run_at, id)``."""
    params: dict[str, Any] = {"now_ms": now_ms, "limit": limit, "p_lease": now_ms + lease_ms}
    if types:
        params["types"] = list(types)
    if conn.dialect.name == "postgresql":
        stmt = st.CLAIM_PG_TYPED if types else st.CLAIM_PG
        rows = (await conn.execute(stmt, params)).all()
        return [row[0] for row in sorted(rows, key=lambda row: (row[1], row[0]))]
    select_stmt = st.DUE_SELECT_TYPED if types else st.DUE_SELECT
    ids = [row[0] for row in (await conn.execute(select_stmt, params)).all()]
    if not ids:
        return []
    params["p_ids"] = ids
    claimed = set((await conn.execute(st.CLAIM_IDS, params)).scalars().all())
    return [i for i in ids if i in claimed]


def _driver_exception(error: BaseException) -> BaseException:
    """The driver's own exception behind a SQLAlchemy one (asyncpg's, not the DBAPI adapter's)."""
    if isinstance(error, exc.DBAPIError) and error.orig is not None:
        orig: BaseException = error.orig
        if type(orig).__module__.startswith("sqlalchemy") and orig.__cause__ is not None:
            return orig.__cause__
        return orig
    return error


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL error, raw from asyncpg or wrapped by SQLAlchemy (else ``None``)."""
    for item in (error, _driver_exception(error)):
        code = getattr(item, "sqlstate", None)
        if isinstance(code, str):
            return code
    return None


def is_unique_violation(error: BaseException) -> bool:
    for item in (error, getattr(error, "orig", None), _driver_exception(error)):
        if item is None:
            continue
        if getattr(item, "sqlstate", None) == "23505":
            return True
        if getattr(item, "sqlite_errorname", None) in (
            "SQLITE_CONSTRAINT_UNIQUE",
            "SQLITE_CONSTRAINT_PRIMARYKEY",
        ):
            return True
    return False


def _missing_table(cause: BaseException) -> bool:
    return getattr(cause, "sqlstate", None) == "42P01" or "no such table" in str(cause)


def store_error(error: BaseException, operation: str) -> StoreError:
    """A ``StoreError`` (``UniqueViolationError`` for a unique constraint) with the driver's cause."""
    cause = _driver_exception(error)
    message = f"{operation} failed: {type(cause).__name__}: {cause}"
    if _missing_table(cause):
        message += " (has create_schema() been run on this database?)"
    kind = UniqueViolationError if is_unique_violation(error) else StoreError
    result = kind(message)
    result.__cause__ = cause
    return result
