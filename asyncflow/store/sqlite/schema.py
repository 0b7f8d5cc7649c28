"""The SQLite schema as numbered migrations (see :mod:`asyncflow.store.migrations`).

Concurrent migrations need no lock of their own: each runs in ``BEGIN IMMEDIATE`` (the write lock
from the start), so a second migrator waits, then reads the version the first one recorded.
"""

from __future__ import annotations

from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncConnection

from ..migrations import (
    CHILD_COLUMNS,
    CHILD_INDEXES,
    NOTIFY_COLUMNS,
    SCHEDULE_FINGERPRINT_COLUMNS,
    SCHEDULE_TABLES,
    TRACE_COLUMNS,
    UNIQUE_COLUMNS,
    UNIQUE_INDEXES,
    Migration,
    check_migrations,
)
from ..tables import asyncflow_schema

__all__ = ["MIGRATIONS", "REPAIR", "has_version_table", "lock_schema", "repair"]

_V1 = (
    """CREATE TABLE IF NOT EXISTS workflow_instance (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    workflow_type TEXT NOT NULL,
    business_id TEXT NOT NULL,
    status TEXT NOT NULL,
    workflow_context JSON DEFAULT '{}' NOT NULL,
    task_id BIGINT DEFAULT 0 NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    next_run_at BIGINT DEFAULT 0 NOT NULL,
    version BIGINT DEFAULT 1 NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ix_workflow_instance_status_next_run_at "
    "ON workflow_instance (status, next_run_at)",
    "CREATE INDEX IF NOT EXISTS ix_workflow_instance_task_id ON workflow_instance (task_id)",
    "CREATE INDEX IF NOT EXISTS ix_workflow_instance_business_id ON workflow_instance (business_id)",
    "CREATE INDEX IF NOT EXISTS ix_workflow_instance_due ON workflow_instance (next_run_at, id) "
    "WHERE status IN ('init', 'running')",
    """CREATE TABLE IF NOT EXISTS task_instance (
    id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    workflow_instance_id BIGINT NOT NULL,
    task_type TEXT NOT NULL,
    status TEXT NOT NULL,
    node_context JSON DEFAULT '{}' NOT NULL,
    fail_count BIGINT DEFAULT 0 NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT DEFAULT 0 NOT NULL,
    version BIGINT DEFAULT 1 NOT NULL,
    CONSTRAINT uq_task_instance_workflow_instance_id_task_type UNIQUE (workflow_instance_id, task_type),
    CONSTRAINT fk_task_instance_workflow_instance_id_workflow_instance FOREIGN KEY (workflow_instance_id)
        REFERENCES workflow_instance (id) ON DELETE CASCADE)""",
)
"""The tables and indexes of asyncflow 0.1.0."""

_V2 = (_V1[4],)

_V3_COLUMNS = (("workflow_instance", "lease_epoch", "BIGINT DEFAULT 0 NOT NULL"),)
_V3 = (
    """CREATE TABLE IF NOT EXISTS asyncflow_lock (
    key TEXT NOT NULL PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL)""",
)
"""The pass fence (``lease_epoch``) and DatabaseWorkflowLock's table."""


MIGRATIONS = check_migrations(
    [
        Migration(1, "the tables of asyncflow 0.1.0", _V1),
        Migration(2, "the claim index on databases from before it (PostgreSQL: the step functions)", _V2),
        Migration(
            3, "fenced passes (workflow_instance.lease_epoch); the asyncflow_lock table", _V3, _V3_COLUMNS
        ),
        Migration(
            4,
            "create_workflow(unique=...): workflow_instance.unique_key and its indexes",
            UNIQUE_INDEXES,
            UNIQUE_COLUMNS,
        ),
        Migration(5, "nothing on SQLite (PostgreSQL: the asyncflow_finished NOTIFY trigger)", ()),
        Migration(6, "schedules: asyncflow_schedule and asyncflow_schedule_tick", SCHEDULE_TABLES),
        Migration(7, "observers: workflow_instance.trace_context (nullable TEXT)", (), TRACE_COLUMNS),
        Migration(
            8,
            "child workflows: workflow_instance.parent_id, parent_node, child_key and their unique index",
            CHILD_INDEXES,
            CHILD_COLUMNS,
        ),
        Migration(9, "nothing on SQLite: it has no fillfactor (PostgreSQL: fillfactor for HOT updates)", ()),
        Migration(
            10,
            "workflow_instance.notify_finished, unused on SQLite (PostgreSQL: NOTIFY only when it is set)",
            (),
            NOTIFY_COLUMNS,
        ),
        Migration(
            11, "nothing on SQLite: it keeps its foreign key (PostgreSQL: a delete trigger instead)", ()
        ),
        Migration(12, "nothing on SQLite (PostgreSQL: a cheaper WHEN on the asyncflow_finished trigger)", ()),
        Migration(13, "nothing on SQLite (PostgreSQL: the driver's claim as a function)", ()),
        Migration(
            14, "schedules: asyncflow_schedule.fingerprint (nullable TEXT)", (), SCHEDULE_FINGERPRINT_COLUMNS
        ),
    ]
)

REPAIR: tuple[str, ...] = ()
"""Nothing to re-install on SQLite."""


async def repair(conn: AsyncConnection) -> None:
    """Nothing to re-install on SQLite."""


async def has_version_table(conn: AsyncConnection) -> bool:
    """Whether the database file has the version table."""
    return bool(await conn.run_sync(lambda sync: inspect(sync).has_table(asyncflow_schema.name)))


async def lock_schema(conn: AsyncConnection) -> None:
    """Nothing to do: the migration's ``BEGIN IMMEDIATE`` already holds the write lock."""
