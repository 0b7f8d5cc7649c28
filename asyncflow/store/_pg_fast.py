"""The PostgreSQL hot path: each call is one autocommit statement on the asyncpg connection itself.

``apply_step`` is one call of the plpgsql function :data:`STEP_FUNCTION` (installed by
``create_schema()``): the guarded instance update, the compare-and-set node updates, the inserts and
the optional cancel run inside one statement, so they commit together without ``BEGIN``/``COMMIT``
round trips; a failed condition raises SQLSTATE :data:`CONFLICT_SQLSTATE`, which rolls the statement
back and becomes ``StepResult(applied=False)``. Inside ``transaction()`` the same function runs in a
SAVEPOINT (:data:`STEP_CALL` through SQLAlchemy), because an error aborts the enclosing transaction.

The statements skip SQLAlchemy's per-statement work (compilation, execution context, result objects);
asyncpg prepares each text once per connection and caches it. Contexts travel as the canonical JSON
text the repo produced (``::text::jsonb`` in, ``::text`` out), so no codec of the engine is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..records import TaskInstanceRecord, WorkflowInstanceRecord
from . import _statements as st
from ._prepare import InstanceRow, PreparedStep

__all__ = [
    "CONFLICT_SQLSTATE",
    "STEP_CALL",
    "STEP_FUNCTION",
    "UNDEFINED_FUNCTION_SQLSTATE",
    "apply_step",
    "claim_due",
    "create_instance",
    "get_instance",
    "load_tasks",
    "step_arguments",
]

CONFLICT_SQLSTATE = "AF409"
"""Raised by :data:`STEP_FUNCTION` when a condition of the step fails (nothing is written)."""

UNDEFINED_FUNCTION_SQLSTATE = "42883"
"""The function is missing (a schema made without ``create_schema()``): the repo falls back to Core."""

STEP_FUNCTION = """
CREATE OR REPLACE FUNCTION asyncflow_step_v1(
    p_instance bigint, p_status_in text[], p_status text, p_next_run_at bigint, p_now bigint,
    p_update_ids bigint[], p_update_versions bigint[], p_update_status text[], p_update_context text[],
    p_update_fail_count bigint[], p_update_started_at bigint[],
    p_insert_types text[], p_insert_status text[], p_insert_context text[], p_insert_fail_count bigint[],
    p_insert_started_at bigint[], p_cancel boolean
) RETURNS bigint[] LANGUAGE plpgsql AS $asyncflow$
-- One step of asyncflow's engine (asyncflow.records.Step), all or nothing: any failed condition
-- raises SQLSTATE AF409, which rolls back everything this call wrote.
DECLARE
    v_ids bigint[] := '{}';
    v_count bigint;
BEGIN
    UPDATE workflow_instance
       SET status = coalesce(p_status, status),
           next_run_at = coalesce(p_next_run_at, next_run_at),
           updated_at = p_now,
           version = version + 1
     WHERE id = p_instance AND (cardinality(p_status_in) = 0 OR status = ANY (p_status_in));
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'AF409',
            MESSAGE = format('asyncflow step: instance %s is missing or not in %s', p_instance, p_status_in);
    END IF;
    FOR i IN 1 .. cardinality(p_update_ids) LOOP
        UPDATE task_instance
           SET status = coalesce(p_update_status[i], status),
               node_context = coalesce(p_update_context[i]::jsonb, node_context),
               fail_count = coalesce(p_update_fail_count[i], fail_count),
               started_at = coalesce(p_update_started_at[i], started_at),
               updated_at = p_now,
               version = version + 1
         WHERE id = p_update_ids[i] AND workflow_instance_id = p_instance
           AND version = p_update_versions[i];
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'AF409', MESSAGE = format(
                'asyncflow step: node row %s of instance %s is not at version %s',
                p_update_ids[i], p_instance, p_update_versions[i]);
        END IF;
    END LOOP;
    IF cardinality(p_insert_types) > 0 THEN
        WITH inserted AS (
            INSERT INTO task_instance (workflow_instance_id, task_type, status, node_context, fail_count,
                                       created_at, updated_at, started_at, version)
            SELECT p_instance, r.task_type, r.status, r.context::jsonb, r.fail_count, p_now, p_now,
                   r.started_at, 1
              FROM unnest(p_insert_types, p_insert_status, p_insert_context, p_insert_fail_count,
                          p_insert_started_at) WITH ORDINALITY
                   AS r(task_type, status, context, fail_count, started_at, ord)
             ORDER BY r.ord
            ON CONFLICT (workflow_instance_id, task_type) DO NOTHING
            RETURNING id, task_type
        )
        SELECT (SELECT count(*) FROM inserted),
               (SELECT array_agg(inserted.id ORDER BY r.ord)
                  FROM inserted
                  JOIN unnest(p_insert_types) WITH ORDINALITY AS r(task_type, ord)
                    ON r.task_type = inserted.task_type)
          INTO v_count, v_ids;
        IF v_count <> cardinality(p_insert_types) THEN
            RAISE EXCEPTION USING ERRCODE = 'AF409',
                MESSAGE = format('asyncflow step: instance %s already has a node row of %s',
                                 p_instance, p_insert_types);
        END IF;
    END IF;
    IF p_cancel THEN
        UPDATE task_instance
           SET status = 'canceled', updated_at = p_now, version = version + 1
         WHERE workflow_instance_id = p_instance
           AND status NOT IN ('completed', 'failed', 'canceled')
           AND id <> ALL (p_update_ids || v_ids);
    END IF;
    RETURN v_ids;
