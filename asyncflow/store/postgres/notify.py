"""PostgreSQL wake-ups for drivers (``repo.listen_due()``): a trigger that NOTIFYs when an instance
becomes due, and a LISTEN.

``install_notify_trigger(conn)`` installs (idempotently) two triggers on ``workflow_instance`` that
call ``pg_notify('asyncflow_due', <schema>)`` when a write leaves an ``init``/``running`` row due now by
the database's clock: a row trigger after an UPDATE that sets ``next_run_at``, and a statement trigger
after an INSERT, which looks at the inserted rows (a transition table) once per statement, so that a
batch of creates calls its function once, not once per row. The driver's own claims and the passes'
"look again later" writes put ``next_run_at`` in the future, so they do not notify; creates, events
and restarts do. The payload is the table's schema, so drivers on other schemas of the same database
ignore it. A database where an older asyncflow installed one row trigger for both (``AFTER INSERT OR
UPDATE``) gets the two in its place at the next install.

PostgreSQL commits notifying transactions one at a time (each holds a database-wide lock through its
WAL flush), which would cap creates and events near one per fsync. So the trigger only notifies when
no other transaction is notifying for the same schema right now (``pg_try_advisory_xact_lock``);
the others skip it, since a wake-up is already on its way. A row committed just after the woken
drivers claimed may then wait for their next claim (at most a poll interval).

:class:`DueNotifier` keeps one dedicated connection LISTENing and calls back on each notification. If
the connection drops or LISTEN fails, the driver simply goes on polling, and LISTEN is retried later.
A connection that went silent (the server or the network gone without closing it: no notification,
no error, for as long as TCP keepalives take, two hours by default) is found by a ping every
:data:`_HEALTH_INTERVAL` seconds, closed when it does not answer within
:data:`_PING_TIMEOUT`, and opened again.
A driver's connection is one of the pool's; the waiters' (``FinishedNotifier``, ``detached``) is
opened by the pool and detached from it at once (see ``DueNotifier._listen``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ...errors import StoreError
from .._errors import sqlstate
from .._sql import RUNNABLE_SQL
from . import definitions

__all__ = ["CHANNEL", "DDL_LOCK_TIMEOUT_MS", "DDLLockTimeoutError", "DueNotifier", "install_notify_trigger"]

logger = logging.getLogger("asyncflow.driver")

CHANNEL = "asyncflow_due"
"""The NOTIFY channel (channels are per database; the payload names the schema)."""

_TRIGGER = "asyncflow_due_notify"  # the row trigger (UPDATE OF next_run_at)
_INSERT_TRIGGER = "asyncflow_due_notify_insert"  # the statement trigger (INSERT)
_TG_INSERT = 4  # pg_trigger.tgtype's INSERT bit (TRIGGER_TYPE_INSERT)
_LOCK_NOT_AVAILABLE = "55P03"

DDL_LOCK_TIMEOUT_MS = 2000
"""How long an install waits for each lock it needs (ms): its schema's turn, and the table lock that
creating a trigger takes."""


class DDLLockTimeoutError(StoreError):
    """The triggers could not be installed: the table stayed locked (see :func:`install_notify_trigger`)."""


_INSTALL_LOCK_KEY = 0x61737964  # "asyd": with the schema's hash, installs of one schema take turns
_NOTIFY_LOCK_CLASS = 0x6173796E  # "asyn": with the schema's hash, "a wake-up is on its way"
_RETRY_MIN = 1.0
_RETRY_MAX = 60.0
_HEALTH_INTERVAL = 10.0
"""Seconds between two looks at a quiet LISTEN connection: is it closed, does it still answer?"""
_PING_TIMEOUT = 10.0
"""Seconds a LISTEN connection has to answer :data:`_PING`; one that does not is closed and opened again."""
_PING = "SELECT 1 AS asyncflow_listen_ping"


def _due_now(row: str) -> str:
    """SQL: ``row`` (a row variable or a table's alias) is runnable and due by the database's clock."""
    return (
        f"{row}.status IN ({RUNNABLE_SQL})\n"
        f"      AND {row}.next_run_at <= extract(epoch FROM clock_timestamp()) * 1000"
    )


def _notify_function(name: str, condition: str) -> str:
    """A trigger function that NOTIFYs (once per transaction and schema at most, see the module) when
    ``condition`` holds."""
    return f"""
CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $asyncflow$
BEGIN
    IF {condition}pg_try_advisory_xact_lock({_NOTIFY_LOCK_CLASS}, hashtext(TG_TABLE_SCHEMA)) THEN
        PERFORM pg_notify('{CHANNEL}', TG_TABLE_SCHEMA);
    END IF;
    RETURN NULL;
END
$asyncflow$
"""


_FUNCTION_SQL = _notify_function("asyncflow_notify_due", "")  # the row trigger tests in its WHEN

_TRIGGER_SQL = f"""
CREATE TRIGGER {_TRIGGER}
AFTER UPDATE OF next_run_at ON workflow_instance
FOR EACH ROW
WHEN ({_due_now("NEW")})
EXECUTE FUNCTION asyncflow_notify_due()
"""

# the inserted rows are looked at once per statement: a create batch's 16 rows cost one call of the
# function instead of 16 (about 3 of the row trigger's 4 us of server CPU per created instance)
_INSERT_FUNCTION_SQL = _notify_function(
    "asyncflow_notify_due_inserted",
    f"EXISTS (SELECT FROM asyncflow_inserted AS i WHERE {_due_now('i')})\n       AND ",
)

_INSERT_TRIGGER_SQL = f"""
CREATE TRIGGER {_INSERT_TRIGGER}
AFTER INSERT ON workflow_instance
REFERENCING NEW TABLE AS asyncflow_inserted
FOR EACH STATEMENT
EXECUTE FUNCTION asyncflow_notify_due_inserted()
"""

_INSTALL_TURN = text("SELECT pg_advisory_xact_lock(:key, hashtext(current_schema()))")
_SET_LOCK_TIMEOUT = text("SELECT set_config('lock_timeout', :value, true)")

_TRIGGERS_SQL = text(
    "SELECT tgname, tgtype FROM pg_trigger WHERE tgrelid = 'workflow_instance'::regclass "
    f"AND tgname IN ('{_TRIGGER}', '{_INSERT_TRIGGER}')"
)


async def install_notify_trigger(conn: AsyncConnection) -> None:
    """Install the NOTIFY triggers on ``workflow_instance`` (PostgreSQL only; a no-op elsewhere).

    Idempotent and safe to run from several processes at once (installs of one schema take turns).
    The functions go through :func:`.definitions.install`: where a newer release's driver installed
    them, they and the triggers are kept as they are (a warning is logged), so a driver of the older
    release starting in a rolling deploy does not put its own back.
    Run it in a transaction, after the tables exist, on a connection whose ``search_path`` finds them.
    It works in a savepoint, and waits at most :data:`DDL_LOCK_TIMEOUT_MS` for each lock it needs: another
    install's turn, and the table lock that creating a trigger takes (a transaction that keeps writing
    to the table open must not stall every process behind the install). When a wait runs out, the
    savepoint is rolled back (the caller's transaction goes on) and the triggers found in place are
    kept if they notify creates (an older asyncflow's single row trigger, ``AFTER INSERT OR UPDATE``,
    notifies the same, one call per inserted row): a warning is logged, and a later install replaces
    it. With none in place, :class:`DDLLockTimeoutError` is raised. Other database errors raise
    ``StoreError``. The caller's ``lock_timeout`` is left as it was.
    """
    if conn.dialect.name != "postgresql":
        return
    version = conn.dialect.server_version_info
    in_place = version is not None and version >= (14,)  # CREATE OR REPLACE TRIGGER
    try:
        async with conn.begin_nested():  # a timeout undoes this install, not the caller's transaction
            caller_timeout = await conn.scalar(text("SELECT current_setting('lock_timeout')"))
            await conn.execute(_SET_LOCK_TIMEOUT, {"value": f"{DDL_LOCK_TIMEOUT_MS}ms"})
            # per schema: an install waiting for its own table does not hold up other schemas' installs
            await conn.execute(_INSTALL_TURN, {"key": _INSTALL_LOCK_KEY})
            newer = await definitions.install(conn, (_FUNCTION_SQL, _INSERT_FUNCTION_SQL))
            if newer:  # a newer release's driver installed them, and their triggers: all kept
                await conn.execute(_SET_LOCK_TIMEOUT, {"value": caller_timeout})
                logger.warning(
                    "kept the %s triggers as a newer asyncflow installed them (%s: definitions revision "
                    "above this asyncflow's %d); upgrade this process",
                    _TRIGGER,
                    ", ".join(newer),
                    definitions.REVISION,
                )
                return
            installed = await _installed(conn)
            row_trigger = installed.get(_TRIGGER)
            older = _older(row_trigger)
            if older and not in_place:
                await conn.exec_driver_sql(f"DROP TRIGGER {_TRIGGER} ON workflow_instance")
            if row_trigger is None or older:
                replace = older and in_place  # under the lock CREATE TRIGGER takes: readers go on
                await conn.exec_driver_sql(
                    _TRIGGER_SQL.replace("CREATE", "CREATE OR REPLACE", 1) if replace else _TRIGGER_SQL
                )
            if _INSERT_TRIGGER not in installed:
                await conn.exec_driver_sql(_INSERT_TRIGGER_SQL)
            # a SET LOCAL outlives its savepoint's release: the caller's transaction gets its own back
            await conn.execute(_SET_LOCK_TIMEOUT, {"value": caller_timeout})
    except DBAPIError as error:
        if sqlstate(error) != _LOCK_NOT_AVAILABLE:
            raise StoreError(f"installing the {_TRIGGER} triggers failed: {error}") from error
        installed = await _installed(conn)  # a catalog read: no lock to wait for
        row_trigger = installed.get(_TRIGGER)
        if row_trigger is None or not (_older(row_trigger) or _INSERT_TRIGGER in installed):
            raise DDLLockTimeoutError(
                f"the {_TRIGGER} triggers were not installed: a lock they need stayed taken for "
                f"{DDL_LOCK_TIMEOUT_MS} ms (a transaction holding workflow_instance, or another install)"
            ) from error
        logger.warning(
            "kept the %s trigger found in place (it notifies creates too): a lock the install needs "
            "stayed taken for %d ms (a transaction holding workflow_instance, or another install); a "
            "later driver start tries again",
            _TRIGGER,
            DDL_LOCK_TIMEOUT_MS,
        )


def _older(row_trigger: int | None) -> bool:
    """The row trigger (its ``tgtype``) is an older asyncflow's, on INSERT OR UPDATE."""
    return row_trigger is not None and bool(row_trigger & _TG_INSERT)


async def _installed(conn: AsyncConnection) -> dict[str, int]:
    """The NOTIFY triggers on the table: name -> ``pg_trigger.tgtype``."""
    return {row[0]: row[1] for row in await conn.execute(_TRIGGERS_SQL)}


class DueNotifier:
    """LISTENs on :data:`CHANNEL` on a dedicated connection and calls ``callback()`` per notification.

    ``run()`` runs until cancelled: it installs the triggers once, LISTENs, and when the connection is
    lost (or cannot be had) waits with back-off and tries again. ``listening`` tells whether a LISTEN
    is active right now. Subclasses listen on another ``channel`` and read payloads in ``_deliver``.
    """

    channel = CHANNEL
    detached = False
    """Whether the LISTEN connection is detached from the pool (see :meth:`_listen`)."""

    def __init__(self, engine: AsyncEngine, callback: Callable[[], None], *, install: bool = True) -> None:
        self._engine = engine
        self._callback = callback
        self._install = install
        self.listening = False
        self.server_pid: int | None = None  # the PostgreSQL backend of the LISTEN connection
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask ``run()`` to end: it UNLISTENs, returns its connection and returns (no cancellation,
        so a connection being opened right now is returned too)."""
        self._stop.set()

    async def run(self) -> None:
        delay = _RETRY_MIN
        while not self._stop.is_set():
            try:
                if self._install:
                    self._install = False  # one attempt per driver run: a failure is not fatal
                    await self._install_trigger()
                await self._listen()
                if self._stop.is_set():
                    return
                delay = _RETRY_MIN
                logger.warning("the LISTEN connection was lost; polling until it is back")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any database failure: poll, and try again later
                logger.warning("LISTEN %s failed (%s); polling, retrying in %.0f s", self.channel, exc, delay)
            finally:
                self.listening = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            delay = min(delay * 2, _RETRY_MAX)

    async def _install_trigger(self) -> None:
        try:
            async with self._engine.begin() as conn:
                await install_notify_trigger(conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning(
                "could not install the %s triggers (%s); where they were not installed before, drivers "
                "on other processes will be polled only",
                _TRIGGER,
                exc,
            )

    async def _listen(self) -> None:
        """LISTEN until the connection is lost or stopped (returns), or the task is cancelled.

        The connection is taken from the engine's pool. With :attr:`detached` it is detached from it
        at once: the pool no longer counts it (it opens another for its users), so a LISTEN held for
        as long as anyone listens never starves the pool, whatever its size (with ``pool_size=1,
        max_overflow=0`` it took the only connection), and it is closed, never returned, when this
        ends. Otherwise it goes back to the pool after an UNLISTEN.
        """
        async with self._engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection  # (a detached proxy no longer has it)
            if self.detached:
                raw.detach()  # from now on outside the pool; closing conn closes it for real
            lost = asyncio.Event()
            schema = await driver.fetchval("SELECT current_schema()")

            def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
                self._deliver(payload, schema)

            def on_close(_conn: Any) -> None:
                lost.set()

            driver.add_termination_listener(on_close)
            added = False
            try:
                await driver.add_listener(self.channel, on_notify)
                added = True
                self.server_pid = driver.get_server_pid()
                self.listening = True
                self._callback()  # whatever became due while nobody listened
                stopping = asyncio.ensure_future(self._stop.wait())
                lost_wait = asyncio.ensure_future(lost.wait())
                try:
                    while not lost.is_set() and not self._stop.is_set() and not driver.is_closed():
                        done, _ = await asyncio.wait(
                            {stopping, lost_wait},
                            timeout=_HEALTH_INTERVAL,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                        if not done and not await self._answers(driver):
                            break
                finally:
                    stopping.cancel()
                    lost_wait.cancel()
            finally:
                self.listening = False
                driver.remove_termination_listener(on_close)
                # a detached one is closed with conn, never returned (invalidate() would leave it open)
                if added and not self.detached:
                    await self._unlisten(conn, driver, on_notify)
                elif not self.detached:  # the LISTEN was cut or failed: it may have run without
                    await conn.invalidate()  # asyncpg knowing of it, so no UNLISTEN: never return it

    async def _answers(self, driver: Any) -> bool:
        """Whether the LISTEN connection answers a ping in time; one that does not (or fails) is closed
        at once (``terminate``: a graceful close would wait for the silent server)."""
        try:
            async with asyncio.timeout(_PING_TIMEOUT):
                await driver.fetchval(_PING)
        except Exception as exc:  # TimeoutError, or the connection failed
            logger.warning(
                "the LISTEN %s connection did not answer a ping within %.0f s (%r): closing it",
                self.channel,
                _PING_TIMEOUT,
                exc,
            )
            driver.terminate()
            return False
        except BaseException:  # cancelled mid-ping: the connection is mid-statement, never reused
            driver.terminate()
            raise
        return True

    def _deliver(self, payload: str, schema: str) -> None:
        if payload in ("", schema):  # other schemas of this database have drivers of their own
            self._callback()

    async def _unlisten(self, conn: AsyncConnection, driver: Any, on_notify: Any) -> None:
        """UNLISTEN before the connection goes back to the pool; a broken one is discarded instead."""
        if not driver.is_closed():
            try:
                async with asyncio.timeout(2.0):
                    await driver.remove_listener(self.channel, on_notify)
                return
            except asyncio.CancelledError:
                await conn.invalidate()
                raise
            except Exception as exc:
                logger.debug("UNLISTEN failed (%r); discarding the connection", exc)
        await conn.invalidate()
