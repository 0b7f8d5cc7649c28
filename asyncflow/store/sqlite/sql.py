"""Every SQLite statement of the repo's per-instance calls, each written once, as plain functions.

Each function takes ``db``, anything with ``execute(sql, params)`` returning a DB-API cursor (or a
SQLAlchemy result: ``rowcount``, ``lastrowid``, ``fetchone()``, ``fetchall()``): the backend's own
``sqlite3`` connection in its worker thread (outside ``transaction()``: a whole unit is one trip to
that thread, like a raw ``sqlite3`` user), or the SQLAlchemy connection of a transaction
(:class:`SyncConnection`, through ``AsyncConnection.run_sync``). The bodies never begin or end a
transaction: :func:`write` and :func:`read` wrap them on the thread's connection (``BEGIN
IMMEDIATE`` / a read snapshot); on SQLAlchemy's the caller's transaction or SAVEPOINT holds them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from sqlalchemy import exc
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection

from ...records import TaskInstanceRecord, WorkflowInstanceRecord
from .._errors import is_unique_violation
from .._prepare import InstanceRow, PreparedStep, Refused
from .._records import inserted_task_records, instance_record, task_record
from .._sql import RUNNABLE_SQL, TERMINAL_SQL, marks, refused_by
from .._statements import insert_child

__all__ = [
    "INSERT_CHILD",
    "MAX_BATCH",
    "STALE",
    "SyncConnection",
    "apply_steps",
    "claim_due",
    "claim_due_states",
    "create_instances",
    "get_instance",
    "inserted",
    "load_state",
    "load_tasks",
    "read",
    "step",
    "write",
]

INSERT_CHILD = insert_child(sqlite.insert)
"""A child instance unless its (parent, node, key) has one (a Core statement: the repo runs it)."""

MAX_BATCH = 64
"""Steps per transaction at most when steps are grouped (:func:`apply_steps`)."""

_INSERT_INSTANCE = (
    "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, task_id, "
    "created_at, updated_at, next_run_at, version, trace_context, lease_epoch) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)"
)
_INSERT_UNIQUE = (
    "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, task_id, "
    "created_at, updated_at, next_run_at, version, trace_context, unique_key, lease_epoch) "
    "SELECT ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ? "
    "WHERE ? <> 'always' OR NOT EXISTS (SELECT 1 FROM workflow_instance WHERE workflow_type = ? "
    "AND business_id = ? AND unique_key IS NOT NULL) ON CONFLICT DO NOTHING"
)
"""A unique instance, unless a unique index (or, for ``'always'``, any unique instance of the key)
refuses it: then no row, and nothing else fails."""
_REFUSED_BY = refused_by("?", "?", "?")
_INSTANCE_COLUMNS = (
    "id, workflow_type, business_id, status, workflow_context, task_id, created_at, updated_at, "
    "next_run_at, version, lease_epoch, trace_context, parent_id, parent_node, child_key"
)
"""A workflow_instance row as :func:`instance_record` reads it."""
_GET_INSTANCE = f"SELECT {_INSTANCE_COLUMNS} FROM workflow_instance WHERE id = ?"
_TAKE_LEASE = "UPDATE workflow_instance SET lease_epoch = lease_epoch + 1 WHERE id = ?"
_IN_STATUS = "SELECT status FROM workflow_instance WHERE id = ?"
_LOAD_TASKS = (
    "SELECT id, workflow_instance_id, task_type, status, node_context, fail_count, created_at, "
    "updated_at, started_at, version FROM task_instance WHERE workflow_instance_id = ? ORDER BY id"
)
_UPDATE_TASK = (
    "UPDATE task_instance SET status = coalesce(?, status), node_context = coalesce(?, node_context), "
    "fail_count = coalesce(?, fail_count), started_at = coalesce(?, started_at), updated_at = ?, "
    "version = version + 1 WHERE id = ? AND workflow_instance_id = ? AND version = ?"
)
_INSERT_TASK = (
    "INSERT INTO task_instance (workflow_instance_id, task_type, status, node_context, fail_count, "
    "created_at, updated_at, started_at, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)"
)
_INTEGRITY_ERRORS = (sqlite3.IntegrityError, exc.IntegrityError)


class _Stale:
    """What :func:`step` returns when the step's lease epoch is no longer the instance's."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "STALE"


STALE = _Stale()
"""The outcome of a stale step (rolled back, like ``None``)."""


