"""Prebuilt SQLAlchemy Core statements of the SQL repo, and the row → record conversions.

Statements are built once at import and reused (SQLAlchemy caches their compiled form); the few whose
shape depends on which filters are given are built per call (queries) or cached per shape (updates).
Contexts bypass SQLAlchemy's JSON processing: the repo binds canonical JSON text it produced itself
and reads raw values, so a corrupt stored document can be read as ``{}`` instead of failing the read.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    Insert,
    Select,
    Text,
    Update,
    bindparam,
    func,
    insert,
    literal_column,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from ..records import (
    QueryTaskInstanceParams,
    QueryWorkflowInstanceParams,
    TaskInstanceRecord,
    WorkflowInstanceRecord,
)
from ._json import copy_context, loads_context, page_window
from ._prepare import InstanceChange, InstanceRow, TaskChange, TaskRow
from .tables import task_instance as ti
from .tables import workflow_instance as wi

RUNNABLE = ("init", "running")
TERMINAL = ("completed", "failed", "canceled")


class RawJSON(TypeDecorator[Any]):
    """``JSON``/``JSONB`` on the wire, but values pass through untouched (text in, driver value out)."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())

    def bind_processor(self, dialect: Dialect) -> None:
        return None

    def result_processor(self, dialect: Dialect, coltype: object) -> None:
        return None


_RAW = RawJSON()


def _text(name: str) -> Any:
    return bindparam(name, type_=Text())


def _int(name: str) -> Any:
    return bindparam(name, type_=BigInteger())


def _ids(name: str) -> Any:
    return bindparam(name, expanding=True, type_=BigInteger())


def _texts(name: str) -> Any:
    return bindparam(name, expanding=True, type_=Text())


# ---------------------------------------------------------------------------------------- instances

INSTANCE_COLUMNS = (
    wi.c.id,
    wi.c.workflow_type,
    wi.c.business_id,
    wi.c.status,
    type_coerce(wi.c.workflow_context, _RAW).label("workflow_context"),
    wi.c.task_id,
    wi.c.created_at,
    wi.c.updated_at,
    wi.c.next_run_at,
    wi.c.version,
)

INSERT_INSTANCE: Insert = (
    insert(wi)
    .values(
        workflow_type=_text("workflow_type"),
        business_id=_text("business_id"),
        status=_text("status"),
        workflow_context=bindparam("workflow_context", type_=_RAW),
        task_id=_int("task_id"),
        created_at=_int("created_at"),
        updated_at=_int("updated_at"),
        next_run_at=_int("next_run_at"),
        version=1,
    )
    .returning(wi.c.id)
)

GET_INSTANCE: Select[Any] = select(*INSTANCE_COLUMNS).where(wi.c.id == _int("id"))

_INSTANCE_SET = {
    "status": func.coalesce(_text("p_status"), wi.c.status),
    "workflow_context": func.coalesce(bindparam("p_context", type_=_RAW), wi.c.workflow_context),
    "next_run_at": func.coalesce(_int("p_next_run_at"), wi.c.next_run_at),
    "updated_at": _int("p_now"),
    "version": wi.c.version + 1,
}
UPDATE_INSTANCES: Update = update(wi).values(_INSTANCE_SET).where(wi.c.id.in_(_ids("p_ids")))
"""``None`` parameters leave a column unchanged (``COALESCE``), so one statement serves every update."""
UPDATE_INSTANCES_IN_STATUS: Update = UPDATE_INSTANCES.where(wi.c.status.in_(_texts("p_status_in")))

# literal values, so the planner matches the partial index ix_workflow_instance_due (tables.due_index)
_RUNNABLE_STATUS = wi.c.status.in_([literal_column(f"'{status}'") for status in RUNNABLE])
_RUNNABLE_DUE = (_RUNNABLE_STATUS, wi.c.next_run_at <= _int("now_ms"))
_DUE_ORDER = (wi.c.next_run_at, wi.c.id)


def _picked(typed: bool) -> Any:
    query = select(wi.c.id, wi.c.next_run_at.label("due")).where(*_RUNNABLE_DUE)
    if typed:
        query = query.where(wi.c.workflow_type.in_(_texts("types")))
    subquery = query.order_by(*_DUE_ORDER).limit(_int("limit")).with_for_update(skip_locked=True)
    return subquery.subquery("picked")


