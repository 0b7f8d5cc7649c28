"""``create_workflow(session=...)``: the caller's SQLAlchemy ``AsyncSession`` or ``AsyncConnection``,
checked to be in an open transaction on the repo's database (and, on PostgreSQL, to find the repo's
tables on its ``search_path``), as the connection to insert on; and :func:`call_after_commit`, what
runs once the caller's transaction has committed the insert."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, RootTransaction
from sqlalchemy.exc import PendingRollbackError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from ..errors import ParamInvalidError
from ._backend import database_key_for, place_sql_for
from ._errors import StoreErrors

__all__ = ["call_after_commit", "caller_connection"]

logger = logging.getLogger(__name__)

_COMMIT_POLL = 0.001
"""Seconds between looks at a caller connection's COMMIT in flight (see :class:`_ConnectionWatch`)."""


def _same_url_database(theirs: AsyncEngine, ours: AsyncEngine) -> bool:
    """Whether the two URLs name one database (by the backend's ``database_key``)."""
    a, b = theirs.url, ours.url
    if a.get_backend_name() != b.get_backend_name():
        return False
    key = database_key_for(a)
    return key is not None and key == database_key_for(b)


async def caller_connection(session: object, engine: AsyncEngine) -> AsyncConnection:
    """The connection of ``session``'s open transaction (``ParamInvalidError`` if it has none, or
    writes elsewhere than ``engine``: another database, another schema). Nothing is begun on the
    caller's behalf."""
    if isinstance(session, AsyncSession):
        if not session.in_transaction():
            raise ParamInvalidError("session has no open transaction: use `async with session.begin():`")
        try:
            conn = await session.connection()
        except PendingRollbackError as error:  # a flush failed: the transaction is over, not open
            raise ParamInvalidError(
                "session's transaction was rolled back by an earlier error (a failed flush): "
                "call session.rollback() and start again"
            ) from error
    elif isinstance(session, AsyncConnection):
        if not session.in_transaction():
            raise ParamInvalidError("session (an AsyncConnection) has no open transaction: begin() one first")
        conn = session
    else:
        raise ParamInvalidError(
            f"session must be an SQLAlchemy AsyncSession or AsyncConnection, got {type(session).__name__}"
        )
    theirs = conn.engine
    if theirs.sync_engine.pool is engine.sync_engine.pool:  # the repo's own connections (its engine,
        return conn  # or one made from it by execution_options()): its own settings, its own tables
    sql = place_sql_for(engine.url)
    if sql is not None and theirs.url.get_backend_name() == engine.url.get_backend_name():
        await _check_place(conn, engine, sql)
    elif not _same_url_database(theirs, engine):
        raise ParamInvalidError(
            f"session is on another database ({theirs.url.render_as_string()}) than the repo's "
            f"({engine.url.render_as_string()})"
        )
    return conn


async def _check_place(conn: AsyncConnection, engine: AsyncEngine, sql: str) -> None:
    """``ParamInvalidError`` unless ``conn`` writes where the repo does, as the server tells it (the
    backend's ``PLACE_SQL``: on PostgreSQL its database and server, and the schema in which the
    ``search_path`` finds ``workflow_instance``). One URL reaches every schema of its database, and
    the caller's engine may set another ``search_path``: the insert would then fail on a schema without
    the tables, or land in another install's. One server has many names: the URLs decide only where the
    server cannot tell (a role that may not read its identifier).

    The caller's side is read at the first create of each of its transactions (one statement on its
    connection) and kept with that transaction: the ``search_path`` may differ per transaction (a
    ``SET`` per request, a pool event), not within one unless the caller sets it between two creates.
    The repo's side is read once per engine, and again when it does not match (a ``migrate()``, a
    restart since)."""
    transaction = conn.sync_connection.get_transaction() if conn.sync_connection is not None else None
    theirs = _caller_places.get(transaction) if transaction is not None else None
    if theirs is None:
        with StoreErrors("create_workflow(session=)"):
            theirs = tuple((await conn.exec_driver_sql(sql)).one())
        if transaction is not None:
            _caller_places[transaction] = theirs
    same_urls = _same_url_database(conn.engine, engine)
    ours = _repo_places.get(engine.sync_engine)
    if ours is not None and _mismatch(theirs, ours, same_urls) is None:
        return
    with StoreErrors("create_workflow(session=)"):
        async with engine.connect() as own:
            ours = tuple((await own.exec_driver_sql(sql)).one())
    _repo_places[engine.sync_engine] = ours
    mismatch = _mismatch(theirs, ours, same_urls)
    if mismatch == "database":
        raise ParamInvalidError(
            f"session is on another database ({conn.engine.url.render_as_string()}: database "
            f"{theirs[2]!r} of the server started at {theirs[3]}) than the repo's "
            f"({engine.url.render_as_string()}: database {ours[2]!r} of the server started at {ours[3]})"
        )
    if mismatch == "schema":
        raise ParamInvalidError(_schema_mismatch(theirs, ours))


