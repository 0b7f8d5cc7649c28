"""How database errors become ``StoreError``: the driver's own exception as the cause, unique
violations as ``UniqueViolationError`` (SQLSTATE ``23505`` or ``SQLITE_CONSTRAINT_UNIQUE``)."""

from __future__ import annotations

import sqlite3
from types import TracebackType

from sqlalchemy import exc

from ..errors import StoreError, UniqueViolationError

__all__ = [
    "DB_ERRORS",
    "StaleStep",
    "StepConflict",
    "StoreErrors",
    "is_unique_violation",
    "sqlstate",
    "store_error",
]

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
        message += " (has migrate() (create_schema()) been run on this database?)"
    kind = UniqueViolationError if is_unique_violation(error) else StoreError
    result = kind(message)
    result.__cause__ = cause
    return result


class StoreErrors:
    """``with StoreErrors("op"):`` turns driver and SQLAlchemy errors into ``StoreError``.

    The driver's own exception (asyncpg's, sqlite3's) becomes ``__cause__``; a unique violation
    becomes ``UniqueViolationError``. Other exceptions (ours, ``CancelledError``) pass untouched.
    """

    __slots__ = ("operation",)

    def __init__(self, operation: str) -> None:
        self.operation = operation

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if error is not None and isinstance(error, DB_ERRORS):
            wrapped = store_error(error, self.operation)
            raise wrapped from wrapped.__cause__


class StepConflict(Exception):
    """A condition of a step failed: it was rolled back; the repo reports ``applied=False``."""


class StaleStep(StepConflict):
    """The step's lease epoch is no longer the instance's: ``applied=False, stale=True``."""
