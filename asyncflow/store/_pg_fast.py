"""The PostgreSQL hot path: each call is one autocommit statement on the asyncpg connection itself.

``apply_step`` is one call of the plpgsql function ``asyncflow_step_v1``
(:data:`asyncflow.store.pg_functions.STEP_FUNCTION`, installed by ``create_schema()``): the guarded
instance update, the compare-and-set node updates, the inserts and the optional cancel run inside one
statement, so they commit together without ``BEGIN``/``COMMIT`` round trips; a failed condition
raises SQLSTATE :data:`CONFLICT_SQLSTATE`, which rolls the statement back and becomes
``StepResult(applied=False)``. Inside ``transaction()`` the same function runs in a SAVEPOINT
(:data:`STEP_CALL` through SQLAlchemy), because an error aborts the enclosing transaction.
The step travels as one JSON argument (:func:`step_json`): cheaper to send than a dozen arrays, and
the shape :mod:`asyncflow.store._pg_batch` concatenates to apply several steps in one statement.

The statements skip SQLAlchemy's per-statement work (compilation, execution context, result objects);
asyncpg prepares each text once per connection and caches it. Contexts travel as the canonical JSON
text the repo produced (``::text::jsonb`` in, ``::text`` out), so no codec of the engine is involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from json.encoder import encode_basestring as _encode_text
from typing import Any

from ..records import TaskInstanceRecord, WorkflowInstanceRecord
from . import _statements as st
from ._prepare import InstanceRow, PreparedStep

__all__ = [
    "CONFLICT_SQLSTATE",
    "STEP_CALL",
    "UNDEFINED_FUNCTION_SQLSTATE",
    "apply_step",
    "claim_due",
    "create_instance",
    "create_instances",
    "get_instance",
    "load_states",
    "load_tasks",
    "step_json",
]

CONFLICT_SQLSTATE = "AF409"
"""Raised by the step function when a condition of the step fails (nothing is written)."""

UNDEFINED_FUNCTION_SQLSTATE = "42883"
"""The function is missing (a schema made without ``create_schema()``): the repo falls back to Core."""

STEP_CALL = "SELECT asyncflow_step_v1($1::text::jsonb)"

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
_INSERT_INSTANCES = (
    "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, task_id, "
    "created_at, updated_at, next_run_at, version) "
    "SELECT r.workflow_type, r.business_id, r.status, r.context::jsonb, r.task_id, r.now, r.now, "
    "r.next_run_at, 1 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], "
    "$6::bigint[], $7::bigint[]) WITH ORDINALITY "
    "AS r(workflow_type, business_id, status, context, task_id, now, next_run_at, ord) "
    "ORDER BY r.ord RETURNING id"
)
_NO_INSTANCE = "NULL::bigint, " + "NULL::text, " * 4 + "NULL::bigint, " * 5
_NO_TASK = "NULL::bigint, " * 2 + "NULL::text, " * 3 + "NULL::bigint, " * 4 + "NULL::bigint "
_LOAD_STATES = (
    "SELECT id, workflow_type, business_id, status, workflow_context::text, task_id, created_at, "
    "updated_at, next_run_at, version, " + _NO_TASK + "FROM workflow_instance WHERE id = ANY ($1::bigint[]) "
    "UNION ALL SELECT " + _NO_INSTANCE + "id, workflow_instance_id, task_type, status, node_context::text, "
    "fail_count, created_at, updated_at, started_at, version FROM task_instance "
    "WHERE workflow_instance_id = ANY ($1::bigint[]) ORDER BY 11 NULLS FIRST"
)
"""Instances (columns 0-9) and then their node rows by id (columns 10-19), for several ids at once."""
_CLAIM = (
    "UPDATE workflow_instance AS w SET next_run_at = $3::bigint "
    "FROM (SELECT id, next_run_at AS due FROM workflow_instance "
    "WHERE status IN ('init', 'running') AND next_run_at <= $1::bigint{typed} "
    "ORDER BY next_run_at, id LIMIT $2::bigint FOR UPDATE SKIP LOCKED) AS picked "
    "WHERE w.id = picked.id RETURNING w.id, picked.due"
)
_CLAIM_ANY = _CLAIM.format(typed="")
_CLAIM_TYPED = _CLAIM.format(typed=" AND workflow_type = ANY ($4::text[])")


def _text(value: str | None) -> str:
    return "null" if value is None else _encode_text(value)


def _int(value: int | None) -> str:
    return "null" if value is None else str(value)


def step_json(step: PreparedStep, now: int) -> str:
    """The JSON argument of :data:`STEP_CALL` (see the function's comment), built from checked values.

    Contexts are already canonical JSON text: they are embedded as they are, not encoded twice.
    """
    change = step.instance_change
    updates = ",".join(
        f"[{task_id},{version},{_text(c.status)},{c.context or 'null'},{_int(c.fail_count)},"
        f"{_int(c.started_at)}]"
        for task_id, version, c in step.updates
    )
    inserts = ",".join(
        f"[{_encode_text(row.task_type)},{_encode_text(row.status)},{row.context},{row.fail_count},"
        f"{row.started_at or now}]"
        for row in step.inserts
    )
    statuses = ",".join(map(_encode_text, step.instance_status_in))
    cancel = "true" if step.cancel_other_tasks else "false"
    return (
        f"[{step.instance_id},[{statuses}],{_text(change.status)},{_int(change.next_run_at)},{now},"
        f"{cancel},[{updates}],[{inserts}]]"
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


async def create_instances(conn: Any, rows: Sequence[tuple[InstanceRow, int]]) -> list[int]:
    """Insert several instances (each with its own ``now``) in one statement; their ids, in order."""
    ids = await conn.fetch(
        _INSERT_INSTANCES,
        [row.workflow_type for row, _ in rows],
        [row.business_id for row, _ in rows],
        [row.status for row, _ in rows],
        [row.context for row, _ in rows],
        [row.task_id for row, _ in rows],
        [now for _, now in rows],
        [row.next_run_at for row, _ in rows],
    )
    # ids come from one sequence in the order of the rows: sorted, they follow the input
    return sorted(record[0] for record in ids)


async def load_states(
    conn: Any, instance_ids: Sequence[int]
) -> dict[int, tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]]]:
    """Instances and their node rows (ordered by id) in one statement; missing ids are left out."""
    states: dict[int, tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]]] = {}
    for row in await conn.fetch(_LOAD_STATES, list(instance_ids)):
        if row[0] is not None:
            states[row[0]] = (st.instance_record(row), [])
        else:
            task = st.task_record(row[10:])
            state = states.get(task.workflow_instance_id)
            if state is not None:  # else its instance row is gone (possible only without the FK)
                state[1].append(task)
    return states


async def get_instance(conn: Any, instance_id: int) -> WorkflowInstanceRecord | None:
    """The instance, or ``None``."""
    row = await conn.fetchrow(_GET_INSTANCE, instance_id)
    return None if row is None else st.instance_record(row)


async def load_tasks(conn: Any, instance_id: int) -> list[TaskInstanceRecord]:
    """Every node row of one instance, ordered by id."""
    return [st.task_record(row) for row in await conn.fetch(_LOAD_TASKS, instance_id)]


async def apply_step(conn: Any, step: PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]:
    """One call of the step function (raises the conflict SQLSTATE when a condition fails)."""
    ids = await conn.fetchval(STEP_CALL, step_json(step, now))
    return inserted_records(step, ids, now)


async def claim_due(conn: Any, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]) -> list[int]:
    """Lease up to ``limit`` due instances in one statement; ids ordered by ``(next_run_at, id)``."""
    if types:
        rows = await conn.fetch(_CLAIM_TYPED, now_ms, limit, now_ms + lease_ms, list(types))
    else:
        rows = await conn.fetch(_CLAIM_ANY, now_ms, limit, now_ms + lease_ms)
    return [row[0] for row in sorted(rows, key=lambda row: (row[1], row[0]))]
