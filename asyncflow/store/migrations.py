"""Versioned, forward-only schema migrations of the SQL repo.

Each backend package lists its migrations (``MIGRATIONS`` in ``asyncflow.store.<backend>.schema``):
one :class:`Migration` per schema version, numbered 1, 2, ... :data:`~asyncflow.store.tables.SCHEMA_VERSION`,
with that backend's DDL. Version 1 is the schema of asyncflow 0.1.0 as it was (written with
``IF NOT EXISTS``, so a database whose tables were made from ``metadata`` by other tools upgrades
too). A feature that adds a column adds one entry per backend and the column in
:mod:`asyncflow.store.tables`; ``tests/integration/test_migrations.py`` checks that a database
migrated from scratch matches ``metadata``.

:func:`migrate` applies the missing versions in order, each in a transaction of its own (PostgreSQL
and SQLite both run DDL in transactions) that first takes the backend's schema lock (an advisory lock
on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) and re-reads the recorded version, so several
processes migrating at once apply each version exactly once. Every applied version is a row of
``asyncflow_schema``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from sqlalchemy import func, insert, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from ..errors import StoreError
from .tables import SCHEMA_VERSION, asyncflow_schema

__all__ = [
    "CHILD_COLUMNS",
    "CHILD_INDEXES",
    "IN_TRANSACTION",
    "NOTIFY_COLUMNS",
    "SCHEDULE_FINGERPRINT_COLUMNS",
    "SCHEDULE_TABLES",
    "TRACE_COLUMNS",
    "UNIQUE_COLUMNS",
    "UNIQUE_INDEXES",
    "VERSION_TABLE",
    "Migration",
    "check_migrations",
    "migrate",
    "recorded_version",
]

VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS asyncflow_schema (version INTEGER NOT NULL, applied_at BIGINT NOT NULL, "
    "CONSTRAINT pk_asyncflow_schema PRIMARY KEY (version))"
)
"""The table of applied versions (the same on every backend; made by version 1 of asyncflow 0.1.0)."""


"""DDL text, or a step that needs to look first (e.g. SQLite's ``ADD COLUMN``, which has no ``IF NOT
EXISTS``: a table made from ``metadata`` already has the column)."""


IN_TRANSACTION = (
    "migrate() cannot run inside transaction(): each version commits on its own, so call it outside "
    "(at deploy time or at start-up, before the transaction)"
)
"""The ``InvalidStateError`` of ``migrate()`` inside ``transaction()`` (every repo refuses it)."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version of one backend: the statements that bring version ``version - 1`` to it."""

    version: int
    description: str
    statements: tuple[str, ...]
    add_columns: tuple[tuple[str, str, str], ...] = ()
    """``(table, column, type and default)`` added before ``statements`` unless the column exists
    (tables made from ``metadata`` by other tools have it already; SQLite has no ``ADD COLUMN IF NOT
    EXISTS``)."""


def check_migrations(migrations: Sequence[Migration]) -> tuple[Migration, ...]:
    """The migrations if they are numbered 1 to :data:`SCHEMA_VERSION` in order (else ``AssertionError``)."""
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, SCHEMA_VERSION + 1)):
        raise AssertionError(f"migrations must be numbered 1..{SCHEMA_VERSION}, got {versions}")
    return tuple(migrations)


async def recorded_version(conn: AsyncConnection) -> int:
    """The highest version recorded in ``asyncflow_schema`` (0 if none; the table must exist)."""
    found = (await conn.execute(select(func.max(asyncflow_schema.c.version)))).scalar()
    return int(found or 0)


Unit = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
"""A transaction of its own (a SAVEPOINT inside the caller's ``transaction()``)."""


