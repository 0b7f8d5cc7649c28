"""The PostgreSQL schema as numbered migrations (see :mod:`asyncflow.store.migrations`)."""

from __future__ import annotations

import logging

from sqlalchemy import text
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
from ..tables import FILLFACTOR
from . import definitions
from .finished import FINISHED_DDL, FINISHED_DDL_V10, FINISHED_DDL_V12
from .functions import BATCH_FUNCTION, CLAIM_FUNCTION, CLAIM_STATES_FUNCTION, STEP_FUNCTION

__all__ = ["MIGRATIONS", "REPAIR", "has_version_table", "lock_schema", "repair"]

logger = logging.getLogger(__name__)

_SCHEMA_LOCK_CLASS = 0x61737966  # "asyf": with the schema's hash, serializes concurrent migrate()

_V1 = (
    """CREATE TABLE IF NOT EXISTS workflow_instance (
    id BIGSERIAL NOT NULL,
    workflow_type TEXT NOT NULL,
    business_id TEXT NOT NULL,
    status TEXT NOT NULL,
    workflow_context JSONB DEFAULT '{}' NOT NULL,
    task_id BIGINT DEFAULT 0 NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    next_run_at BIGINT DEFAULT 0 NOT NULL,
    version BIGINT DEFAULT 1 NOT NULL,
    CONSTRAINT pk_workflow_instance PRIMARY KEY (id))""",
    "CREATE INDEX IF NOT EXISTS ix_workflow_instance_status_next_run_at "
    "ON workflow_instance (status, next_run_at)",
    "CREATE INDEX IF NOT EXISTS ix_workflow_instance_task_id ON workflow_instance (task_id)",
    "CREATE INDEX IF NOT EXISTS ix_workflow_instance_business_id ON workflow_instance (business_id)",
    "CREATE INDEX IF NOT EXISTS ix_workflow_instance_due ON workflow_instance (next_run_at, id) "
    "WHERE status IN ('init', 'running')",
    """CREATE TABLE IF NOT EXISTS task_instance (
    id BIGSERIAL NOT NULL,
    workflow_instance_id BIGINT NOT NULL,
    task_type TEXT NOT NULL,
    status TEXT NOT NULL,
    node_context JSONB DEFAULT '{}' NOT NULL,
    fail_count BIGINT DEFAULT 0 NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT DEFAULT 0 NOT NULL,
    version BIGINT DEFAULT 1 NOT NULL,
    CONSTRAINT pk_task_instance PRIMARY KEY (id),
    CONSTRAINT uq_task_instance_workflow_instance_id_task_type UNIQUE (workflow_instance_id, task_type),
    CONSTRAINT fk_task_instance_workflow_instance_id_workflow_instance FOREIGN KEY (workflow_instance_id)
        REFERENCES workflow_instance (id) ON DELETE CASCADE)""",
)
"""The tables and indexes of asyncflow 0.1.0."""

_DUE_INDEX = _V1[4]

_V2 = (_DUE_INDEX, STEP_FUNCTION, BATCH_FUNCTION)
_V3 = (
    "ALTER TABLE workflow_instance ADD COLUMN IF NOT EXISTS lease_epoch BIGINT DEFAULT 0 NOT NULL",
    """CREATE TABLE IF NOT EXISTS asyncflow_lock (
    key TEXT NOT NULL,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    CONSTRAINT pk_asyncflow_lock PRIMARY KEY (key))""",
    STEP_FUNCTION,
)
"""The pass fence (``lease_epoch``, checked by the step function) and DatabaseWorkflowLock's table."""

_V9 = (
    f"ALTER TABLE workflow_instance SET (fillfactor = {FILLFACTOR})",
    f"ALTER TABLE task_instance SET (fillfactor = {FILLFACTOR})",
)
"""Room on each page for HOT updates (:data:`asyncflow.store.tables.FILLFACTOR`). Setting the
parameter takes a ``SHARE UPDATE EXCLUSIVE`` lock (reads and writes go on) and rewrites nothing: pages
written from now on keep the room; existing rows stay packed until the table is rewritten
(``VACUUM FULL`` or pg_repack, docs/storage.md)."""

_V11 = (
    # both tables at once, in the order a pass's read takes them: no deadlock with live reads
    "LOCK TABLE workflow_instance, task_instance IN ACCESS EXCLUSIVE MODE",
    # the node rows of the deleted instances' own schema, whatever the deleting session's search_path
    """CREATE OR REPLACE FUNCTION asyncflow_delete_tasks() RETURNS trigger LANGUAGE plpgsql AS $asyncflow$
BEGIN
    EXECUTE format(
        'DELETE FROM %I.task_instance AS t USING asyncflow_gone AS g WHERE t.workflow_instance_id = g.id',
        TG_TABLE_SCHEMA);
    RETURN NULL;
END
$asyncflow$""",
    "DROP TRIGGER IF EXISTS asyncflow_delete_tasks ON workflow_instance",
    """CREATE TRIGGER asyncflow_delete_tasks
AFTER DELETE ON workflow_instance
REFERENCING OLD TABLE AS asyncflow_gone
FOR EACH STATEMENT
EXECUTE FUNCTION asyncflow_delete_tasks()""",
    "ALTER TABLE task_instance "
    "DROP CONSTRAINT IF EXISTS fk_task_instance_workflow_instance_id_workflow_instance",
)
"""No foreign key from ``task_instance`` to ``workflow_instance`` (its check cost a query and a row lock
per inserted node row: see :data:`asyncflow.store.tables.task_instance`); a statement trigger deletes
the node rows of deleted instances instead, as the key's ``ON DELETE CASCADE`` did (in the table's own
schema: the deleting session's ``search_path`` does not matter). The migration locks both tables
briefly (``ACCESS EXCLUSIVE``, taken together so that it cannot deadlock with a pass's read) and
rewrites nothing."""


