"""The SQLite hot path: each call is ONE trip to the aiosqlite worker thread, like a raw ``sqlite3`` user.

Through SQLAlchemy every statement costs several hand-offs to aiosqlite's thread (cursor, execute,
fetch, close; a step is some twenty), and each hand-off waits for the GIL while the event loop is
busy. Here a whole unit (a step in ``BEGIN IMMEDIATE ... COMMIT``, a claim, an insert, a read) is a
plain function run on the ``sqlite3`` connection in that thread, with plain SQL written for the
tables of :mod:`asyncflow.store.tables`.

That needs aiosqlite's private ``Connection._execute(fn, *args)`` (run ``fn`` in the worker thread) and
``Connection._conn``. :data:`SUPPORTED` checks for them and for a tested aiosqlite version; without
them the repo uses its SQLAlchemy Core path for every call (slower, same behaviour).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from ..records import TaskInstanceRecord, WorkflowInstanceRecord
from . import _statements as st
from ._dialect import is_unique_violation
from ._prepare import InstanceRow, PreparedStep

__all__ = [
    "MAX_BATCH",
    "TESTED_AIOSQLITE",
    "apply_step",
    "apply_steps",
    "claim_due",
    "create_instance",
    "get_instance",
    "load_state",
    "load_tasks",
    "run",
]

logger = logging.getLogger(__name__)

MAX_BATCH = 64
"""Steps per transaction at most when steps are grouped (:func:`apply_steps`)."""

TESTED_AIOSQLITE = ((0, 17), (0, 22))
"""The aiosqlite versions (major, minor), inclusive, whose private ``_execute`` this module relies on."""


def _version(text: str) -> tuple[int, int] | None:
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def _supported() -> bool:
    try:
        import aiosqlite
    except ImportError:  # pragma: no cover - the sqlite extra is missing; Core fails on its own
        return False
    version = _version(getattr(aiosqlite, "__version__", ""))
    low, high = TESTED_AIOSQLITE
    if version is None or not low <= version <= high:
        logger.info(
            "aiosqlite %s is not a tested version (%s.%s to %s.%s): SQLite calls take the slower "
            "SQLAlchemy path",
            getattr(aiosqlite, "__version__", "?"),
            *low,
            *high,
        )
        return False
    connection = getattr(aiosqlite, "Connection", None)
    if not callable(getattr(connection, "_execute", None)) or not hasattr(connection, "_conn"):
        logger.info("aiosqlite has no Connection._execute: SQLite calls take the slower SQLAlchemy path")
        return False
    return True


SUPPORTED = _supported()


async def run(aio_connection: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(sqlite3_connection, *args)`` in the connection's worker thread: one hop (needs SUPPORTED)."""
    return await aio_connection._execute(_with_connection, aio_connection, fn, args)


