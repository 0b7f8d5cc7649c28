"""The SQLite schema as numbered migrations (see :mod:`asyncflow.store.migrations`).

Concurrent migrations need no lock of their own: each runs in ``BEGIN IMMEDIATE`` (the write lock
from the start), so a second migrator waits, then reads the version the first one recorded.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from ..migrations import Migration, check_migrations

__all__ = ["MIGRATIONS", "REPAIR", "lock_schema"]

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

_V4_COLUMNS = (("workflow_instance", "unique_key", "TEXT"),)
_V4 = (
    "CREATE UNIQUE INDEX IF NOT EXISTS uq_workflow_instance_active "
    "ON workflow_instance (workflow_type, business_id) "
    "WHERE unique_key IS NOT NULL AND status IN ('init', 'running')",
    "CREATE UNIQUE INDEX IF NOT EXISTS uq_workflow_instance_always "
    "ON workflow_instance (workflow_type, business_id) "
    "WHERE unique_key = 'always'",
)
"""create_workflow(unique=...): the column and its two partial unique indexes."""

_V6 = (
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
"""Schedules: the schedules seen and their fired ticks (the primary key fires a tick once)."""

_V7_COLUMNS = (("workflow_instance", "trace_context", "TEXT"),)
"""What an observer stored at creation (the OpenTelemetry observer: the W3C ``traceparent``)."""

MIGRATIONS = check_migrations(
    [
        Migration(1, "the tables of asyncflow 0.1.0", _V1),
        Migration(2, "the claim index on databases from before it (PostgreSQL: the step functions)", _V2),
        Migration(
            3, "fenced passes (workflow_instance.lease_epoch); the asyncflow_lock table", _V3, _V3_COLUMNS
        ),
        Migration(
            4, "create_workflow(unique=...): workflow_instance.unique_key and its indexes", _V4, _V4_COLUMNS
        ),
        Migration(5, "nothing on SQLite (PostgreSQL: the asyncflow_finished NOTIFY trigger)", ()),
        Migration(6, "schedules: asyncflow_schedule and asyncflow_schedule_tick", _V6),
        Migration(7, "observers: workflow_instance.trace_context (nullable TEXT)", (), _V7_COLUMNS),
    ]
)

REPAIR: tuple[str, ...] = ()
"""Nothing to re-install on SQLite."""


async def lock_schema(conn: AsyncConnection) -> None:
    """Nothing to do: the migration's ``BEGIN IMMEDIATE`` already holds the write lock."""