MIGRATIONS = check_migrations(
    [
        Migration(1, "the tables of asyncflow 0.1.0", _V1),
        Migration(2, "the step functions; the claim index on databases from before it", _V2),
        Migration(3, "fenced passes (workflow_instance.lease_epoch); the asyncflow_lock table", _V3),
        Migration(
            4,
            "create_workflow(unique=...): workflow_instance.unique_key and its indexes",
            UNIQUE_INDEXES,
            UNIQUE_COLUMNS,
        ),
        Migration(5, "wait_for_workflow: NOTIFY asyncflow_finished when an instance ends", FINISHED_DDL),
        Migration(6, "schedules: asyncflow_schedule and asyncflow_schedule_tick", SCHEDULE_TABLES),
        Migration(7, "observers: workflow_instance.trace_context (nullable TEXT)", (), TRACE_COLUMNS),
        Migration(
            8,
            "child workflows: workflow_instance.parent_id, parent_node, child_key and their unique index",
            CHILD_INDEXES,
            CHILD_COLUMNS,
        ),
        Migration(9, f"HOT updates: fillfactor {FILLFACTOR} on workflow_instance and task_instance", _V9),
        Migration(
            10,
            "wait_for_workflow: workflow_instance.notify_finished; NOTIFY asyncflow_finished only when set",
            FINISHED_DDL_V10,
            NOTIFY_COLUMNS,
        ),
        Migration(
            11, "no foreign key on task_instance; a statement trigger deletes deleted instances' rows", _V11
        ),
        Migration(
            12,
            "wait_for_workflow: the finished trigger's WHEN reads only notify_finished (its function "
            "checks the statuses)",
            FINISHED_DDL_V12,
        ),
        Migration(
            13,
            "the driver's claim as the function asyncflow_claim_v1 (one plan per session, not one per claim)",
            (CLAIM_FUNCTION,),
        ),
        Migration(
            14, "schedules: asyncflow_schedule.fingerprint (nullable TEXT)", (), SCHEDULE_FINGERPRINT_COLUMNS
        ),
    ]
)

REPAIR = (STEP_FUNCTION, BATCH_FUNCTION, CLAIM_FUNCTION, CLAIM_STATES_FUNCTION)
"""Re-installed by ``migrate()`` (``CREATE OR REPLACE``) where missing or not as written here, unless a
newer release installed them (:func:`repair`, :mod:`.definitions`): functions someone dropped come
back, and a rolling deploy's older processes do not put their own back. ``asyncflow_claim_states_v1``
comes only this way (definitions revision 2, no migration of its own): a database an older release
migrated gets it at this release's first ``migrate()``, and claims without it until then."""


async def repair(conn: AsyncConnection) -> None:
    """Install each function of :data:`REPAIR` that the current schema lacks or holds as another
    release's, by the rule of :func:`.definitions.install`: an older release's is replaced, a newer
    release's kept (with a warning); nothing when all are in place, so ``migrate()`` with nothing to do
    needs no right to create or replace them."""
    newer = await definitions.install(conn, REPAIR)
    if newer:
        logger.warning(
            "kept %s as a newer asyncflow installed them (definitions revision above this asyncflow's "
            "%d): this process runs on them; upgrade it",
            ", ".join(newer),
            definitions.REVISION,
        )


_VERSION_TABLE_HERE = text(
    "SELECT CASE WHEN current_schema() IS NULL THEN false "
    "ELSE to_regclass(format('%I.asyncflow_schema', current_schema())) IS NOT NULL END"
)


async def has_version_table(conn: AsyncConnection) -> bool:
    """Whether the version table exists where ``migrate()`` makes it: in the connection's current schema,
    not in any schema of its ``search_path`` (a tenant's schema before its first ``migrate()`` must not
    read the versions of a schema behind it, such as ``public``)."""
    return bool((await conn.execute(_VERSION_TABLE_HERE)).scalar())


async def lock_schema(conn: AsyncConnection) -> None:
    """Serialize concurrent migrations of one schema (an advisory lock held until the commit)."""
    await conn.execute(
        text("SELECT pg_advisory_xact_lock(:key, hashtext(current_schema()))"), {"key": _SCHEMA_LOCK_CLASS}
    )
