"""SQLAlchemy Core statements shared by the SQL backends: queries, counts, updates, node inserts.

The per-instance calls of a workflow pass (create, read, step, claim) are each backend's own
(:mod:`asyncflow.store.postgres.sql`, :mod:`asyncflow.store.sqlite.sql`); what is left here is the
same on every backend. Statements are built once at import and reused (SQLAlchemy caches their
compiled form); the few whose shape depends on which filters are given are built per call (queries)
or cached per shape (updates).
Contexts bypass SQLAlchemy's JSON processing: the repo binds canonical JSON text it produced itself
and reads raw values, so a corrupt stored document can be read as ``{}`` instead of failing the read.
"""

from __future__ import annotations

from collections.abc import Callable
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
    case,
    exists,
    func,
    insert,
    literal_column,
    select,
    type_coerce,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from ..records import (
    QueryTaskInstanceParams,
    QueryWorkflowInstanceParams,
)
from ._json import page_window
from ._prepare import InstanceChange, TaskChange, TaskRow
from ._sql import RUNNABLE
from .tables import JSON_TYPE
from .tables import task_instance as ti
from .tables import workflow_instance as wi


class RawJSON(TypeDecorator[Any]):
    """The columns' JSON type on the wire (``JSONB`` on PostgreSQL: :data:`~asyncflow.store.tables.JSON_TYPE`
    declares the variants), but values pass through untouched (text in, driver value out)."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return JSON_TYPE

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
    wi.c.lease_epoch,
    wi.c.trace_context,
    wi.c.parent_id,
    wi.c.parent_node,
    wi.c.child_key,
)


_INSTANCE_SET = {
    "status": func.coalesce(_text("p_status"), wi.c.status),
    "workflow_context": func.coalesce(bindparam("p_context", type_=_RAW), wi.c.workflow_context),
    "next_run_at": func.coalesce(_int("p_next_run_at"), wi.c.next_run_at),
    "updated_at": _int("p_now"),
    "version": wi.c.version + 1,
    "lease_epoch": wi.c.lease_epoch + 1,  # an update outside passes fences the passes in flight
}
UPDATE_INSTANCES: Update = update(wi).values(_INSTANCE_SET).where(wi.c.id.in_(_ids("p_ids")))
"""``None`` parameters leave a column unchanged (``COALESCE``), so one statement serves every update."""
UPDATE_INSTANCES_IN_STATUS: Update = UPDATE_INSTANCES.where(wi.c.status.in_(_texts("p_status_in")))

# literal values, so the planner matches the partial index ix_workflow_instance_due (tables.due_index)
_RUNNABLE_STATUS = wi.c.status.in_([literal_column(f"'{status}'") for status in RUNNABLE])
NEXT_DUE: Select[Any] = select(func.min(wi.c.next_run_at)).where(_RUNNABLE_STATUS)
NEXT_DUE_TYPED: Select[Any] = NEXT_DUE.where(wi.c.workflow_type.in_(_texts("types")))


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

TASK_VALUES = {
    "workflow_instance_id": _int("workflow_instance_id"),
    "task_type": _text("task_type"),
    "status": _text("status"),
    "node_context": bindparam("node_context", type_=_RAW),
    "fail_count": _int("fail_count"),
    "created_at": _int("created_at"),
    "updated_at": _int("updated_at"),
    "started_at": _int("started_at"),
    "version": literal_column("1"),
}

INSERT_TASK: Insert = (
    insert(ti)
    .from_select(
        list(TASK_VALUES),
        select(*TASK_VALUES.values()).where(
            exists(select(wi.c.id).where(wi.c.id == _int("workflow_instance_id")))
        ),
    )
    .returning(ti.c.id, ti.c.task_type)
)
"""One node row, inserted only if its instance exists (no row returned otherwise): SQLite's, whose
foreign key also holds (and whose writers take turns); PostgreSQL's is ``postgres.sql.INSERT_TASK``."""

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
    task_type, status, context, fail_count, started_at, _ = row
    return {
        "workflow_instance_id": instance_id,
        "task_type": task_type,
        "status": status,
        "node_context": context,
        "fail_count": fail_count,
        "created_at": now,
        "updated_at": now,
        "started_at": started_at or now,
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


# ------------------------------------------------------------------------------------ uniqueness

_UNIQUE_KEY = (wi.c.workflow_type == bindparam("workflow_type"), wi.c.business_id == bindparam("business_id"))
_ACTIVE_FIRST = case((_RUNNABLE_STATUS, 0), else_=1)
UNIQUE_ANY: Select[Any] = (
    select(wi.c.id)
    .where(*_UNIQUE_KEY, wi.c.unique_key.is_not(None))
    .order_by(_ACTIVE_FIRST, wi.c.id.desc())
    .limit(1)
)
"""The unique instance of a key that refused an ``'always'`` row: the active one, else the latest."""
UNIQUE_ACTIVE: Select[Any] = select(wi.c.id).where(
    *_UNIQUE_KEY, wi.c.unique_key.is_not(None), _RUNNABLE_STATUS
)
"""The active unique instance of a key (what refused an ``'active'`` row)."""


# ----------------------------------------------------------------------------------------- children

_CHILD_VALUES = {
    "workflow_type": _text("workflow_type"),
    "business_id": _text("business_id"),
    "status": _text("status"),
    "workflow_context": bindparam("workflow_context", type_=_RAW),
    "task_id": _int("task_id"),
    "created_at": _int("now"),
    "updated_at": _int("now"),
    "next_run_at": _int("next_run_at"),
    "version": 1,
    "trace_context": _text("trace_context"),
    "parent_id": _int("parent_id"),
    "parent_node": _text("parent_node"),
    "child_key": _text("child_key"),
}


def insert_child(insert: Callable[[Any], Any]) -> Any:
    """A child instance, unless ``uq_workflow_instance_child`` has its (parent, node, key): then no row
    (``ON CONFLICT DO NOTHING``, which waits for a concurrent insert of the same key to end).

    ``insert`` is the backend's dialect ``insert`` (each backend builds the statement once: its
    ``sql.INSERT_CHILD``)."""
    return (
        insert(wi)
        .values(_CHILD_VALUES)
        .on_conflict_do_nothing(
            index_elements=[wi.c.parent_id, wi.c.parent_node, wi.c.child_key],
            index_where=wi.c.parent_id.is_not(None),
        )
        .returning(*INSTANCE_COLUMNS)
    )


CHILD_OF: Select[Any] = select(*INSTANCE_COLUMNS).where(
    wi.c.parent_id == _int("parent_id"),
    wi.c.parent_node == _text("parent_node"),
    wi.c.child_key == _text("child_key"),
)
"""The child of one (parent, node, key)."""
CHILDREN: Select[Any] = select(*INSTANCE_COLUMNS).where(wi.c.parent_id == _int("parent_id")).order_by(wi.c.id)
"""The children of one instance, by id (served by ``uq_workflow_instance_child``'s leading column)."""