def _mismatch(theirs: tuple[Any, ...], ours: tuple[Any, ...], same_urls: bool) -> str | None:
    """``None`` when both places are one: one database of one running server (same start time, and
    same system identifier, or same URL where either is unknown), and ``workflow_instance`` found in
    one schema (or, the repo's not migrated yet, in neither, both in one current schema). Else
    ``"database"`` or ``"schema"``."""
    both_known = theirs[4] is not None and ours[4] is not None
    if theirs[2:4] != ours[2:4] or (theirs[4] != ours[4] if both_known else not same_urls):
        return "database"
    if theirs[0] != ours[0] or (ours[0] is None and theirs[1] != ours[1]):
        return "schema"
    return None


def _schema_mismatch(theirs: tuple[Any, ...], ours: tuple[Any, ...]) -> str:
    repo_schema = ours[0] or ours[1]
    if theirs[0] is None:
        found = f"finds no workflow_instance table (its current schema is {theirs[1]!r})"
    else:
        found = f"finds workflow_instance in schema {theirs[0]!r} (another asyncflow install's tables)"
    return (
        f"session's search_path {found}, but the repo's tables are in schema {repo_schema!r}: "
        "use a session whose search_path is the repo's (or the repo's engine)"
    )


_caller_places: weakref.WeakKeyDictionary[RootTransaction, tuple[Any, ...]] = weakref.WeakKeyDictionary()
"""Where each caller transaction writes, read at its first create (:func:`_check_place`)."""

_repo_places: weakref.WeakKeyDictionary[Engine, tuple[Any, ...]] = weakref.WeakKeyDictionary()
"""Where each repo engine writes, read at the first create in a caller's session."""


def call_after_commit(session: object, callback: Callable[[], None]) -> None:
    """Call ``callback()`` on the running loop once ``session``'s transaction has committed what was
    just written in it; never if that is undone first (a rollback of the transaction, or of a
    savepoint it was written in) or the session is closed without a commit.

    SQLAlchemy's events are synchronous and run inside the caller's ``commit()``: they only take
    note, and hand ``callback`` to the loop (``call_soon_threadsafe``). The listeners are added once
    per session or connection and hold nothing once its transaction has ended.

    An ``AsyncSession`` tells after its COMMIT succeeded (its ``after_commit`` event). A Core
    connection has no such event (only one just before the COMMIT is sent): its callbacks run once
    the COMMIT has returned (looked at every millisecond meanwhile), unless the failed transaction
    is still the connection's then (a COMMIT the database refused and the caller had not yet rolled
    back); one the caller has already rolled back or closed cannot be told from a success.
    """
    loop = asyncio.get_running_loop()
    if isinstance(session, AsyncSession):
        sync_session = session.sync_session
        watch = sync_session.info.get(_SessionWatch.KEY)
        if not isinstance(watch, _SessionWatch):
            watch = sync_session.info[_SessionWatch.KEY] = _SessionWatch()
            event.listen(sync_session, "after_commit", watch.committed)
            event.listen(sync_session, "after_soft_rollback", watch.rolled_back)
            event.listen(sync_session, "after_transaction_end", watch.ended)
        innermost = sync_session.get_nested_transaction() or sync_session.get_transaction()
        chain: list[SessionTransaction] = []
        while innermost is not None:
            chain.append(innermost)
            innermost = innermost.parent
        watch.waiting.append((tuple(chain), loop, callback))
        return
    conn = session.sync_connection if isinstance(session, AsyncConnection) else None
    if conn is None:  # not a session :func:`caller_connection` accepted: nothing was written in it
        return
    conn_watch = _connection_watches.get(conn)
    if conn_watch is None:
        conn_watch = _connection_watches[conn] = _ConnectionWatch()
        event.listen(conn, "savepoint", conn_watch.savepoint)
        event.listen(conn, "release_savepoint", conn_watch.released)
        event.listen(conn, "rollback_savepoint", conn_watch.rolled_back_to)
        event.listen(conn, "rollback", conn_watch.rolled_back)
        event.listen(conn, "commit", conn_watch.committing)
    conn_watch.waiting.append([0, loop, callback])


