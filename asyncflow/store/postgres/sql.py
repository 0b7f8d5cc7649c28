"""Every PostgreSQL statement of the repo's per-instance calls, each written once.

Each function takes ``db``, anything with asyncpg's ``fetch``/``fetchrow``/``fetchval``: the asyncpg
connection of a lane (outside ``transaction()``: one autocommit statement, no SQLAlchemy
per-statement work) or :class:`TxConnection` (inside ``transaction()``: the same text through
SQLAlchemy's ``exec_driver_sql`` on the transaction's connection).

``apply_step`` is one call of the plpgsql function ``asyncflow_step_v1``
(:data:`asyncflow.store.postgres.functions.STEP_FUNCTION`, installed by ``migrate()``): the guarded
instance update, the compare-and-set node updates, the inserts and the optional cancel run inside one
statement, so they commit together without ``BEGIN``/``COMMIT`` round trips; a failed condition
raises SQLSTATE :data:`CONFLICT_SQLSTATE`, which rolls the statement back and becomes
``StepResult(applied=False)``. The step travels as one JSON argument (:func:`step_json`): cheaper to
send than a dozen arrays, and the shape :mod:`asyncflow.store.postgres.batches` concatenates to apply
several steps in one statement. Contexts travel as the canonical JSON text the repo produced
(``::text::jsonb`` in, ``::text`` out), so no codec of the engine is involved.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - a platform without orjson's wheel (see asyncflow.store._json)
    orjson = None  # type: ignore[assignment]

from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import BindParameter

from ...records import TaskInstanceRecord, WorkflowInstanceRecord
from ...status import RUNNABLE_INSTANCE_STATUSES
from .._json import TEXT_JSON, checked_name
from .._prepare import InstanceRow, PreparedStep, Refused
from .._records import inserted_task_records, instance_record, task_record
from .._sql import RUNNABLE_SQL, refused_by
from .._statements import TASK_VALUES, insert_child

__all__ = [
    "CLAIM_CALL",
    "CLAIM_STATEMENT",
    "CLAIM_STATEMENT_TYPED",
    "CONFLICT_SQLSTATE",
    "CREATE_CONTEXT_CHARS",
    "INSERT_CHILD",
    "INSERT_TASK",
    "STALE_SQLSTATE",
    "STEP_CALL",
    "UNDEFINED_FUNCTION_SQLSTATE",
    "TxConnection",
    "apply_step",
    "claim_due",
    "claim_due_states",
    "create_instances",
    "create_pages",
    "get_instance",
    "inserted_records",
    "load_states",
    "load_tasks",
    "step_json",
]

CONFLICT_SQLSTATE = "AF409"
"""Raised by the step function when a condition of the step fails (nothing is written)."""

STALE_SQLSTATE = "AF410"
"""Raised by the step function when the step's lease epoch is no longer the instance's (nothing written)."""

UNDEFINED_FUNCTION_SQLSTATE = "42883"
"""A function is missing: the database was not migrated (``repo.migrate()`` installs it)."""

STEP_CALL = "SELECT asyncflow_step_v1($1::text::jsonb)"

INSERT_CHILD = insert_child(postgresql.insert)
"""A child instance unless its (parent, node, key) has one (a Core statement: the repo runs it)."""

INSERT_TASK = text(
    "WITH instance AS (UPDATE workflow_instance SET updated_at = updated_at "
    "WHERE id = :workflow_instance_id RETURNING id) "
    f"INSERT INTO task_instance ({', '.join(TASK_VALUES)}) "
    "SELECT instance.id, :task_type, :status, :node_context, :fail_count, :created_at, :updated_at, "
    ":started_at, 1 FROM instance RETURNING id, task_type"
).bindparams(*(value for value in TASK_VALUES.values() if isinstance(value, BindParameter)))
"""``create_task_instance``'s node row (the parameters of ``_statements.task_params``), inserted only
if its instance exists, in the statement that writes the instance row (an ``UPDATE`` that changes no
value): there is no foreign key here (:data:`~asyncflow.store.tables.task_instance`). As a step does,
it takes the row's lock until the commit, so a concurrent delete waits for it or this insert finds no
instance; and a delete in a ``REPEATABLE READ`` or ``SERIALIZABLE`` transaction whose snapshot is
older than the insert fails with a serialization error instead of leaving the row behind (a lock
alone would not stop it)."""

_INSTANCE_COLUMNS = (
    "id, workflow_type, business_id, status, workflow_context::text, task_id, created_at, updated_at, "
    "next_run_at, version, lease_epoch, trace_context, parent_id, parent_node, child_key"
)
_TASK_COLUMNS = (
    "id, workflow_instance_id, task_type, status, node_context::text, fail_count, created_at, "
    "updated_at, started_at, version"
)
_GET_INSTANCE = f"SELECT {_INSTANCE_COLUMNS} FROM workflow_instance WHERE id = $1::bigint"
_LOAD_TASKS = f"SELECT {_TASK_COLUMNS} FROM task_instance WHERE workflow_instance_id = $1::bigint ORDER BY id"
_CREATE_ROWS = (
    "WITH r AS (SELECT nextval((SELECT pg_get_serial_sequence('workflow_instance', 'id')::regclass)) "
    "AS id, s.ord, "
    "s.e->>0 AS workflow_type, s.e->>1 AS business_id, s.e->>2 AS status, s.e->3 AS context, "
    "(s.e->>4)::bigint AS task_id, (s.e->>5)::bigint AS now, (s.e->>6)::bigint AS next_run_at, "
    "s.e->>7 AS trace_context, s.e->>8 AS unique_key, (s.e->>9)::bigint AS lease_epoch "
    "FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS s(e, ord)), "
    "ins AS (INSERT INTO workflow_instance (id, workflow_type, business_id, status, workflow_context, "
    "task_id, created_at, updated_at, next_run_at, version, trace_context, unique_key, lease_epoch) "
    "SELECT r.id, r.workflow_type, r.business_id, r.status, r.context, r.task_id, r.now, r.now, "
    "r.next_run_at, 1, r.trace_context, r.unique_key, r.lease_epoch FROM r"
)
"""The rows of a create batch: one JSON array (:func:`create_instances`) of ``[workflow_type,
business_id, status, context, task_id, now, next_run_at, trace_context, unique, lease_epoch]`` per row,
the context embedded as it is (JSON), expanded ``WITH ORDINALITY``; each row's id is drawn from the table's
sequence here (the sequence looked up once, not per row), so that the result pairs the ids with the
input rows by ``ord``, not by the order the sequence hands them out."""
_INSERT_INSTANCES = _CREATE_ROWS + ") SELECT r.id FROM r ORDER BY r.ord"
"""One or many instances in one statement (a single create is a batch of one), none of them unique:
their ids in input order."""
_INSERT_UNIQUE = (
    _CREATE_ROWS
    + " WHERE r.unique_key IS DISTINCT FROM 'always' OR NOT EXISTS (SELECT 1 FROM workflow_instance w "
    "WHERE w.workflow_type = r.workflow_type AND w.business_id = r.business_id "
    "AND w.unique_key IS NOT NULL) "
    "ORDER BY r.ord ON CONFLICT DO NOTHING RETURNING id) "
    "SELECT ins.id, CASE WHEN ins.id IS NULL THEN "
    f"({refused_by('r.workflow_type', 'r.business_id', 'r.unique_key')}) END "
    "FROM r LEFT JOIN ins ON ins.id = r.id ORDER BY r.ord"
)
"""Instances of which some are unique: each row's id, or NULL and the instance that refused it where a
unique index (or, for ``'always'``, an existing unique instance of the key) refused the row (NULL too
if it committed after this statement began: the repo then reads it). A refused row fails nothing
else: its neighbours in the statement are inserted (``ON CONFLICT DO NOTHING``); rows go in input
order, so of two rows of one key in a batch the first is inserted."""
_NO_INSTANCE = (
    "NULL::bigint, "
    + "NULL::text, " * 4
    + "NULL::bigint, " * 6
    + "NULL::text, NULL::bigint, "
    + "NULL::text, " * 2
)
_NO_TASK = "NULL::bigint, " * 2 + "NULL::text, " * 3 + "NULL::bigint, " * 4 + "NULL::bigint "
_TASKS_OF = (
    f"UNION ALL SELECT {_NO_INSTANCE}{_TASK_COLUMNS} FROM task_instance "
    "WHERE workflow_instance_id = ANY ($1::bigint[]) ORDER BY 16 NULLS FIRST"
)
_LOAD_STATES = (
    f"SELECT {_INSTANCE_COLUMNS}, {_NO_TASK}FROM workflow_instance WHERE id = ANY ($1::bigint[]) {_TASKS_OF}"
)
"""Instances (columns 0-14) and then their node rows by id (columns 15-24), for several ids at once."""
_LEASE_STATES = (
    "WITH leased AS (UPDATE workflow_instance SET lease_epoch = lease_epoch + 1 "
    f"WHERE id = ANY ($1::bigint[]) RETURNING {_INSTANCE_COLUMNS}) "
    f"SELECT *, {_NO_TASK}FROM leased {_TASKS_OF}"
)
""":data:`_LOAD_STATES` that also takes a new lease epoch of each instance (the passes' first read)."""
CLAIM_CALL = "SELECT asyncflow_claim_v1($1::bigint, $2::bigint, $3::bigint, $4::text[])"
"""The driver's claim: the plpgsql function :data:`~asyncflow.store.postgres.functions.CLAIM_FUNCTION`
(migration 13), ``NULL`` types for any type. Its statements are planned once per session: sent as a
statement of its own (:data:`CLAIM_STATEMENT`), the claim was planned again for every call
(PostgreSQL kept custom plans for it once the table had statistics), about 140 us of server CPU per
claim (a quarter of it in batches of 16)."""
CLAIM_STATES_CALL = "SELECT * FROM asyncflow_claim_states_v1($1::bigint, $2::bigint, $3::bigint, $4::text[])"
"""The claim that hands over new instances' rows (:data:`~.functions.CLAIM_STATES_FUNCTION`)."""

_CLAIM_STATEMENT = (
    "WITH picked AS MATERIALIZED (SELECT id, next_run_at AS due FROM workflow_instance "
    f"WHERE status IN ({RUNNABLE_SQL}) AND next_run_at <= $1::bigint{{typed}} "
    "ORDER BY next_run_at, id LIMIT $2::bigint FOR UPDATE SKIP LOCKED), "
    "moved AS (UPDATE workflow_instance SET next_run_at = $3::bigint "
    "WHERE id = ANY (ARRAY(SELECT id FROM picked)) RETURNING id) "
    "SELECT picked.id, picked.due FROM picked JOIN moved ON moved.id = picked.id"
)
CLAIM_STATEMENT = _CLAIM_STATEMENT.format(typed="")
CLAIM_STATEMENT_TYPED = _CLAIM_STATEMENT.format(
    typed=" AND array_position($4::text[], workflow_type) IS NOT NULL"
)
"""The claim as one statement, as schema version 12 sent it: what a claim runs on a database that has
no ``asyncflow_claim_v1`` yet (this version deployed before ``migrate()``). The same rows as the
function: the pick walks the claim index over due rows only; the update finds each picked row by its
primary key; the type filter is ``array_position(...) IS NOT NULL``, which the planner never estimates
as selective (``workflow_type = ANY(...)`` was, on a table without statistics, and its custom plans
sorted every due row)."""

_encode = json.JSONEncoder(ensure_ascii=False).encode


def _encode_text(value: str) -> str:
    """A checked ``str`` as a JSON string: an identifier's (a node name, a status) from
    :data:`~asyncflow.store._json.TEXT_JSON` (remembered there: nothing to escape), which skips the
    encoder, any other through it."""
    encoded = TEXT_JSON.get(value)
    if encoded is None:
        checked_name(value, "text")  # remembers an identifier (the value was checked: nothing raises)
        encoded = TEXT_JSON.get(value) or _encode(value)
    return encoded


_RUNNABLE_JSON = "[" + ",".join(_encode(status) for status in RUNNABLE_INSTANCE_STATUSES) + "]"
"""``Step.instance_status_in``'s default (every pass's steps), encoded once."""


class TxConnection:
    """asyncpg's ``fetch``/``fetchrow``/``fetchval`` on the SQLAlchemy connection of a transaction."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> Sequence[Any]:
        return (await self._conn.exec_driver_sql(sql, args)).all()

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return (await self._conn.exec_driver_sql(sql, args)).first()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]


def step_json(step: PreparedStep, now: int) -> str:
    """The JSON argument of :data:`STEP_CALL` (see the function's comment), built from checked values.

    Contexts are already canonical JSON text: they are embedded as they are, not encoded twice. Names
    and statuses come encoded from :data:`~asyncflow.store._json.TEXT_JSON` (``prepared_step`` put
    them there); one it no longer holds (cleared when full) is encoded again.
    (Comprehensions and conditional expressions, not helpers: every step of every pass runs it.)
    """
    texts = TEXT_JSON
    instance_id, status_in, change, updates, inserts, cancel, epoch = step
    if updates:
        updated = ",".join(
            [
                f"[{task_id},{version},"
                f"{'null' if status is None else texts.get(status) or _encode_text(status)},"
                f"{context or 'null'},{'null' if fail_count is None else fail_count},"
                f"{'null' if started_at is None else started_at}]"
                for task_id, version, (status, context, fail_count, started_at) in updates
            ]
        )
    else:
        updated = ""
    try:
        inserted = ",".join(
            [
                f"[{texts[task_type]},{texts[status]},{context},{fail_count},{started_at or now}]"
                for task_type, status, context, fail_count, started_at, _ in inserts
            ]
        )
    except KeyError:  # a name that is no identifier, or no longer remembered
        inserted = ",".join(
            [
                f"[{_encode_text(name)},{_encode_text(status)},{context},{fail_count},{started_at or now}]"
                for name, status, context, fail_count, started_at, _ in inserts
            ]
        )
    if status_in is RUNNABLE_INSTANCE_STATUSES:
        statuses = _RUNNABLE_JSON
    else:
        statuses = f"[{','.join([_encode_text(s) for s in status_in])}]"
    status, _, next_run_at = change
    return (
        f"[{instance_id},{statuses},"
        f"{'null' if status is None else texts.get(status) or _encode_text(status)},"
        f"{'null' if next_run_at is None else next_run_at},{now},"
        f"{'true' if cancel else 'false'},[{updated}],[{inserted}],"
        f"{'null' if epoch is None else epoch}]"
    )


def inserted_records(
    step: PreparedStep, ids: Sequence[int] | None, now: int
) -> tuple[TaskInstanceRecord, ...]:
    """The records of the rows a step inserted, from the ids the function returned (input order)."""
    inserts = step[4]  # PreparedStep: inserts
    if not inserts:
        return ()
    assert ids is not None and len(ids) == len(inserts), (ids, inserts)
    return inserted_task_records(step[0], ids, inserts, now)  # step[0]: instance_id


if orjson is not None:

    def _create_json(rows: Sequence[tuple[InstanceRow, int]]) -> str:
        """The JSON argument of :data:`_INSERT_INSTANCES` and :data:`_INSERT_UNIQUE`: a row's context is
        canonical JSON text already, embedded as it is (``orjson.Fragment``)."""
        fragment = orjson.Fragment
        return orjson.dumps(
            [
                [
                    row.workflow_type,
                    row.business_id,
                    row.status,
                    fragment(row.context),
                    row.task_id,
                    now,
                    row.next_run_at,
                    row.trace_context,
                    row.unique,
                    row.lease_epoch,
                ]
                for row, now in rows
            ]
        ).decode()

else:  # pragma: no cover - a platform without orjson's wheel

    def _create_json(rows: Sequence[tuple[InstanceRow, int]]) -> str:
        """:func:`_create_json` through :mod:`json` (the contexts embedded as they are)."""
        return (
            "["
            + ",".join(
                [
                    f"[{_encode(row.workflow_type)},{_encode(row.business_id)},{_encode(row.status)},"
                    f"{row.context},{row.task_id},{now},{row.next_run_at},{_encode(row.trace_context)},"
                    f"{_encode(row.unique)},{row.lease_epoch}]"
                    for row, now in rows
                ]
            )
            + "]"
        )


CREATE_CONTEXT_CHARS = 32 * 2**20
"""The contexts of one create statement at most, in characters of JSON text (128 MiB of UTF-8 at most):
PostgreSQL caps the elements of a jsonb array, the statement's one argument, at 256 MiB in all. A bulk
create's page goes in several statements of its transaction beyond it (:func:`create_pages`)."""


def create_pages(
    rows: Sequence[tuple[InstanceRow, int]], page_size: int
) -> list[Sequence[tuple[InstanceRow, int]]]:
    """``rows`` cut, in order, into pages of at most ``page_size`` rows whose contexts hold at most
    :data:`CREATE_CONTEXT_CHARS` characters together (a row whose context alone holds more is a page
    of its own: the server decides about it, as it did when each context was its own value)."""
    pages: list[Sequence[tuple[InstanceRow, int]]] = []
    start, size = 0, 0
    for at, (row, _) in enumerate(rows):
        length = len(row.context)
        if at > start and (at - start >= page_size or size + length > CREATE_CONTEXT_CHARS):
            pages.append(rows[start:at])
            start, size = at, 0
        size += length
    if start < len(rows):
        pages.append(rows[start:])
    return pages


async def create_instances(db: Any, rows: Sequence[tuple[InstanceRow, int]]) -> list[int | Refused]:
    """Insert instances (each with its own ``now``) in one statement; their ids, in order.

    :class:`Refused` for a unique row that was refused (a unique instance of its key exists). The rows
    travel as one JSON argument (:data:`_CREATE_ROWS`), not as eight column arrays: one value for the
    driver to encode, built by one comprehension.
    """
    batch = _create_json(rows)
    if any(row.unique is not None for row, _ in rows):
        found = await db.fetch(_INSERT_UNIQUE, batch)
        return [Refused(record[1]) if record[0] is None else record[0] for record in found]
    return [record[0] for record in await db.fetch(_INSERT_INSTANCES, batch)]  # in input order (ord)


async def load_states(
    db: Any, instance_ids: Sequence[int], lease: bool = False
) -> dict[int, tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]]]:
    """Instances and their node rows (ordered by id) in one statement; missing ids are left out.

    ``lease``: the same statement also takes a new lease epoch of each instance (``lease_epoch + 1``,
    returned on the records).
    """
    states: dict[int, tuple[WorkflowInstanceRecord, list[TaskInstanceRecord]]] = {}
    for row in await db.fetch(_LEASE_STATES if lease else _LOAD_STATES, list(instance_ids)):
        if row[0] is not None:
            states[row[0]] = (instance_record(row), [])
        else:
            task = task_record(row[15:])
            state = states.get(task.workflow_instance_id)
            if state is not None:  # else its instance row is gone (possible only without the FK)
                state[1].append(task)
    return states