def _claim_pg(typed: bool) -> Update:
    picked = _picked(typed)
    return (
        update(wi)
        .values(next_run_at=_int("p_lease"))
        .where(wi.c.id == picked.c.id)
        .returning(wi.c.id, picked.c.due)
    )


CLAIM_PG = _claim_pg(False)
CLAIM_PG_TYPED = _claim_pg(True)
DUE_SELECT: Select[Any] = select(wi.c.id).where(*_RUNNABLE_DUE).order_by(*_DUE_ORDER).limit(_int("limit"))
DUE_SELECT_TYPED: Select[Any] = DUE_SELECT.where(wi.c.workflow_type.in_(_texts("types")))
CLAIM_IDS: Update = (
    update(wi)
    .values(next_run_at=_int("p_lease"))
    .where(wi.c.id.in_(_ids("p_ids")), *_RUNNABLE_DUE)
    .returning(wi.c.id)
)
NEXT_DUE: Select[Any] = select(func.min(wi.c.next_run_at)).where(_RUNNABLE_STATUS)
NEXT_DUE_TYPED: Select[Any] = NEXT_DUE.where(wi.c.workflow_type.in_(_texts("types")))


def instance_record(row: Sequence[Any]) -> WorkflowInstanceRecord:
    """A record from a row of :data:`INSTANCE_COLUMNS`."""
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
    )


# -------------------------------------------------------------------------------------------- tasks

TASK_COLUMNS = (
    ti.c.id,
    ti.c.workflow_instance_id,
    ti.c.task_type,
    ti.c.status,
    type_coerce(ti.c.node_context, _RAW).label("node_context"),
    ti.c.fail_count,
    ti.c.created_at,
    ti.c.updated_at,
    ti.c.started_at,
    ti.c.version,
)

INSERT_TASK: Insert = (
    insert(ti)
    .values(
        workflow_instance_id=_int("workflow_instance_id"),
        task_type=_text("task_type"),
        status=_text("status"),
        node_context=bindparam("node_context", type_=_RAW),
        fail_count=_int("fail_count"),
        created_at=_int("created_at"),
        updated_at=_int("updated_at"),
        started_at=_int("started_at"),
        version=1,
    )
    .returning(ti.c.id, ti.c.task_type)
)

LOAD_TASKS: Select[Any] = (
    select(*TASK_COLUMNS).where(ti.c.workflow_instance_id == _int("workflow_instance_id")).order_by(ti.c.id)
)

_TASK_SET = {
    "status": func.coalesce(_text("p_status"), ti.c.status),
    "node_context": func.coalesce(bindparam("p_context", type_=_RAW), ti.c.node_context),
    "fail_count": func.coalesce(_int("p_fail_count"), ti.c.fail_count),
    "started_at": func.coalesce(_int("p_started_at"), ti.c.started_at),
    "updated_at": _int("p_now"),
    "version": ti.c.version + 1,
}


@cache
def update_tasks(ids: bool, instance: bool, types: bool, statuses: bool, version: bool) -> Update:
    """The node update for one combination of where-conditions (built once per combination)."""
    conditions: list[ColumnElement[bool]] = []
    if ids:
        conditions.append(ti.c.id.in_(_ids("p_ids")))
    if instance:
        conditions.append(ti.c.workflow_instance_id == _int("p_instance"))
    if types:
        conditions.append(ti.c.task_type.in_(_texts("p_task_type_in")))
    if statuses:
        conditions.append(ti.c.status.in_(_texts("p_status_in")))
    if version:
        conditions.append(ti.c.version == _int("p_version"))
    return update(ti).values(_TASK_SET).where(*conditions)


CANCEL_OTHER_TASKS: Update = (
    update(ti)
    .values(status="canceled", updated_at=_int("p_now"), version=ti.c.version + 1)
    .where(
        ti.c.workflow_instance_id == _int("p_instance"),
        ti.c.status.not_in(TERMINAL),
        ti.c.id.not_in(_ids("p_exclude")),
    )
)


def task_record(row: Sequence[Any]) -> TaskInstanceRecord:
    """A record from a row of :data:`TASK_COLUMNS`."""
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


# ------------------------------------------------------------------------------------------ queries


