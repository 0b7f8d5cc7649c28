"""The SQL schema: ``workflow_instance``, ``task_instance`` and ``asyncflow_schema``.

This is the schema of :data:`SCHEMA_VERSION`; ``repo.migrate()`` builds or upgrades a database to it
through the numbered migrations of each backend (:mod:`asyncflow.store.migrations`). ``metadata``
(``af.metadata``) is public for applications that reflect on it or reference these tables; leave
creating and altering them to ``migrate()`` (docs/storage.md shows how beside Alembic). The columns
are Go's plus what the engine and the driver need:

* ``workflow_instance.next_run_at`` (unix **milliseconds**): when the driver should next look at the
  instance; ``INDEX(status, next_run_at)`` serves the due scan.
* ``version`` on both tables: bumped by every write, named by compare-and-set updates.
* ``task_instance.started_at`` (unix seconds): the node's timeout clock.
* ``workflow_instance.lease_epoch``: the fence of the passes. Each pass takes a new epoch with its
  first read, and every write of the pass requires it, so an older pass can write nothing more. An
  instance is created at 0, or at 1 when its creator runs its first pass (``create_workflow(run=True)``);
  a driver's claim that hands an instance at 0 to its pass (``claim_due_states``) takes 1 for it.
* ``asyncflow_lock``: the leases of :class:`~asyncflow.lock.database.DatabaseWorkflowLock`
  (``expires_at`` in unix milliseconds: the database's clock on PostgreSQL).
* ``workflow_instance.trace_context`` (schema 7, nullable): what an observer stored at creation (the
  W3C ``traceparent`` of the OpenTelemetry observer).
* ``workflow_instance.parent_id``, ``parent_node``, ``child_key`` (schema 8, nullable): a child
  workflow's parent instance, the parent's node that started it and its key there
  (``af.start_child_workflow``); ``uq_workflow_instance_child`` makes the triple unique, so a child
  is created once however often its parent's node runs.
* ``workflow_instance.unique_key`` (schema 4): ``NULL``, or how the instance was created with
  ``create_workflow(unique=...)`` (``'active'``/``'always'``); two partial unique indexes enforce it.
* On PostgreSQL both tables have ``fillfactor`` :data:`FILLFACTOR` (schema 9): pages keep room for
  the new versions of their rows, so updates that change no indexed column are HOT updates.
* ``workflow_instance.notify_finished`` (schema 10): a ``wait_for_workflow`` waiter asked to hear
  when the instance ends. On PostgreSQL only such instances NOTIFY ``asyncflow_finished`` when they
  end (a NOTIFY holds a database-wide lock through its commit); SQLite keeps the column unused.

``created_at``/``updated_at`` are unix seconds, as in Go. Contexts are ``JSON`` (``JSONB`` on
PostgreSQL). Primary keys are ``BIGINT`` (``INTEGER PRIMARY KEY AUTOINCREMENT`` on SQLite, a rowid
alias whose values are never reused).
"""

from __future__ import annotations

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Boolean,
    Column,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from ._sql import RUNNABLE_SQL

__all__ = [
    "FILLFACTOR",
    "JSON_TYPE",
    "SCHEMA_VERSION",
    "asyncflow_lock",
    "asyncflow_schema",
    "child_index",
    "due_index",
    "metadata",
    "schedule",
    "schedule_tick",
    "task_instance",
    "unique_active_index",
    "unique_always_index",
    "workflow_instance",
]

SCHEMA_VERSION = 14
"""The schema version this asyncflow migrates to (:mod:`asyncflow.store.migrations`)."""

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_ID = BigInteger().with_variant(Integer(), "sqlite")
JSON_TYPE = JSON().with_variant(JSONB(), "postgresql")
"""The type of the JSON columns: ``JSONB`` on PostgreSQL, ``JSON`` elsewhere."""
_EMPTY_OBJECT = text("'{}'")