def _with_connection(aio_connection: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(aio_connection._conn, *args)  # in the worker thread, where the connection lives


# ------------------------------------------------------------------------------------------ SQL


_INSERT_INSTANCE = (
    "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, task_id, "
    "created_at, updated_at, next_run_at, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)"
)
_GET_INSTANCE = (
    "SELECT id, workflow_type, business_id, status, workflow_context, task_id, created_at, updated_at, "
    "next_run_at, version FROM workflow_instance WHERE id = ?"
)
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


def _marks(count: int) -> str:
    return ", ".join("?" * count)


@cache
def _update_instance(statuses: int) -> str:
    sql = (
        "UPDATE workflow_instance SET status = coalesce(?, status), "
        "next_run_at = coalesce(?, next_run_at), updated_at = ?, version = version + 1 WHERE id = ?"
    )
    return f"{sql} AND status IN ({_marks(statuses)})" if statuses else sql


@cache
def _cancel_others(excluded: int) -> str:
    sql = (
        "UPDATE task_instance SET status = 'canceled', updated_at = ?, version = version + 1 "
        "WHERE workflow_instance_id = ? AND status NOT IN ('completed', 'failed', 'canceled')"
    )
    return f"{sql} AND id NOT IN ({_marks(excluded)})" if excluded else sql


@cache
def _due_select(types: int) -> str:
    typed = f" AND workflow_type IN ({_marks(types)})" if types else ""
    return (
        "SELECT id FROM workflow_instance WHERE status IN ('init', 'running') AND next_run_at <= ?"
        f"{typed} ORDER BY next_run_at, id LIMIT ?"
    )


@cache
def _claim_ids(ids: int) -> str:
    return (
        f"UPDATE workflow_instance SET next_run_at = ? WHERE id IN ({_marks(ids)}) "
        "AND status IN ('init', 'running') AND next_run_at <= ? RETURNING id"
    )


# ------------------------------------------------------------------ functions run in the thread


def _write(conn: sqlite3.Connection, body: Callable[..., Any], *args: Any) -> Any:
    """``body`` in ``BEGIN IMMEDIATE``; committed unless it returns ``None`` or raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn, *args)
        conn.execute("COMMIT" if result is not None else "ROLLBACK")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def create_instance(conn: sqlite3.Connection, row: InstanceRow, now: int) -> int:
    """Insert one instance (autocommit); its id."""
    cursor = conn.execute(
        _INSERT_INSTANCE,
        (row.workflow_type, row.business_id, row.status, row.context, row.task_id, now, now, row.next_run_at),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def get_instance(conn: sqlite3.Connection, instance_id: int) -> WorkflowInstanceRecord | None:
    """The instance, or ``None``."""
    row = conn.execute(_GET_INSTANCE, (instance_id,)).fetchone()
    return None if row is None else st.instance_record(row)


def load_tasks(conn: sqlite3.Connection, instance_id: int) -> list[TaskInstanceRecord]:
    """Every node row of one instance, ordered by id."""
    return [st.task_record(row) for row in conn.execute(_LOAD_TASKS, (instance_id,)).fetchall()]


def load_state(
    conn: sqlite3.Connection, instance_id: int
) -> tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]] | None:
    """The instance and its node rows (ordered by id), or ``None``; one read transaction (snapshot)."""
    conn.execute("BEGIN")
    try:
        instance = get_instance(conn, instance_id)
        return None if instance is None else (instance, load_tasks(conn, instance_id))
    finally:
        conn.execute("COMMIT")


def _step(conn: sqlite3.Connection, step: PreparedStep, now: int) -> list[int] | None:
    change = step.instance_change
    cursor = conn.execute(
        _update_instance(len(step.instance_status_in)),
        (change.status, change.next_run_at, now, step.instance_id, *step.instance_status_in),
    )
    if cursor.rowcount != 1:
        return None
    touched = []
    for task_id, version, fields in step.updates:
        changes = (fields.status, fields.context, fields.fail_count, fields.started_at, now)
        if conn.execute(_UPDATE_TASK, (*changes, task_id, step.instance_id, version)).rowcount != 1:
            return None
        touched.append(task_id)
    inserted = []
    for row in step.inserts:
        params = (step.instance_id, row.task_type, row.status, row.context, row.fail_count, now, now)
        try:
            cursor = conn.execute(_INSERT_TASK, (*params, row.started_at or now))
        except sqlite3.IntegrityError as error:
            if is_unique_violation(error):
                return None
            raise
        assert cursor.lastrowid is not None
        inserted.append(cursor.lastrowid)
    if step.cancel_other_tasks:
        touched.extend(inserted)
        conn.execute(_cancel_others(len(touched)), (now, step.instance_id, *touched))
    return inserted


def apply_step(
    conn: sqlite3.Connection, step: PreparedStep, now: int
) -> tuple[TaskInstanceRecord, ...] | None:
    """The step in one ``BEGIN IMMEDIATE`` transaction; ``None`` (rolled back) if a condition failed."""
    ids = _write(conn, _step, step, now)
    return None if ids is None else _inserted(step, ids, now)


def apply_steps(conn: sqlite3.Connection, steps: Sequence[tuple[PreparedStep, int]]) -> list[Any]:
    """Several steps in one ``BEGIN IMMEDIATE`` transaction, each in a SAVEPOINT, and one commit.

    Outcome per step: its inserted records, ``None`` (a condition failed: rolled back), or the
    exception it raised (rolled back alone). An error that ends the whole transaction is raised.
    """
    outcomes: list[Any] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for step, now in steps:
            outcome: Any
            conn.execute("SAVEPOINT asyncflow_step")
            try:
                ids = _step(conn, step, now)
            except sqlite3.Error as error:
                if not conn.in_transaction:  # SQLite rolled back the whole transaction itself
                    raise
                ids, outcome = None, error
            else:
                outcome = None if ids is None else _inserted(step, ids, now)
            if ids is None:
                conn.execute("ROLLBACK TO asyncflow_step")
            conn.execute("RELEASE asyncflow_step")
            outcomes.append(outcome)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def _inserted(step: PreparedStep, ids: Sequence[int], now: int) -> tuple[TaskInstanceRecord, ...]:
    return tuple(
        st.inserted_task_record(task_id, step.instance_id, row, now)
        for task_id, row in zip(ids, step.inserts, strict=True)
    )


def _claim(conn: sqlite3.Connection, now_ms: int, limit: int, lease: int, types: Sequence[str]) -> list[int]:
    ids = [row[0] for row in conn.execute(_due_select(len(types)), (now_ms, *types, limit))]
    if not ids:
        return ids
    claimed = {row[0] for row in conn.execute(_claim_ids(len(ids)), (lease, *ids, now_ms)).fetchall()}
    return [i for i in ids if i in claimed]


def claim_due(
    conn: sqlite3.Connection, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]
) -> list[int]:
    """Lease up to ``limit`` due instances (SELECT, then an UPDATE that re-checks, in one transaction)."""
    result: list[int] = _write(conn, _claim, now_ms, limit, now_ms + lease_ms, tuple(types))
    return result