async def get_instance(db: Any, instance_id: int) -> WorkflowInstanceRecord | None:
    """The instance, or ``None``."""
    row = await db.fetchrow(_GET_INSTANCE, instance_id)
    return None if row is None else instance_record(row)


async def load_tasks(db: Any, instance_id: int) -> list[TaskInstanceRecord]:
    """Every node row of one instance, ordered by id."""
    return [task_record(row) for row in await db.fetch(_LOAD_TASKS, instance_id)]


async def apply_step(db: Any, step: PreparedStep, now: int) -> tuple[TaskInstanceRecord, ...]:
    """One call of the step function (raises the conflict SQLSTATE when a condition fails)."""
    ids = await db.fetchval(STEP_CALL, step_json(step, now))
    return inserted_records(step, ids, now)


_CLAIM_ORDER = operator.itemgetter(15)
"""A row of :data:`CLAIM_STATES_CALL`'s place in claim order (``o_ord``)."""


async def claim_due_states(
    db: Any, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str]
) -> list[tuple[int, WorkflowInstanceRecord | None]]:
    """:func:`claim_due` through ``asyncflow_claim_states_v1``: each claimed id, in claim order, with its
    record (as leased) where the instance is as it was created (no node row, never leased or written)."""
    rows = await db.fetch(CLAIM_STATES_CALL, now_ms, limit, now_ms + lease_ms, list(types) if types else None)
    rows.sort(key=_CLAIM_ORDER)  # the update returns them in no set order
    return [(row[0], None if row[1] is None else instance_record(row)) for row in rows]


async def claim_due(
    db: Any, *, now_ms: int, limit: int, lease_ms: int, types: Sequence[str], function: bool = True
) -> list[int]:
    """Lease up to ``limit`` due instances in one statement; ids ordered by ``(next_run_at, id)``.

    ``function=False``: through :data:`CLAIM_STATEMENT` (a database without the claim function)."""
    until = now_ms + lease_ms
    if function:
        return list(await db.fetchval(CLAIM_CALL, now_ms, limit, until, list(types) if types else None))
    if types:
        rows = await db.fetch(CLAIM_STATEMENT_TYPED, now_ms, limit, until, list(types))
    else:
        rows = await db.fetch(CLAIM_STATEMENT, now_ms, limit, until)
    return [row[0] for row in sorted(rows, key=lambda row: (row[1], row[0]))]