workflow_instance = Table(
    "workflow_instance",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("workflow_type", Text, nullable=False),
    Column("business_id", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("workflow_context", JSON_TYPE, nullable=False, server_default=_EMPTY_OBJECT),
    Column("task_id", BigInteger, nullable=False, server_default=text("0")),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("next_run_at", BigInteger, nullable=False, server_default=text("0")),
    Column("version", BigInteger, nullable=False, server_default=text("1")),
    Column("lease_epoch", BigInteger, nullable=False, server_default=text("0")),
    Column("unique_key", Text, nullable=True),
    Column("trace_context", Text, nullable=True),  # W3C traceparent of the creating request, or NULL
    Column("parent_id", BigInteger, nullable=True),  # a child workflow's parent instance, else NULL
    Column("parent_node", Text, nullable=True),  # the parent's node that started the child
    Column("child_key", Text, nullable=True),  # the child's key in that node
    # a waiter asked to hear when it ends (PostgreSQL's asyncflow_finished NOTIFY: migration 10)
    Column("notify_finished", Boolean, nullable=False, server_default=text("false")),
    Index(None, "status", "next_run_at"),
    Index(None, "business_id"),
    Index(None, "task_id"),
    sqlite_autoincrement=True,
)

_RUNNABLE = text(f"status IN ({RUNNABLE_SQL})")
due_index = Index(
    "ix_workflow_instance_due",
    workflow_instance.c.next_run_at,
    workflow_instance.c.id,
    postgresql_where=_RUNNABLE,
    sqlite_where=_RUNNABLE,
)
"""The driver's claim order over runnable instances only: a claim reads its few rows, not every
runnable one (a backlog of 100,000 sorted per claim halved a driver's throughput). Migration 2 adds
it to a database made before it existed."""

_UNIQUE_ACTIVE = text(f"unique_key IS NOT NULL AND status IN ({RUNNABLE_SQL})")
_UNIQUE_ALWAYS = text("unique_key = 'always'")
unique_active_index = Index(
    "uq_workflow_instance_active",
    workflow_instance.c.workflow_type,
    workflow_instance.c.business_id,
    unique=True,
    postgresql_where=_UNIQUE_ACTIVE,
    sqlite_where=_UNIQUE_ACTIVE,
)
"""At most one ``init``/``running`` instance per (type, business id) among those created with
``unique=`` ("active" or "always"); migration 3."""
unique_always_index = Index(
    "uq_workflow_instance_always",
    workflow_instance.c.workflow_type,
    workflow_instance.c.business_id,
    unique=True,
    postgresql_where=_UNIQUE_ALWAYS,
    sqlite_where=_UNIQUE_ALWAYS,
)
"""At most one instance ever per (type, business id) among those created with ``unique="always"``."""

_CHILD = text("parent_id IS NOT NULL")
child_index = Index(
    "uq_workflow_instance_child",
    workflow_instance.c.parent_id,
    workflow_instance.c.parent_node,
    workflow_instance.c.child_key,
    unique=True,
    postgresql_where=_CHILD,
    sqlite_where=_CHILD,
)
"""One child per (parent instance, parent node, key): ``af.start_child_workflow`` inserts with ``ON
CONFLICT DO NOTHING`` on it, so retries, crashes and concurrent starts leave one child; it also
serves "the children of an instance" (its leading column). Migration 8."""

task_instance = Table(
    "task_instance",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("workflow_instance_id", BigInteger, nullable=False),
    Column("task_type", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("node_context", JSON_TYPE, nullable=False, server_default=_EMPTY_OBJECT),
    Column("fail_count", BigInteger, nullable=False, server_default=text("0")),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("started_at", BigInteger, nullable=False, server_default=text("0")),
    Column("version", BigInteger, nullable=False, server_default=text("1")),
    # also serves "every row of an instance" (its leading column), so no separate index is needed
    UniqueConstraint("workflow_instance_id", "task_type"),
    ForeignKeyConstraint(["workflow_instance_id"], ["workflow_instance.id"], ondelete="CASCADE").ddl_if(
        dialect="sqlite"
    ),
    sqlite_autoincrement=True,
)
"""On SQLite a foreign key ties each node row to its instance (``ON DELETE CASCADE``). PostgreSQL has
none since migration 11: its check ran one query and took one row lock per inserted node row, a tenth
of the server's CPU per workflow, to prove what asyncflow's writes prove already. A step inserts node
rows only after its ``UPDATE`` of the instance row found the row and locked it; ``create_task_instance``
inserts in the statement that writes the instance row (nothing else inserts node rows). The cascade
is the statement trigger ``asyncflow_delete_tasks``: deleting instances (``purge_workflow_instances``
or plain SQL) deletes their node rows in the same statement. This constraint stays in the metadata
(SQLAlchemy creates it on SQLite only): docs/storage.md, version 11."""

FILLFACTOR = 80
"""PostgreSQL ``fillfactor`` of ``workflow_instance`` and ``task_instance`` (migration 9): inserts
fill a page to 80%, so the updates of a running instance find room for the row's new version on its
own page. An update that changes no indexed column (and no column of a partial index's predicate)
and whose new version fits on the page is a HOT update: it writes no index entry, and pruning frees
its dead version without a vacuum. The leased read (``lease_epoch``), a step that changes neither
``status`` nor ``next_run_at``, and every update of a node row are such updates; the claim
(``next_run_at``) and steps that change the status are not. SQLite has no such parameter.
Why 80: a fifth of an 8 kB page holds about a dozen new versions of these rows (about 140 bytes),
enough for the few passes on a page between two prunings, for 25% more heap (indexes unchanged).

SQLAlchemy 2.0 has no ``postgresql_with`` for tables (2.1 has), so ``metadata.create_all`` sets it
with an ``ALTER TABLE`` right after creating each table (an ``after_create`` event, PostgreSQL
only): tables made from ``metadata`` match a migrated database."""


_SET_FILLFACTOR = DDL(  # type: ignore[no-untyped-call]
    f"ALTER TABLE %(fullname)s SET (fillfactor = {FILLFACTOR})"
).execute_if(dialect="postgresql")
event.listen(workflow_instance, "after_create", _SET_FILLFACTOR)
event.listen(task_instance, "after_create", _SET_FILLFACTOR)

asyncflow_schema = Table(
    "asyncflow_schema",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", BigInteger, nullable=False),
)

asyncflow_lock = Table(
    "asyncflow_lock",
    metadata,
    Column("key", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
)
"""The leases of ``DatabaseWorkflowLock``: a row per held key (its holder's token); an expired row
is taken over by the next acquirer. Migration 3 adds it."""

schedule = Table(
    "asyncflow_schedule",
    metadata,
    Column("id", Text, primary_key=True),
    Column("first_seen_at", BigInteger, nullable=False),
    Column("last_tick", Text, nullable=True),
    Column("fingerprint", Text, nullable=True),  # Schedule.fingerprint() of the state; NULL before 14
)
"""Schedules (``af.Schedule``) drivers have seen: since when (unix ms), the latest tick fired
(``YYYY-MM-DDTHH:MM:SSZ``), and the definition they are of (``Schedule.fingerprint()``): a schedule
stored with another definition starts over. Migration 6; the fingerprint, migration 14."""

schedule_tick = Table(
    "asyncflow_schedule_tick",
    metadata,
    Column("schedule_id", Text, primary_key=True),
    Column("tick", Text, primary_key=True),
    Column("instance_id", BigInteger, nullable=True),
    Column("fired_at", BigInteger, nullable=False),
)
"""One row per fired tick: its primary key lets exactly one driver fire a tick (the row is inserted
in the transaction that creates the tick's instance). Rows older than a week before the latest
fired tick are pruned."""
