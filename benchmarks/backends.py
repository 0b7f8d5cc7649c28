"""The stores and locks of asyncflow benchmark runs, and how their commits are counted.

Every run gets a fresh store: a new PostgreSQL database (dropped afterwards), a new SQLite file in a
temporary directory, or a new memory repo; the Redis lock gets a per-run key prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncflow as af

from .databases import PgAdmin, sqlite_file
from .harness import SqlCommitCounter

__all__ = ["Backend", "BenchmarkError", "make_lock", "open_backend"]


class BenchmarkError(RuntimeError):
    """A benchmark run did not do what it measures (an instance did not complete, a service failed)."""


def make_lock(kind: str, redis_url: str | None, repo: Any = None) -> Any:
    """A fresh ``local``, ``redis`` or ``database`` lock (Redis: a key prefix of its own; database:
    ``DatabaseWorkflowLock`` on the run's repo)."""
    if kind == "local":
        return af.LocalWorkflowLock()
    if kind == "database":
        return af.DatabaseWorkflowLock(repo, prefix=f"asyncflow_bench_{os.getpid()}_{time.time_ns()}:")
    if kind == "redis":
        if not redis_url:
            raise BenchmarkError("the redis lock needs --redis-url")
        return af.RedisWorkflowLock(redis_url, prefix=f"asyncflow_bench_{os.getpid()}_{time.time_ns()}:")
    raise ValueError(f"unknown lock {kind!r}: local, redis or database")


def _repo_engine(repo: Any) -> Any:
    from sqlalchemy.ext.asyncio import AsyncEngine

    for name in ("engine", "_engine"):
        engine = getattr(repo, name, None)
        if isinstance(engine, AsyncEngine):
            return engine
    return None


class _CountingRepos:
    """Makes SQL repos whose engine's commits a :class:`SqlCommitCounter` counts."""

    def __init__(self, url: str, engine_kwargs: dict[str, Any]) -> None:
        self.url = url
        self.engine_kwargs = engine_kwargs
        self.counter = SqlCommitCounter()
        self.made: list[Any] = []

    def make(self) -> Any:
        repo = af.SQLAlchemyWorkflowRepo(self.url, **self.engine_kwargs)
        engine = _repo_engine(repo)
        if engine is not None:
            self.counter.attach(engine)
        self.made.append(repo)
        return repo

    def counted(self, final: bool = True) -> tuple[int, int] | None:
        """The commits so far; ``final``: and stop counting (the repo is closed)."""
        if not self.counter.attached:
            return None
        if final:
            self.counter.detach()
        return self.counter.commits, self.counter.write_commits


async def flush_pg_statistics(repo: Any, *, timeout_s: float = 5.0) -> int:
    """Make every open session of ``repo`` publish its statistics now (PostgreSQL 15+); how many it
    keeps open (each of them flushed).

    A PostgreSQL session holds its counters (``xact_commit`` among them) back for up to 10 s while it
    is open. ``pg_stat_force_next_flush()`` makes it publish them when it next goes idle, before it
    answers, provided it has some table's counters pending too (else it publishes nothing): so the
    statement also reads a catalog table. The repo's kept lanes go back to its pool first, then each
    of the pool's connections, held together so that each is a different one, runs it once."""
    statement = "SELECT pg_stat_force_next_flush(), (SELECT count(*) FROM pg_database)"
    lanes = getattr(getattr(repo, "_backend", None), "_lanes", None)
    if lanes is None:
        raise BenchmarkError(f"{type(repo).__name__} keeps no lanes where they were looked for")
    await lanes.trim()
    engine = repo.engine
    pool = engine.sync_engine.pool
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while pool.checkedout():  # a lane its idle release is giving back, or work still running
        if loop.time() > deadline:
            raise BenchmarkError(f"{pool.checkedout()} connections still in use: nothing may run now")
        await asyncio.sleep(0.005)
    held = []
    try:
        for _ in range(pool.checkedin()):
            held.append(await engine.connect())
        for conn in held:
            await conn.exec_driver_sql(statement)
            await conn.commit()
    finally:
        for conn in held:
            await conn.close()
    return len(held)


# (make_repo, read_commits): read_commits() is awaited after the repo is closed and returns
# (commits, write_commits), either of which may be None; read_commits(final=False) reads them so far
# (the warm-up's, subtracted) and keeps counting
Backend = tuple[Callable[[], Any], Callable[..., Awaitable[tuple[int | None, int | None]]]]


@contextlib.asynccontextmanager
async def open_backend(
    backend: str, tag: str, pg_admin: PgAdmin | None, *, pool_size: int = 0
) -> AsyncIterator[Backend]:
    """A fresh store for one run.

    On PostgreSQL ``pool_size > 0`` sizes the repo's connection pool (``max_overflow=4``); 0 keeps
    SQLAlchemy's default (5 + 10 overflow). SQLite keeps its default pool.

    Commits: on PostgreSQL ``pg_stat_database.xact_commit`` of the run's own database (every
    committed transaction, reads and connection set-up included) and, from SQLAlchemy events, those
    that wrote; on SQLite both from SQLAlchemy events; none for the memory repo. Read mid-run
    (``final=False``, the warm-up's, which the run subtracts), PostgreSQL's come from the server too,
    once the repos' sessions have published theirs (:func:`flush_pg_statistics`; before PostgreSQL 15,
    the repo's own count, which takes each unit of a group commit for a commit of its own).
    """
    if backend == "memory":

        async def nothing(final: bool = True) -> tuple[None, None]:
            return None, None

        yield af.MemoryWorkflowRepo, nothing
    elif backend == "sqlite":
        with sqlite_file(tag) as path:
            url = f"sqlite+aiosqlite:///{path}"
            setup = af.SQLAlchemyWorkflowRepo(url)
            await setup.create_schema()
            await setup.aclose()
            repos = _CountingRepos(url, {})

            async def sqlite_commits(final: bool = True) -> tuple[int | None, int | None]:
                counted = repos.counted(final)
                return (None, None) if counted is None else counted

            yield repos.make, sqlite_commits
    elif backend == "postgres":
        if pg_admin is None:
            raise BenchmarkError("the postgres backend needs --pg-url")
        async with pg_admin.fresh_database(tag.replace("-", "_")) as db:
            setup = af.SQLAlchemyWorkflowRepo(db.sqlalchemy_url)
            await setup.create_schema()
            await setup.aclose()
            before = await pg_admin.xact_commit(db.name)
            flushes = await pg_admin.server_version_num() >= 150000  # pg_stat_force_next_flush()
            sizing = {"pool_size": pool_size, "max_overflow": 4} if pool_size > 0 else {}
            repos = _CountingRepos(db.sqlalchemy_url, sizing)

            async def pg_commits(final: bool = True) -> tuple[int | None, int | None]:
                counted = repos.counted(final)
                writes = None if counted is None else counted[1]
                if final:  # the repo is closed: its sessions have published their counters
                    return await pg_admin.xact_commit(db.name) - before, writes
                if not flushes:  # the repo's own count
                    return (None, None) if counted is None else counted
                # mid-run: the sessions publish theirs now, and any that closed have exited
                sessions = sum([await flush_pg_statistics(repo) for repo in repos.made])
                return await pg_admin.xact_commit(db.name, sessions=sessions) - before, writes

            yield repos.make, pg_commits
    else:
        raise ValueError(f"unknown backend {backend!r}: postgres, sqlite or memory")
