"""Row -> record conversions shared by the SQL backends (rows in the column order of the statements)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..records import TaskInstanceRecord, WorkflowInstanceRecord, new_instance_record, new_task_record
from ._json import copy_context, loads_context, orjson_loads
from ._prepare import TaskRow

__all__ = ["inserted_task_record", "inserted_task_records", "instance_record", "task_record"]


def instance_record(row: Sequence[Any]) -> WorkflowInstanceRecord:
    """A record from ``id, workflow_type, business_id, status, workflow_context, task_id, created_at,
    updated_at, next_run_at, version, lease_epoch, trace_context, parent_id, parent_node, child_key``."""
    return new_instance_record(  # positional (asyncflow._frozen.positional): every pass reads one
        row[0],  # id
        row[1],  # workflow_type
        row[2],  # business_id
        row[3],  # status
        loads_context(row[4], "workflow_instance.workflow_context", row[0]),
        row[5],  # task_id
        row[6],  # created_at
        row[7],  # updated_at
        row[8],  # next_run_at
        row[9],  # version
        row[11],  # trace_context
        row[10],  # lease_epoch
        row[12],  # parent_id
        row[13],  # parent_node
        row[14],  # child_key
    )


def task_record(row: Sequence[Any]) -> TaskInstanceRecord:
    """A record from ``id, workflow_instance_id, task_type, status, node_context, fail_count,
    created_at, updated_at, started_at, version``."""
    return new_task_record(  # positional (asyncflow._frozen.positional), in field order
        row[0],  # id
        row[1],  # workflow_instance_id
        row[2],  # task_type
        row[3],  # status
        loads_context(row[4], "task_instance.node_context", row[0]),
        row[5],  # fail_count
        row[6],  # created_at
        row[7],  # updated_at
        row[8],  # started_at
        row[9],  # version
    )


def inserted_task_record(task_id: int, instance_id: int, row: TaskRow, now: int) -> TaskInstanceRecord:
    """The record of a node row just inserted (no read back needed)."""
    task_type, status, context, fail_count, started_at, plain = row
    return new_task_record(  # positional: a node's hot path (asyncflow._frozen.positional)
        task_id,
        instance_id,
        task_type,
        status,
        copy_context(context, plain),
        fail_count,
        now,  # created_at
        now,  # updated_at
        started_at or now,
        1,  # version
    )


def inserted_task_records(
    instance_id: int, ids: Sequence[int], rows: Sequence[TaskRow], now: int
) -> tuple[TaskInstanceRecord, ...]:
    """:func:`inserted_task_record` of each row with its id (in order), in one comprehension: a step's
    inserts, on every pass. A ``plain`` context is read by orjson directly (``copy_context``'s first
    path); should orjson refuse one after all, the rows go through :func:`inserted_task_record`.
    (``zip`` without ``strict=True``, whose keyword costs more than the rest of a one-row call: the
    lengths are compared first.)"""
    if len(ids) != len(rows):
        raise ValueError(f"{len(ids)} ids for {len(rows)} inserted rows")
    pairs = zip(ids, rows)  # noqa: B905 - the same length (compared above)
    try:
        return tuple(
            [
                new_task_record(  # positional: a node's hot path (asyncflow._frozen.positional)
                    task_id,
                    instance_id,
                    task_type,
                    status,
                    orjson_loads(context) if plain else copy_context(context),
                    fail_count,
                    now,  # created_at
                    now,  # updated_at
                    started_at or now,
                    1,  # version
                )
                for task_id, (task_type, status, context, fail_count, started_at, plain) in pairs
            ]
        )
    except ValueError:  # orjson.JSONDecodeError
        pairs = zip(ids, rows)  # noqa: B905 - the same length (compared above)
        return tuple([inserted_task_record(task_id, instance_id, row, now) for task_id, row in pairs])
