"""What a SQL backend provides to :class:`~asyncflow.store.sqlalchemy.SQLAlchemyWorkflowRepo`, and the
picker that chooses it, once, from the engine's dialect.

A backend (one package per database: :mod:`asyncflow.store.postgres`, :mod:`asyncflow.store.sqlite`)
owns everything its database does differently: its migrations, its connection handling, and the
per-instance calls of a workflow pass (create, read, step, claim), each written once and run inside
``transaction()`` or outside it. The repo does the rest with the shared Core statements. Another
database is one more package and one more entry in :data:`PACKAGES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..errors import ParamInvalidError
from ..records import TaskInstanceRecord, WorkflowInstanceRecord
from ._prepare import InstanceRow, PreparedStep, Refused
from ._units import ConnectionUnits
from .migrations import Migration
from .protocol import DueListener

__all__ = [
    "PACKAGES",
    "SchemaOps",
    "SqlBackend",
    "backend_for",
    "database_key_for",
    "engine_url_for",
    "place_sql_for",
]


class SchemaOps(Protocol):
    """A backend's ``schema`` module: its numbered migrations, how it serializes migrators, where it
    looks for the version table, and what it re-installs at this version."""

    MIGRATIONS: tuple[Migration, ...]

    def repair(self, conn: AsyncConnection) -> Awaitable[None]: ...

    def lock_schema(self, conn: AsyncConnection) -> Awaitable[None]: ...

    def has_version_table(self, conn: AsyncConnection) -> Awaitable[bool]: ...


class SqlBackend(Protocol):
    """The calls a backend implements (each inside ``transaction()`` or outside it)."""

    units: ConnectionUnits
    schema: SchemaOps
    insert_child: Any
    """The Core statement that inserts a child instance unless its (parent, node, key) has one
    (``INSERT ... ON CONFLICT DO NOTHING ... RETURNING``, in the backend's dialect)."""
    insert_task: Any
    """The Core statement of ``create_task_instance``: one node row, only where its instance exists
    (SQLite: the shared ``_statements.INSERT_TASK``; PostgreSQL: ``postgres.sql.INSERT_TASK``)."""
    shared_by_processes: bool
    """Whether many processes on one database is this backend's usual deployment (a database server):
    tools then default to the lock kept in the database (:class:`~asyncflow.DatabaseWorkflowLock`)
    rather than one local to the process."""

    async def create(self, rows: Sequence[InstanceRow], now: int) -> list[int | Refused]:
        """Ids in input order; :class:`Refused` where a unique row was refused (a unique instance exists)."""

    async def get(self, instance_id: int) -> WorkflowInstanceRecord | None: ...

    async def load(self, instance_id: int) -> list[TaskInstanceRecord]: ...

    async def load_state(
        self, instance_id: int, lease: bool
    ) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None: ...

    async def apply_step(self, step: PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]:
        """While ``HOLD_STEPS`` is set (the engine's step, :mod:`asyncflow._held`), a cancellation of
        the caller waits for the step, and a step that was written returns its rows (the cancellation
        is raised at the caller's next await)."""
        ...

    async def claim(self, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]) -> list[int]: ...

    async def claim_states(
        self, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]
    ) -> list[tuple[int, WorkflowInstanceRecord | None]]: ...

    async def acquire_lease(self, key: str, holder: str, ttl_ms: int) -> bool: ...

    async def renew_leases(self, held: Sequence[tuple[str, str, int]]) -> list[bool]: ...

    async def release_lease(self, key: str, holder: str) -> bool: ...

    def listen_due(self, callback: Callable[[], None]) -> DueListener | None: ...

    def listen_finished(self, callback: Callable[[int | None], None]) -> DueListener | None: ...

    async def watch_finished(self, instance_id: int) -> None: ...

    def migrated(self) -> None: ...

    async def aclose(self) -> None: ...


PACKAGES = {"postgresql": "postgres", "sqlite": "sqlite"}
"""The backend package of each SQLAlchemy dialect name (another database: one more entry). Each
package has ``engine_url(url, engine_kwargs)`` (the driver and options of an engine the repo builds
from a URL), ``open_backend(engine)`` (its :class:`SqlBackend`) and ``database_key(url)`` (what
names the database) and ``PLACE_SQL`` (``None``, or a statement whose row tells where a connection
writes: the schema in which it finds ``workflow_instance``, its current schema, its database, its
server's start time and identifier, each ``NULL`` where unknown), for ``create_workflow(session=)``'s
check."""


def _package(name: str) -> Any:
    if name not in PACKAGES:
        raise ParamInvalidError(
            f"unsupported database {name!r}: use sqlite+aiosqlite:// or postgresql+asyncpg://"
        )
    return importlib.import_module(f"{__package__}.{PACKAGES[name]}")


def engine_url_for(url: URL, engine_kwargs: dict[str, Any]) -> URL:
    """The URL (its driver) and the engine options (``engine_kwargs``, changed in place) for an
    engine the repo builds, from the URL's database name."""
    result: URL = _package(url.get_backend_name()).engine_url(url, engine_kwargs)
    return result


def database_key_for(url: URL) -> tuple[object, ...] | None:
    """What names ``url``'s database for its backend: two URLs with one key reach one database
    (``None``: a database private to its engine, an in-memory SQLite one)."""
    key: tuple[object, ...] | None = _package(url.get_backend_name()).database_key(url)
    return key


def place_sql_for(url: URL) -> str | None:
    """The statement whose row tells where a connection to ``url``'s database writes (``None``: the
    database key says it all)."""
    sql: str | None = _package(url.get_backend_name()).PLACE_SQL
    return sql


def backend_for(engine: AsyncEngine) -> Any:
    """The backend of ``engine``'s dialect (the only place, with :func:`engine_url_for`, that looks at it)."""
    return _package(engine.dialect.name).open_backend(engine)