def _instance_conditions(params: QueryWorkflowInstanceParams) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if params.workflow_instance_id is not None:
        conditions.append(wi.c.id == params.workflow_instance_id)
    if params.workflow_type_in:
        conditions.append(wi.c.workflow_type.in_(params.workflow_type_in))
    if params.business_id is not None:
        conditions.append(wi.c.business_id == params.business_id)
    if params.status_in:
        conditions.append(wi.c.status.in_(params.status_in))
    if params.id_greater_than is not None:
        conditions.append(wi.c.id > params.id_greater_than)
    if params.task_id is not None:
        conditions.append(wi.c.task_id == params.task_id)
    return conditions


def query_instances(params: QueryWorkflowInstanceParams) -> Select[Any]:
    """Filtered (AND), ordered by id (descending only for ``order_by_id_asc=False``), paged."""
    query = select(*INSTANCE_COLUMNS).where(*_instance_conditions(params))
    query = query.order_by(wi.c.id.desc() if params.order_by_id_asc is False else wi.c.id)
    window = page_window(params.page)
    if window is not None:
        query = query.offset(window[0]).limit(window[1])
    return query


def count_instances(params: QueryWorkflowInstanceParams) -> Select[Any]:
    """``COUNT(*)`` with the same filters (paging and order ignored)."""
    return select(func.count()).select_from(wi).where(*_instance_conditions(params))


def query_tasks(params: QueryTaskInstanceParams) -> Select[Any]:
    """Filtered (AND) node rows ordered by id; ``page=None`` returns them all."""
    conditions: list[ColumnElement[bool]] = []
    if params.id is not None:
        conditions.append(ti.c.id == params.id)
    if params.workflow_instance_id is not None:
        conditions.append(ti.c.workflow_instance_id == params.workflow_instance_id)
    if params.task_type is not None:
        conditions.append(ti.c.task_type == params.task_type)
    if params.status_in:
        conditions.append(ti.c.status.in_(tuple(params.status_in)))
    if params.id_greater_than is not None:
        conditions.append(ti.c.id > params.id_greater_than)
    query = select(*TASK_COLUMNS).where(*conditions)
    query = query.order_by(ti.c.id.desc() if params.order_by_id_asc is False else ti.c.id)
    window = page_window(params.page)
    if window is not None:
        query = query.offset(window[0]).limit(window[1])
    return query


# ------------------------------------------------------------------------------ bind parameters


def instance_params(row: InstanceRow, now: int) -> dict[str, Any]:
    """Bind parameters of :data:`INSERT_INSTANCE`."""
    return {
        "workflow_type": row.workflow_type,
        "business_id": row.business_id,
        "status": row.status,
        "workflow_context": row.context,
        "task_id": row.task_id,
        "created_at": now,
        "updated_at": now,
        "next_run_at": row.next_run_at,
    }


def instance_change_params(change: InstanceChange, now: int) -> dict[str, Any]:
    """Bind parameters of the instance updates (``None`` = unchanged)."""
    return {
        "p_status": change.status,
        "p_context": change.context,
        "p_next_run_at": change.next_run_at,
        "p_now": now,
    }


def task_params(instance_id: int, row: TaskRow, now: int) -> dict[str, Any]:
    """Bind parameters of :data:`INSERT_TASK` (``started_at`` 0 = now)."""
    return {
        "workflow_instance_id": instance_id,
        "task_type": row.task_type,
        "status": row.status,
        "node_context": row.context,
        "fail_count": row.fail_count,
        "created_at": now,
        "updated_at": now,
        "started_at": row.started_at or now,
    }


def task_change_params(change: TaskChange, now: int) -> dict[str, Any]:
    """Bind parameters of the node updates (``None`` = unchanged)."""
    return {
        "p_status": change.status,
        "p_context": change.context,
        "p_fail_count": change.fail_count,
        "p_started_at": change.started_at,
        "p_now": now,
    }


def inserted_task_record(task_id: int, instance_id: int, row: TaskRow, now: int) -> TaskInstanceRecord:
    """The record of a node row just inserted (no read back needed)."""
    return TaskInstanceRecord(
        id=task_id,
        workflow_instance_id=instance_id,
        task_type=row.task_type,
        status=row.status,
        node_context=copy_context(row.context),
        fail_count=row.fail_count,
        created_at=now,
        updated_at=now,
        started_at=row.started_at or now,
        version=1,
    )