async def migrate(
    unit: Unit,
    lock: Callable[[AsyncConnection], Awaitable[None]],
    migrations: Sequence[Migration],
    now: Callable[[], int],
    has_version_table: Callable[[AsyncConnection], Awaitable[bool]],
    repair: Callable[[AsyncConnection], Awaitable[None]],
) -> list[int]:
    """Apply the missing versions, one transaction each; the versions this call applied.

    ``repair`` runs in the last transaction: it re-installs the objects of this version that were
    dropped or differ (e.g. a function of another release), so a database missing them gets them back.
    With nothing to apply or repair, no DDL runs: a role that may not create objects can call it.
    """
    applied: list[int] = []
    while True:
        async with unit() as conn:
            await lock(conn)
            if not await has_version_table(conn):  # CREATE ... IF NOT EXISTS needs the right to create
                await conn.exec_driver_sql(VERSION_TABLE)
            current = await recorded_version(conn)
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"the database has asyncflow schema version {current}, newer than this "
                    f"asyncflow's {SCHEMA_VERSION}: upgrade asyncflow"
                )
            if current == SCHEMA_VERSION:
                await repair(conn)
                return applied
            migration = migrations[current]
            for table, column, kind in migration.add_columns:
                if column not in await conn.run_sync(_columns, table):
                    await conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            for statement in migration.statements:
                await conn.exec_driver_sql(statement)
            await conn.execute(insert(asyncflow_schema), {"version": migration.version, "applied_at": now()})
        applied.append(migration.version)


def _columns(conn: Connection, table: str) -> set[str]:
    return {column["name"] for column in inspect(conn).get_columns(table)}


# ------------------------------------------------------------- DDL that is the same on every backend

UNIQUE_COLUMNS = (("workflow_instance", "unique_key", "TEXT"),)
UNIQUE_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS uq_workflow_instance_active "
    "ON workflow_instance (workflow_type, business_id) "
    "WHERE unique_key IS NOT NULL AND status IN ('init', 'running')",
    "CREATE UNIQUE INDEX IF NOT EXISTS uq_workflow_instance_always "
    "ON workflow_instance (workflow_type, business_id) "
    "WHERE unique_key = 'always'",
)
"""Version 4, create_workflow(unique=...): the column and its two partial unique indexes."""

SCHEDULE_TABLES = (
    """CREATE TABLE IF NOT EXISTS asyncflow_schedule (
    id TEXT NOT NULL,
    first_seen_at BIGINT NOT NULL,
    last_tick TEXT,
    CONSTRAINT pk_asyncflow_schedule PRIMARY KEY (id))""",
    """CREATE TABLE IF NOT EXISTS asyncflow_schedule_tick (
    schedule_id TEXT NOT NULL,
    tick TEXT NOT NULL,
    instance_id BIGINT,
    fired_at BIGINT NOT NULL,
    CONSTRAINT pk_asyncflow_schedule_tick PRIMARY KEY (schedule_id, tick))""",
)
"""Version 6, schedules: the schedules seen and their fired ticks (the primary key fires a tick once)."""

TRACE_COLUMNS = (("workflow_instance", "trace_context", "TEXT"),)
"""Version 7: what an observer stored at creation (the OpenTelemetry observer: the W3C ``traceparent``)."""

CHILD_COLUMNS = (
    ("workflow_instance", "parent_id", "BIGINT"),
    ("workflow_instance", "parent_node", "TEXT"),
    ("workflow_instance", "child_key", "TEXT"),
)
CHILD_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS uq_workflow_instance_child "
    "ON workflow_instance (parent_id, parent_node, child_key) WHERE parent_id IS NOT NULL",
)
"""Version 8, child workflows: a child's parent instance, node and key, unique together."""

NOTIFY_COLUMNS = (("workflow_instance", "notify_finished", "BOOLEAN DEFAULT false NOT NULL"),)
"""Version 10: a ``wait_for_workflow`` waiter asked to hear when the instance ends (PostgreSQL NOTIFYs
only for these; SQLite keeps the column unused)."""

SCHEDULE_FINGERPRINT_COLUMNS = (("asyncflow_schedule", "fingerprint", "TEXT"),)
"""Version 14: the definition a schedule's state belongs to (``Schedule.fingerprint()``); a schedule
stored with another one starts over. ``NULL`` (stored before): the next driver records its own and
keeps the state."""
