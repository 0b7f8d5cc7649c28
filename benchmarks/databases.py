"""Throw-away databases for benchmark runs, and commit counts read from PostgreSQL itself.

Every PostgreSQL run gets a fresh database (``asyncflow_bench_<pid>_<n>``), dropped afterwards, so rows
never pile up between runs and ``pg_stat_database.xact_commit`` of that database counts exactly the
transactions of the run, whoever sent them (asyncflow, DBOS or the floor's raw statements).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "BenchDatabaseError",
    "PgAdmin",
    "PgDatabase",
    "check_postgres",
    "check_redis",
    "sqlite_file",
]

_counter = itertools.count(1)


class BenchDatabaseError(RuntimeError):
    """A benchmark database could not be created, inspected or dropped."""


@dataclass(frozen=True, slots=True)
class PgDatabase:
    """A fresh PostgreSQL database: its name, a SQLAlchemy asyncpg URL and a plain libpq DSN."""

    name: str
    sqlalchemy_url: str
    dsn: str


def _urls(url: str, database: str) -> tuple[str, str]:
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(database=database)
    sqlalchemy_url = parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    return sqlalchemy_url, dsn


class PgAdmin:
    """Administrative statements on the server of ``url`` (through its own database, never a bench one)."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.url = url
        self.maintenance_db = make_url(url).database or "postgres"
        _, self._dsn = _urls(url, self.maintenance_db)

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(self._dsn)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def _execute(self, statement: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self._dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async def server_version(self) -> str:
        rows = await self._fetch("SHOW server_version")
        return str(rows[0][0])

    async def server_version_num(self) -> int:
        """The server's ``server_version_num`` (150000 and up: PostgreSQL 15)."""
        rows = await self._fetch("SELECT current_setting('server_version_num')::int")
        return int(rows[0][0])

    def new_name(self, tag: str) -> str:
        return f"asyncflow_bench_{os.getpid()}_{next(_counter)}_{tag}".lower()

    async def create_database(self, name: str) -> PgDatabase:
        await self._execute(f'CREATE DATABASE "{name}"')
        sqlalchemy_url, dsn = _urls(self.url, name)
        return PgDatabase(name=name, sqlalchemy_url=sqlalchemy_url, dsn=dsn)

    async def set_database_option(self, name: str, option: str, value: str) -> None:
        """``ALTER DATABASE name SET option = value``: sessions opened afterwards start with it."""
        if not (option.isidentifier() and value.isidentifier()):
            raise ValueError(f"not a setting: {option}={value}")
        await self._execute(f'ALTER DATABASE "{name}" SET {option} = {value}')

    async def drop_database(self, name: str) -> None:
        await self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def drop_databases_of(self, pid: int) -> list[str]:
        """Drop the benchmark databases process ``pid`` created (after it was killed); their names."""
        rows = await self._fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"asyncflow_bench_{pid}_%"
        )
        names = [str(row[0]) for row in rows]
        for name in names:
            await self.drop_database(name)
        return names

    @asynccontextmanager
    async def fresh_database(self, tag: str) -> AsyncIterator[PgDatabase]:
        """A new database for one run, dropped on exit (even on failure or cancellation)."""
        db = await self.create_database(self.new_name(tag))
        try:
            yield db
        finally:
            await asyncio.shield(self.drop_database(db.name))

    async def xact_commit(
        self, name: str, *, settle_timeout: float = 15.0, wait_idle: bool = True, sessions: int = 0
    ) -> int:
        """Committed transactions of database ``name`` once at most ``sessions`` are connected to it.

        A backend publishes its counters when it exits (an idle one may hold them back up to 10 s), so
        the caller closes its connections first and this waits until the database has no backend left;
        or it flushed the ``sessions`` it keeps open (``pg_stat_force_next_flush()``) and this waits
        for the others to exit. With ``wait_idle=False`` it reads at once.
        """
        deadline = asyncio.get_running_loop().time() + settle_timeout
        query = (
            "SELECT pg_stat_clear_snapshot(), "
            "(SELECT xact_commit FROM pg_stat_database WHERE datname = $1), "
            "(SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend')"
        )
        while True:
            rows = await self._fetch(query, name)
            commits, backends = rows[0][1], rows[0][2]
            if commits is None:
                raise BenchDatabaseError(f"database {name!r} has no statistics row")
            if backends <= sessions or not wait_idle:
                return int(commits)
            if asyncio.get_running_loop().time() > deadline:
                log.warning("database %s still has %d sessions; commit count may be short", name, backends)
                return int(commits)
            await asyncio.sleep(0.05)


async def check_postgres(url: str) -> str | None:
    """``None`` if PostgreSQL at ``url`` answers and lets us create databases, else why not."""
    try:
        admin = PgAdmin(url)
        rows = await admin._fetch("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
    except ImportError as exc:
        return f"asyncpg is not installed ({exc})"
    except Exception as exc:  # any connection failure means "skip the PostgreSQL rows"
        return f"PostgreSQL at {url} is not reachable: {type(exc).__name__}: {exc}"
    if not rows or not rows[0][0]:
        return f"the PostgreSQL role of {url} may not create databases"
    return None


async def check_redis(url: str) -> str | None:
    """``None`` if Redis at ``url`` answers a PING, else why not."""
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:
        return f"redis is not installed ({exc})"
    client = aioredis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0)
    try:
        await client.ping()
    except Exception as exc:  # any failure means "skip the Redis rows"
        return f"Redis at {url} is not reachable: {type(exc).__name__}: {exc}"
    finally:
        await client.aclose()
    return None


@contextmanager
def sqlite_file(tag: str) -> Iterator[str]:
    """A path for a fresh SQLite database in a temporary directory, removed (with WAL files) on exit."""
    directory = tempfile.mkdtemp(prefix=f"asyncflow_bench_{tag}_")
    try:
        yield os.path.join(directory, "bench.db")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
