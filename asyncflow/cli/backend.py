"""What every CLI command needs: the URLs (flags, then ``ASYNCFLOW_*`` variables, then defaults), a
service on them, and expected failures turned into one-line messages (:class:`CLIError`).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from sqlalchemy import exc as sa_exc
from sqlalchemy import make_url

from .._store_hints import store_error_hint
from .._urls import check_database_url, redact_url, scrub_secrets
from ..engine.rules import SchedulePolicy
from ..engine.service import WorkflowService
from ..errors import ParamInvalidError, StoreError
from ..lock.database import DatabaseWorkflowLock
from ..lock.local import LocalWorkflowLock
from ..lock.protocol import WorkflowLock
from ..lock.redis import RedisWorkflowLock
from ..registry import Registry
from ..retry import RetryPolicy
from ..store.sqlalchemy import SQLAlchemyWorkflowRepo

__all__ = [
    "DB_ENV",
    "DEFAULT_DB_URL",
    "REDIS_ENV",
    "CLIError",
    "describe_store_error",
    "open_service",
    "redact",
    "resolve_db_url",
    "resolve_redis_url",
    "sqlite_file",
]

DB_ENV = "ASYNCFLOW_DB_URL"
REDIS_ENV = "ASYNCFLOW_REDIS_URL"
DEFAULT_DB_URL = "sqlite+aiosqlite:///asyncflow.db"
"""The CLI's database when neither ``--db`` nor ``ASYNCFLOW_DB_URL`` is given: a file in the cwd."""

REDIS_PING_TIMEOUT = 3.0


class CLIError(Exception):
    """An expected failure: printed as one line on stderr, exit code ``code`` (no traceback).

    ``code`` is 2 for usage errors and bad input, 1 for things not found, refused operations and
    unreachable services.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def resolve_db_url(flag: str | None, environ: Mapping[str, str] | None = None) -> str:
    """``--db``, else ``ASYNCFLOW_DB_URL``, else :data:`DEFAULT_DB_URL`."""
    env = os.environ if environ is None else environ
    return flag or env.get(DB_ENV) or DEFAULT_DB_URL


def resolve_redis_url(flag: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """``--redis``, else ``ASYNCFLOW_REDIS_URL``, else ``None`` (the lock in the database on
    PostgreSQL, a lock local to the process on SQLite)."""
    env = os.environ if environ is None else environ
    return flag or env.get(REDIS_ENV) or None


def redact(url: str) -> str:
    """The URL with its password hidden (never the raw text, even when it does not parse)."""
    return redact_url(url)


def sqlite_file(url: str) -> pathlib.Path | None:
    """The file of a ``sqlite`` URL (``None`` for other databases and in-memory SQLite)."""
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return pathlib.Path(parsed.database)


def describe_store_error(error: StoreError, url: str) -> str:
    """One line for a database failure, with a hint for the usual causes."""
    hint = store_error_hint(error)
    return f"database {redact(url)}: {error}" + ("" if hint is None else f" ({hint})")


def _open_lock(redis_url: str | None, repo: SQLAlchemyWorkflowRepo) -> WorkflowLock:
    """Redis with a URL; else on PostgreSQL the lock in the database itself (every worker process
    on one database shares it); else (SQLite) a lock local to the process."""
    if redis_url is None:
        if repo.shared_by_processes:
            return DatabaseWorkflowLock(repo)
        return LocalWorkflowLock()
    try:
        return RedisWorkflowLock(redis_url)
    except ParamInvalidError as error:  # its message names the URL with the password hidden
        raise CLIError(str(error), 2) from error
    except ImportError as error:
        raise CLIError(str(error), 2) from error


async def _ping(lock: RedisWorkflowLock, url: str) -> None:
    try:
        async with asyncio.timeout(REDIS_PING_TIMEOUT):
            await lock.client.ping()
    except asyncio.CancelledError:
        raise
    except Exception as error:  # redis errors, OSError, TimeoutError: all mean "cannot use it"
        detail = str(error) or type(error).__name__
        raise CLIError(f"cannot reach Redis at {redact(url)}: {detail}", 1) from error


@asynccontextmanager
async def open_service(
    db_flag: str | None,
    redis_flag: str | None,
    registry: Registry,
    *,
    create_file: bool = False,
    schedule: SchedulePolicy | None = None,
    retry: RetryPolicy | None = None,
) -> AsyncIterator[WorkflowService]:
    """A service on the resolved database and lock, closed afterwards.

    A SQLite file that does not exist is an error unless ``create_file`` (``init-db``, ``demo``): a
    mistyped path must not silently create an empty database. ``StoreError`` inside the block becomes a
    :class:`CLIError` naming the database.
    """
    url = resolve_db_url(db_flag)
    try:
        check_database_url(url)
    except ParamInvalidError as error:
        raise CLIError(str(error), 2) from error
    path = sqlite_file(url)
    if path is not None and not create_file and not path.exists():
        raise CLIError(
            f"database file {str(path)!r} does not exist (run `asyncflow init-db` or `asyncflow demo` "
            "here first, or pass --db URL / set ASYNCFLOW_DB_URL)",
            1,
        )
    if path is not None and create_file and not path.parent.exists():
        raise CLIError(f"cannot create {str(path)!r}: folder {str(path.parent)!r} does not exist", 1)
    try:
        repo = SQLAlchemyWorkflowRepo(url)
    except ParamInvalidError as error:  # the repo's message may quote the URL: hide its password
        raise CLIError(scrub_secrets(f"bad database URL {redact(url)!r}: {error}", url), 2) from error
    except ImportError as error:
        raise CLIError(str(error), 2) from error
    redis_url = resolve_redis_url(redis_flag)
    try:
        lock = _open_lock(redis_url, repo)
        try:
            if isinstance(lock, RedisWorkflowLock) and redis_url is not None:
                await _ping(lock, redis_url)
            yield WorkflowService(repo, lock, registry, schedule=schedule, retry=retry)
        except StoreError as error:
            raise CLIError(describe_store_error(error, url), 1) from error
        finally:
            if isinstance(lock, RedisWorkflowLock | DatabaseWorkflowLock):
                await lock.aclose()
    finally:
        await repo.aclose()