class SyncConnection:
    """``execute(sql, params)`` on a SQLAlchemy ``Connection`` (inside ``AsyncConnection.run_sync``)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.exec_driver_sql(sql, tuple(params))


@cache
def _update_instance(statuses: int, fenced: bool) -> str:
    sql = (
        "UPDATE workflow_instance SET status = coalesce(?, status), "
        "next_run_at = coalesce(?, next_run_at), updated_at = ?, version = version + 1 WHERE id = ?"
    )
    sql = f"{sql} AND status IN ({marks(statuses)})" if statuses else sql
    return f"{sql} AND lease_epoch = ?" if fenced else sql


@cache
def _cancel_others(excluded: int) -> str:
    sql = (
        "UPDATE task_instance SET status = 'canceled', updated_at = ?, version = version + 1 "
        f"WHERE workflow_instance_id = ? AND status NOT IN ({TERMINAL_SQL})"
    )
    return f"{sql} AND id NOT IN ({marks(excluded)})" if excluded else sql


@cache
def due_select(types: int) -> str:
    """The due instances, oldest due first (served by ``ix_workflow_instance_due``)."""
    typed = f" AND workflow_type IN ({marks(types)})" if types else ""
    return (
        f"SELECT id FROM workflow_instance WHERE status IN ({RUNNABLE_SQL}) AND next_run_at <= ?"
        f"{typed} ORDER BY next_run_at, id LIMIT ?"
    )


@cache
def _claim_ids(ids: int) -> str:
    return (
        f"UPDATE workflow_instance SET next_run_at = ? WHERE id IN ({marks(ids)}) "
        f"AND status IN ({RUNNABLE_SQL}) AND next_run_at <= ? RETURNING id"
    )


# ------------------------------------------------------------------------ units on the thread


def write(conn: sqlite3.Connection, body: Callable[..., Any], *args: Any) -> Any:
    """``body(conn, *args)`` in ``BEGIN IMMEDIATE``; committed unless it returns ``None``/``STALE`` or
    raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn, *args)
        conn.execute("COMMIT" if result is not None and result is not STALE else "ROLLBACK")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def read(conn: sqlite3.Connection, body: Callable[..., Any], *args: Any) -> Any:
    """``body(conn, *args)`` in one read transaction (its reads see one snapshot)."""
    conn.execute("BEGIN")
    try:
        return body(conn, *args)
    finally:
        conn.execute("COMMIT")


def apply_steps(conn: sqlite3.Connection, steps: Sequence[tuple[PreparedStep, int]]) -> list[Any]:
    """Several steps in one ``BEGIN IMMEDIATE`` transaction, each in a SAVEPOINT, and one commit.

    Outcome per step: its inserted records, ``None`` (a condition failed: rolled back), ``STALE``
    (its lease epoch is gone: rolled back), or the exception it raised (rolled back alone). An error
    that ends the whole transaction is raised.
    """
    outcomes: list[Any] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for prepared, now in steps:
            outcome: Any
            conn.execute("SAVEPOINT asyncflow_step")
            try:
                ids = step(conn, prepared, now)
            except sqlite3.Error as error:
                if not conn.in_transaction:  # SQLite rolled back the whole transaction itself
                    raise
                ids, outcome = None, error
            else:
                outcome = ids if ids is None or isinstance(ids, _Stale) else inserted(prepared, ids, now)
            if ids is None or ids is STALE:
                conn.execute("ROLLBACK TO asyncflow_step")
            conn.execute("RELEASE asyncflow_step")
            outcomes.append(outcome)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


# ------------------------------------------------------------------------------------ bodies


def create_instances(db: Any, rows: Sequence[tuple[InstanceRow, int]]) -> list[int | Refused]:
    """Insert instances (each with its own ``now``); their ids, in order (:class:`Refused`: a refused
    unique row, with the instance that refused it: the write lock makes it visible here)."""
    ids: list[int | Refused] = []
    for row, now in rows:
        params = (row.workflow_type, row.business_id, row.status, row.context, row.task_id, now, now)
        if row.unique is None:
            ids.append(
                db.execute(
                    _INSERT_INSTANCE, (*params, row.next_run_at, row.trace_context, row.lease_epoch)
                ).lastrowid
            )
            continue
        key = (row.workflow_type, row.business_id)
        cursor = db.execute(
            _INSERT_UNIQUE,
            (*params, row.next_run_at, row.trace_context, row.unique, row.lease_epoch, row.unique, *key),
        )
        if cursor.rowcount == 1:
            ids.append(cursor.lastrowid)
        else:
            found = db.execute(_REFUSED_BY, (*key, row.unique)).fetchone()
            ids.append(Refused(None if found is None else found[0]))
    return ids