END
$asyncflow$
"""
"""``CREATE OR REPLACE`` DDL of the step function (``create_schema()`` runs it; also for Alembic users)."""

STEP_CALL = (
    "SELECT asyncflow_step_v1($1::bigint, $2::text[], $3::text, $4::bigint, $5::bigint, $6::bigint[], "
    "$7::bigint[], $8::text[], $9::text[], $10::bigint[], $11::bigint[], $12::text[], $13::text[], "
    "$14::text[], $15::bigint[], $16::bigint[], $17::boolean)"
)

_INSERT_INSTANCE = (
    "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, task_id, "
    "created_at, updated_at, next_run_at, version) "
    "VALUES ($1::text, $2::text, $3::text, $4::text::jsonb, $5::bigint, $6::bigint, $6::bigint, "
    "$7::bigint, 1) RETURNING id"
)
_GET_INSTANCE = (
    "SELECT id, workflow_type, business_id, status, workflow_context::text, task_id, created_at, "
    "updated_at, next_run_at, version FROM workflow_instance WHERE id = $1::bigint"
)
_LOAD_TASKS = (
    "SELECT id, workflow_instance_id, task_type, status, node_context::text, fail_count, created_at, "
    "updated_at, started_at, version FROM task_instance WHERE workflow_instance_id = $1::bigint ORDER BY id"
)
_CLAIM = (
    "UPDATE workflow_instance AS w SET next_run_at = $3::bigint "
    "FROM (SELECT id, next_run_at AS due FROM workflow_instance "
    "WHERE status IN ('init', 'running') AND next_run_at <= $1::bigint{typed} "
    "ORDER BY next_run_at, id LIMIT $2::bigint FOR UPDATE SKIP LOCKED) AS picked "
    "WHERE w.id = picked.id RETURNING w.id, picked.due"
)
_CLAIM_ANY = _CLAIM.format(typed="")
_CLAIM_TYPED = _CLAIM.format(typed=" AND workflow_type = ANY ($4::text[])")


def step_arguments(step: PreparedStep, now: int) -> tuple[Any, ...]:
    """The 17 arguments of :data:`STEP_CALL` (``started_at`` 0 of an insert resolved to ``now``)."""
    updates = step.updates
    inserts = step.inserts
    return (
        step.instance_id,
        list(step.instance_status_in),
        step.instance_change.status,
        step.instance_change.next_run_at,
        now,
        [u[0] for u in updates],
        [u[1] for u in updates],
        [u[2].status for u in updates],
        [u[2].context for u in updates],
        [u[2].fail_count for u in updates],
        [u[2].started_at for u in updates],
        [row.task_type for row in inserts],
        [row.status for row in inserts],
        [row.context for row in inserts],
        [row.fail_count for row in inserts],
        [row.started_at or now for row in inserts],
        step.cancel_other_tasks,
    )


def inserted_records(
    step: PreparedStep, ids: Sequence[int] | None, now: int
) -> tuple[TaskInstanceRecord, ...]:
    """The records of the rows a step inserted, from the ids the function returned (input order)."""
    if not step.inserts:
        return ()
    assert ids is not None and len(ids) == len(step.inserts), (ids, step.inserts)
    return tuple(
        st.inserted_task_record(task_id, step.instance_id, row, now)
        for task_id, row in zip(ids, step.inserts, strict=True)
    )


async def create_instance(conn: Any, row: InstanceRow, now: int) -> int:
    """Insert one instance; its id."""
    instance_id: int = await conn.fetchval(
        _INSERT_INSTANCE,
        row.workflow_type,
        row.business_id,
        row.status,
        row.context,
        row.task_id,
        now,
        row.next_run_at,
    )
    return instance_id


async def get_instance(conn: Any, instance_id: int) -> WorkflowInstanceRecord | None:
    """The instance, or ``None``."""
    row = await conn.fetchrow(_GET_INSTANCE, instance_id)
    return None if row is None else st.instance_record(row)


async def load_tasks(conn: Any, instance_id: int) -> list[TaskInstanceRecord]:
    """Every node row of one instance, ordered by id."""
    return [st.task_record(row) for row in await conn.fetch(_LOAD_TASKS, instance_id)]


async def apply_step(conn: Any, step: PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]:
    """One call of the step function (raises the conflict SQLSTATE when a condition fails)."""
    ids = await conn.fetchval(STEP_CALL, *step_arguments(step, now))
    return inserted_records(step, ids, now)


async def claim_due(conn: Any, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]) -> list[int]:
    """Lease up to ``limit`` due instances in one statement; ids ordered by ``(next_run_at, id)``."""
    if types:
        rows = await conn.fetch(_CLAIM_TYPED, now_ms, limit, now_ms + lease_ms, list(types))
    else:
        rows = await conn.fetch(_CLAIM_ANY, now_ms, limit, now_ms + lease_ms)
    return [row[0] for row in sorted(rows, key=lambda row: (row[1], row[0]))]