def _hand_over(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed: nobody is left to tell
        logger.debug("after-commit callback %r dropped: its event loop is closed", callback)


class _SessionWatch:
    """The callbacks waiting for a session's commit, each with the transactions it was written in
    (the innermost first, the root last)."""

    KEY = "asyncflow_after_commit"
    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting: list[
            tuple[tuple[SessionTransaction, ...], asyncio.AbstractEventLoop, Callable[[], None]]
        ] = []

    def committed(self, session: Session) -> None:
        """``after_commit``: of a savepoint (the transaction outside it decides), or of the root."""
        if not self.waiting or session.in_nested_transaction():
            return
        root = session.get_transaction()
        waiting, self.waiting = self.waiting, []
        for entry in waiting:
            if entry[0][-1] is root:
                _hand_over(entry[1], entry[2])
            else:  # of a transaction that ended before: dropped there already (kept for safety)
                self.waiting.append(entry)

    def rolled_back(self, session: Session, previous: SessionTransaction) -> None:
        """``after_soft_rollback``: what was written in ``previous`` (or inside it) is undone."""
        if self.waiting:
            self.waiting = [entry for entry in self.waiting if previous not in entry[0]]

    def ended(self, session: Session, transaction: SessionTransaction) -> None:
        """``after_transaction_end``: the root ended without a commit telling its callbacks (a
        close): they are dropped."""
        if self.waiting and transaction.parent is None:
            self.waiting = [entry for entry in self.waiting if entry[0][-1] is not transaction]


class _ConnectionWatch:
    """The callbacks waiting for a Core connection's commit, each as ``[savepoints begun since,
    loop, callback]``: a savepoint rolled back while none begun since is open was open at the write."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting: list[list[Any]] = []

    def savepoint(self, conn: Connection, name: str | None) -> None:
        for entry in self.waiting:
            entry[0] += 1

    def released(self, conn: Connection, name: str, context: object) -> None:
        for entry in self.waiting:
            if entry[0]:
                entry[0] -= 1
            # else: a savepoint open at the write is released: the write now belongs to the outer one

    def rolled_back_to(self, conn: Connection, name: str, context: object) -> None:
        if self.waiting:
            kept = [entry for entry in self.waiting if entry[0]]
            for entry in kept:
                entry[0] -= 1
            self.waiting = kept

    def rolled_back(self, conn: Connection) -> None:
        self.waiting = []

    def committing(self, conn: Connection) -> None:
        """``commit``: sent just before the root's COMMIT; its outcome is looked at once it returned."""
        if not self.waiting:
            return
        waiting, self.waiting = self.waiting, []
        transaction = conn.get_transaction()
        for loop in {entry[1] for entry in waiting}:
            calls = [entry[2] for entry in waiting if entry[1] is loop]
            _hand_over(loop, partial(_after_commit_returned, loop, conn, transaction, calls))


def _after_commit_returned(
    loop: asyncio.AbstractEventLoop,
    conn: Connection,
    transaction: RootTransaction | None,
    calls: list[Callable[[], None]],
) -> None:
    if transaction is not None and transaction.is_active:  # the COMMIT is still in flight
        loop.call_later(_COMMIT_POLL, _after_commit_returned, loop, conn, transaction, calls)
        return
    if conn.get_transaction() is transaction:  # it failed, and waits for the caller's rollback
        return
    for call in calls:
        call()


_connection_watches: weakref.WeakKeyDictionary[Connection, _ConnectionWatch] = weakref.WeakKeyDictionary()
"""A connection's watch, added with its listeners the first time it is asked (its ``info`` is the
pooled DBAPI connection's, which outlives it). A watch holds no reference to its connection."""