def get_instance(db: Any, instance_id: int) -> WorkflowInstanceRecord | None:
    """The instance, or ``None``."""
    row = db.execute(_GET_INSTANCE, (instance_id,)).fetchone()
    return None if row is None else instance_record(row)


def load_tasks(db: Any, instance_id: int) -> list[TaskInstanceRecord]:
    """Every node row of one instance, ordered by id."""
    return [task_record(row) for row in db.execute(_LOAD_TASKS, (instance_id,)).fetchall()]


def load_state(
    db: Any, instance_id: int, lease: bool = False
) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None:
    """The instance and its node rows (ordered by id), or ``None`` (run it in one transaction).

    ``lease``: first take a new lease epoch (a write: run it in a write transaction).
    """
    if lease:
        db.execute(_TAKE_LEASE, (instance_id,))
    instance = get_instance(db, instance_id)
    return None if instance is None else (instance, load_tasks(db, instance_id))


def step(db: Any, prepared: PreparedStep, now: int) -> list[int] | _Stale | None:
    """Apply a step: the ids of the inserted rows, or ``None`` if a condition failed, ``STALE`` if its
    lease epoch is no longer the instance's (roll back then).

    Order: the instance row, the node updates (compare-and-set), the inserts, then the cancel.
    """
    instance_id, statuses, change, updates, inserts, cancel, epoch = prepared
    fence = () if epoch is None else (epoch,)
    cursor = db.execute(
        _update_instance(len(statuses), epoch is not None),
        (change[0], change[2], now, instance_id, *statuses, *fence),  # StepChange: status, next_run_at
    )
    if cursor.rowcount != 1:
        if epoch is None:
            return None
        row = db.execute(_IN_STATUS, (instance_id,)).fetchone()
        return STALE if row is not None and (not statuses or row[0] in statuses) else None
    touched = []
    for task_id, version, fields in updates:
        changes = (fields.status, fields.context, fields.fail_count, fields.started_at, now)
        if db.execute(_UPDATE_TASK, (*changes, task_id, instance_id, version)).rowcount != 1:
            return None
        touched.append(task_id)
    ids = []
    for task_type, status, context, fail_count, started_at, _ in inserts:
        params = (instance_id, task_type, status, context, fail_count, now, now)
        try:
            cursor = db.execute(_INSERT_TASK, (*params, started_at or now))
        except _INTEGRITY_ERRORS as error:
            if is_unique_violation(error):
                return None
            raise
        ids.append(cursor.lastrowid)
    if cancel:
        touched.extend(ids)
        db.execute(_cancel_others(len(touched)), (now, instance_id, *touched))
    return ids


def inserted(prepared: PreparedStep, ids: Sequence[int], now: int) -> tuple[TaskInstanceRecord, ...]:
    """The records of the rows a step inserted."""
    return inserted_task_records(prepared[0], ids, prepared[4], now)  # instance_id, inserts


def _hand_over(count: int) -> str:
    return (
        f"UPDATE workflow_instance SET lease_epoch = 1 WHERE id IN ({marks(count)}) AND version = 1 "
        "AND lease_epoch = 0 AND NOT EXISTS "
        "(SELECT 1 FROM task_instance t WHERE t.workflow_instance_id = workflow_instance.id) "
        f"RETURNING {_INSTANCE_COLUMNS}"
    )


def claim_due_states(
    db: Any, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]
) -> list[tuple[int, WorkflowInstanceRecord | None]]:
    """:func:`claim_due`, with the record (as leased) of each claimed instance that is as it was
    created: no node row, never leased or written; it takes lease epoch 1, the epoch of the pass it is
    handed to (the same transaction)."""
    ids = claim_due(db, now_ms, limit, lease_ms, types)
    if not ids:
        return []
    rows = {row[0]: instance_record(row) for row in db.execute(_hand_over(len(ids)), ids).fetchall()}
    return [(i, rows.get(i)) for i in ids]


def claim_due(db: Any, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]) -> list[int]:
    """Lease up to ``limit`` due instances: a SELECT, then an UPDATE that re-checks (one transaction)."""
    ids = [row[0] for row in db.execute(due_select(len(types)), (now_ms, *types, limit)).fetchall()]
    if not ids:
        return ids
    lease = now_ms + lease_ms
    claimed = {row[0] for row in db.execute(_claim_ids(len(ids)), (lease, *ids, now_ms)).fetchall()}
    return [i for i in ids if i in claimed]
