"""What a SQL backend provides to :class:`~asyncflow.store.sqlalchemy.SQLAlchemyWorkflowRepo`, and the
picker that chooses it, once, from the engine's dialect.

A backend (one package per database: :mod:`asyncflow.store.postgres`, :mod:`asyncflow.store.sqlite`)
owns everything its database does differently: its migrations, its connection handling, and the
per-instance calls of a workflow pass (create, read, step, claim), each written once and run inside
``transaction()`` or outside it. The repo does the rest with the shared Core statements. Another
database is one more package and one more line in :func:`backend_for`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..errors import ParamInvalidError
from ..records import TaskInstanceRecord, WorkflowInstanceRecord
from ._prepare import InstanceRow, PreparedStep, Refused
from ._units import ConnectionUnits
from .migrations import Migration
from .protocol import DueListener

__all__ = ["SchemaOps", "SqlBackend", "backend_for"]


class SchemaOps(Protocol):
    """A backend's ``schema`` module: its numbered migrations and how it serializes migrators."""

    MIGRATIONS: tuple[Migration, ...]
    REPAIR: tuple[str, ...]

    def lock_schema(self, conn: AsyncConnection) -> Awaitable[None]: ...


class SqlBackend(Protocol):
    """The calls a backend implements (each inside ``transaction()`` or outside it)."""

    units: ConnectionUnits
    schema: SchemaOps
    insert_child: Any
    """The Core statement that inserts a child instance unless its (parent, node, key) has one
    (``INSERT ... ON CONFLICT DO NOTHING ... RETURNING``, in the backend's dialect)."""

    async def create(self, rows: Sequence[InstanceRow], now: int) -> list[int | Refused]:
        """Ids in input order; :class:`Refused` where a unique row was refused (a unique instance exists)."""

    async def get(self, instance_id: int) -> WorkflowInstanceRecord | None: ...

    async def load(self, instance_id: int) -> list[TaskInstanceRecord]: ...

    async def load_state(
        self, instance_id: int, lease: bool
    ) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None: ...

    async def apply_step(self, step: PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]: ...

    async def claim(self, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]) -> list[int]: ...

    async def acquire_lease(self, key: str, holder: str, ttl_ms: int) -> bool: ...

    async def renew_leases(self, held: Sequence[tuple[str, str, int]]) -> list[bool]: ...

    async def release_lease(self, key: str, holder: str) -> bool: ...

    def listen_due(self, callback: Callable[[], None]) -> DueListener | None: ...

    def listen_finished(self, callback: Callable[[int | None], None]) -> DueListener | None: ...

    def migrated(self) -> None: ...

    async def aclose(self) -> None: ...


def backend_for(engine: AsyncEngine) -> Any:
    """The backend of ``engine``'s dialect (the only place that looks at it)."""
    name = engine.dialect.name
    if name == "postgresql":
        from .postgres.backend import PostgresBackend

        return PostgresBackend(engine)
    if name == "sqlite":
        from .sqlite.backend import SqliteBackend

        return SqliteBackend(engine)
    raise ParamInvalidError(
        f"unsupported database {name!r}: use sqlite+aiosqlite:// or postgresql+asyncpg://"
    )
