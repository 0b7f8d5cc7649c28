"""Row -> record conversions shared by the SQL backends (rows in the column order of the statements)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..records import TaskInstanceRecord, WorkflowInstanceRecord
from ._json import copy_context, loads_context
from ._prepare import TaskRow

__all__ = ["inserted_task_record", "instance_record", "task_record"]


def instance_record(row: Sequence[Any]) -> WorkflowInstanceRecord:
    """A record from ``id, workflow_type, business_id, status, workflow_context, task_id, created_at,
    updated_at, next_run_at, version, lease_epoch, trace_context, parent_id, parent_node, child_key``."""
    return WorkflowInstanceRecord(
        id=row[0],
        workflow_type=row[1],
        business_id=row[2],
        status=row[3],
        workflow_context=loads_context(row[4], "workflow_instance.workflow_context", row[0]),
        task_id=row[5],
        created_at=row[6],
        updated_at=row[7],
        next_run_at=row[8],
        version=row[9],
        lease_epoch=row[10],
        trace_context=row[11],
        parent_id=row[12],
        parent_node=row[13],
        child_key=row[14],
    )


def task_record(row: Sequence[Any]) -> TaskInstanceRecord:
    """A record from ``id, workflow_instance_id, task_type, status, node_context, fail_count,
    created_at, updated_at, started_at, version``."""
    return TaskInstanceRecord(
        id=row[0],
        workflow_instance_id=row[1],
        task_type=row[2],
        status=row[3],
        node_context=loads_context(row[4], "task_instance.node_context", row[0]),
        fail_count=row[5],
        created_at=row[6],
        updated_at=row[7],
        started_at=row[8],
        version=row[9],
    )


def inserted_task_record(task_id: int, instance_id: int, row: TaskRow, now: int) -> TaskInstanceRecord:
    """The record of a node row just inserted (no read back needed)."""
    return TaskInstanceRecord(
        id=task_id,
        workflow_instance_id=instance_id,
        task_type=row.task_type,
        status=row.status,
        node_context=copy_context(row.context, row.plain),
        fail_count=row.fail_count,
        created_at=now,
        updated_at=now,
        started_at=row.started_at or now,
        version=1,
    )
