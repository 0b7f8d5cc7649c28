"""The stores and locks of asyncflow benchmark runs, and how their commits are counted.

Every run gets a fresh store: a new PostgreSQL database (dropped afterwards), a new SQLite file in a
temporary directory, or a new memory repo; the Redis lock gets a per-run key prefix.
"""

from __future__ import annotations

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

    def make(self, counted: bool = True) -> Any:
        """A repo on the run's store; ``counted=False``: one whose commits nobody counts (a backlog's)."""
        repo = af.SQLAlchemyWorkflowRepo(self.url, **self.engine_kwargs)
        engine = _repo_engine(repo)
        if engine is not None and counted:
            self.counter.attach(engine)
        return repo

    def counted(self, final: bool = True) -> tuple[int, int] | None:
        """The commits so far; ``final``: and stop counting (the repo is closed)."""
        if not self.counter.attached:
            return None
        if final:
            self.counter.detach()
        return self.counter.commits, self.counter.write_commits


# (make_repo, read_commits): make_repo(counted=False) makes a repo on the same store whose commits are
# not counted (SQL backends only; the memory backend's make_repo makes a new, empty store);
# read_commits() is awaited after the repo is closed and returns (commits, write_commits), either of
# which may be None; read_commits(final=False) reads them so far (the warm-up's, subtracted) and keeps
# counting; read_commits(rebase=True), awaited while no counted repo has connected yet, starts the
# count afresh (PostgreSQL: once the uncounted repos' sessions have gone, their commits published)
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
    (``final=False``, the warm-up's, which the run subtracts), PostgreSQL's are the repo's own count:
    the server publishes a live session's counters late. That count takes each unit of the hot path
    for a commit, which group commit makes too many: a backlog created through ``create_workflow``
    is therefore created on an uncounted repo (``make_repo(counted=False)``), closed before the
    counted one connects, and ``read_commits(rebase=True)`` then counts from the server's figure.
    """
    if backend == "memory":

        async def nothing(final: bool = True, rebase: bool = False) -> tuple[None, None]:
            return None, None

        yield af.MemoryWorkflowRepo, nothing
    elif backend == "sqlite":
        with sqlite_file(tag) as path:
            url = f"sqlite+aiosqlite:///{path}"
            setup = af.SQLAlchemyWorkflowRepo(url)
            await setup.create_schema()
            await setup.aclose()
            repos = _CountingRepos(url, {})

            async def sqlite_commits(
                final: bool = True, rebase: bool = False
            ) -> tuple[int | None, int | None]:
                if rebase:  # the counter saw only counted repos, and none has run yet
                    return None, None
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
            sizing = {"pool_size": pool_size, "max_overflow": 4} if pool_size > 0 else {}
            repos = _CountingRepos(db.sqlalchemy_url, sizing)

            async def pg_commits(final: bool = True, rebase: bool = False) -> tuple[int | None, int | None]:
                nonlocal before
                if rebase:  # no counted session yet: waits until the uncounted ones have gone
                    before = await pg_admin.xact_commit(db.name)
                    return None, None
                counted = repos.counted(final)
                if not final:  # mid-run: the server publishes a session's counters late; the repo's own
                    return (None, None) if counted is None else counted
                return await pg_admin.xact_commit(db.name) - before, None if counted is None else counted[1]

            yield repos.make, pg_commits
    else:
        raise ValueError(f"unknown backend {backend!r}: postgres, sqlite or memory")
