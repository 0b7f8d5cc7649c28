"""The driver's NOTIFY triggers on PostgreSQL (``asyncflow.store.postgres.notify``): which writes
notify, that an INSERT calls its function once per statement, and that an older install's single row
trigger is replaced."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asyncflow.errors import DuplicateWorkflowError
from asyncflow.records import NewWorkflowInstance
from asyncflow.store.postgres import definitions, notify
from asyncflow.store.postgres.notify import (
    CHANNEL,
    DDL_LOCK_TIMEOUT_MS,
    DDLLockTimeoutError,
    DueNotifier,
    install_notify_trigger,
)
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine
from tests.integration.stall_proxy import StallProxy

pytestmark = pytest.mark.postgres

_INSERT = (
    "INSERT INTO workflow_instance (workflow_type, business_id, status, created_at, updated_at, next_run_at) "
    "SELECT 't', 'b' || i, $1, 0, 0, $2 FROM generate_series(1, $3) AS i"
)
_CALLS = (
    "SELECT funcname, calls FROM pg_stat_xact_user_functions "
    "WHERE funcname IN ('asyncflow_notify_due', 'asyncflow_notify_due_inserted')"
)
# the trigger asyncflow installed before the INSERT one was split off (earlier 0.2 builds)
_OLD_TRIGGER = """
CREATE TRIGGER asyncflow_due_notify
AFTER INSERT OR UPDATE OF next_run_at ON workflow_instance
FOR EACH ROW
WHEN (NEW.status IN ('init', 'running')
      AND NEW.next_run_at <= extract(epoch FROM clock_timestamp()) * 1000)
EXECUTE FUNCTION asyncflow_notify_due()
"""


async def _install(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await install_notify_trigger(conn)


async def _triggers(raw: Any) -> dict[str, tuple[int, str]]:
    rows = await raw.fetch(
        "SELECT tgname, tgtype, pg_get_triggerdef(oid) FROM pg_trigger "
        "WHERE tgrelid = 'workflow_instance'::regclass AND tgname LIKE 'asyncflow_due%'"
    )
    return {row[0]: (row[1], row[2]) for row in rows}


async def _function_calls(raw: Any, statement: str, *args: Any) -> dict[str, int]:
    """Run ``statement`` in a transaction that counts PL/pgSQL calls; the calls of the triggers' two
    functions (rolled back: the rows are not kept)."""
    if not await raw.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("counting PL/pgSQL calls (track_functions) needs a superuser connection")
    tx = raw.transaction()
    await tx.start()
    try:
        await raw.execute("SET LOCAL track_functions = 'pl'")
        # counts not yet flushed to the statistics are shown too (earlier transactions'): a difference
        before = {row[0]: row[1] for row in await raw.fetch(_CALLS)}
        await raw.execute(statement, *args)
        after = {row[0]: row[1] for row in await raw.fetch(_CALLS)}
        return {name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name)}
    finally:
        await tx.rollback()


class _Heard:
    """The notifications of one schema on a LISTENing connection."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.count = 0

    def __call__(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload == self.schema:  # tests on other schemas notify on the same channel
            self.count += 1

    async def after(self, raw: Any, statement: str, *args: Any) -> int:
        """How many notifications ``statement`` (autocommitted on ``raw``) gave."""
        before = self.count
        await raw.execute(statement, *args)
        await raw.execute("SELECT 1")  # a round trip after the commit: its NOTIFY has been delivered
        await asyncio.sleep(0.05)
        return self.count - before


async def test_due_writes_notify_and_an_insert_calls_its_function_once(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await SQLAlchemyWorkflowRepo(engine).create_schema()
        await _install(engine)
        await _install(engine)  # idempotent
        async with engine.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            schema = await raw.fetchval("SELECT current_schema()")
            triggers = await _triggers(raw)
            assert sorted(triggers) == ["asyncflow_due_notify", "asyncflow_due_notify_insert"]
            assert "AFTER UPDATE OF next_run_at" in triggers["asyncflow_due_notify"][1]
            assert "FOR EACH ROW" in triggers["asyncflow_due_notify"][1]
            assert "AFTER INSERT" in triggers["asyncflow_due_notify_insert"][1]
            assert "FOR EACH STATEMENT" in triggers["asyncflow_due_notify_insert"][1]

            # one call of the INSERT trigger's function for 16 rows, none of the row trigger's
            calls = await _function_calls(raw, _INSERT, "init", 0, 16)
            assert calls == {"asyncflow_notify_due_inserted": 1}

            heard = _Heard(schema)
            await raw.add_listener(CHANNEL, heard)
            try:
                far = 2**62
                assert await heard.after(raw, _INSERT, "init", 0, 1) == 1  # a due create
                assert await heard.after(raw, _INSERT, "running", 0, 16) == 1  # 16 in one statement
                assert await heard.after(raw, _INSERT, "init", far, 3) == 0  # delayed creates
                assert await heard.after(raw, _INSERT, "completed", 0, 3) == 0  # not runnable
                later = await raw.fetchval(
                    "SELECT min(id) FROM workflow_instance WHERE next_run_at = $1", far
                )
                update = "UPDATE workflow_instance SET next_run_at = $2 WHERE id = $1"
                assert await heard.after(raw, update, later, far - 1) == 0  # still in the future
                assert await heard.after(raw, update, later, 0) == 1  # made due
                assert await heard.after(raw, "UPDATE workflow_instance SET workflow_context = '{}'") == 0
            finally:
                await raw.remove_listener(CHANNEL, heard)


async def test_an_older_install_s_row_trigger_on_inserts_is_replaced(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await SQLAlchemyWorkflowRepo(engine).create_schema()
        await _install(engine)
        async with engine.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            async with raw.transaction():  # the database as an older asyncflow left it
                await raw.execute("DROP TRIGGER asyncflow_due_notify ON workflow_instance")
                await raw.execute("DROP TRIGGER asyncflow_due_notify_insert ON workflow_instance")
                await raw.execute(_OLD_TRIGGER)
            assert sorted(await _triggers(raw)) == ["asyncflow_due_notify"]
            assert await _function_calls(raw, _INSERT, "init", 0, 4) == {"asyncflow_notify_due": 4}
        await _install(engine)
        await _assert_the_two_triggers(engine)
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert await _function_calls(raw, _INSERT, "init", 0, 4) == {"asyncflow_notify_due_inserted": 1}
            await raw.execute(_INSERT, "init", 2**62, 2)  # kept: delayed rows
            calls = await _function_calls(raw, "UPDATE workflow_instance SET next_run_at = 0")
            assert calls == {"asyncflow_notify_due": 2}  # made due: the row trigger, per row


async def _heard_from(heard: _Heard, write: Any, expected: int) -> None:
    """``write()`` (another connection's statement) gives ``expected`` notifications, and no more."""
    before = heard.count
    await write()
    deadline = time.monotonic() + 5
    while heard.count - before < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # one that should not come would have come by now
    assert heard.count - before == expected


async def test_every_kind_of_create_of_the_repo_notifies_when_due(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        await _install(engine)
        async with engine.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            heard = _Heard(await raw.fetchval("SELECT current_schema()"))
            await raw.add_listener(CHANNEL, heard)
            try:

                def new(business_id: str, **fields: Any) -> NewWorkflowInstance:
                    return NewWorkflowInstance(
                        workflow_type="w", business_id=business_id, workflow_context={}, **fields
                    )

                parent = await repo.create_workflow_instance(new("parent", next_run_at=2**62))
                await _heard_from(heard, lambda: repo.create_workflow_instance(new("one")), 1)
                await _heard_from(
                    heard, lambda: repo.create_workflow_instances([new(f"b{i}") for i in range(5)]), 1
                )
                await _heard_from(heard, lambda: repo.create_workflow_instance(new("u", unique="active")), 1)
                await _heard_from(
                    heard,
                    lambda: repo.create_workflow_instances([new(f"u{i}", unique="always") for i in range(3)]),
                    1,
                )

                async def refused() -> None:
                    with pytest.raises(DuplicateWorkflowError):
                        await repo.create_workflow_instance(new("u", unique="active"))

                await _heard_from(heard, refused, 0)
                await _heard_from(
                    heard, lambda: repo.create_workflow_instance(new("later", next_run_at=2**62)), 0
                )

                def child() -> Any:
                    return repo.create_child_instance(
                        new("c"), parent_id=parent.id, parent_node="n", child_key="k"
                    )

                await _heard_from(heard, child, 1)
                await _heard_from(heard, child, 0)  # the same key: nothing inserted
            finally:
                await raw.remove_listener(CHANNEL, heard)
        await repo.aclose()


async def _set_older_trigger(raw: Any) -> None:
    async with raw.transaction():
        await raw.execute("DROP TRIGGER IF EXISTS asyncflow_due_notify ON workflow_instance")
        await raw.execute("DROP TRIGGER IF EXISTS asyncflow_due_notify_insert ON workflow_instance")
        await raw.execute(_OLD_TRIGGER)


async def _assert_the_two_triggers(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        raw: Any = (await conn.get_raw_connection()).driver_connection
        triggers = await _triggers(raw)
    assert sorted(triggers) == ["asyncflow_due_notify", "asyncflow_due_notify_insert"]
    assert "AFTER UPDATE OF next_run_at" in triggers["asyncflow_due_notify"][1]


async def _timed_installs(engine: AsyncEngine, caplog: pytest.LogCaptureFixture, count: int) -> float:
    """Seconds ``count`` installs at once took (their warnings in ``caplog``)."""
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="asyncflow.driver"):
        await asyncio.gather(*(_install(engine) for _ in range(count)))
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def _older_install(postgres_url: str) -> AsyncIterator[tuple[AsyncEngine, Any, Any]]:
    """A schema with one instance and the older trigger; a connection to it, and a second one to hold
    the table with (:func:`_holding`)."""
    async with isolated_pg_engine(postgres_url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        await repo.create_workflow_instance(
            NewWorkflowInstance(workflow_type="w", business_id="b", workflow_context={})
        )
        await repo.aclose()
        await _install(engine)  # the functions exist, as an older asyncflow's install left them
        async with engine.connect() as conn, engine.connect() as blocker_conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            blocker: Any = (await blocker_conn.get_raw_connection()).driver_connection
            await _set_older_trigger(raw)
            yield engine, raw, blocker


@contextlib.asynccontextmanager
async def _holding(blocker: Any) -> AsyncIterator[None]:
    """A transaction that wrote to the table and stays open meanwhile (rolled back after)."""
    await blocker.execute("BEGIN")
    await blocker.execute("UPDATE workflow_instance SET updated_at = updated_at + 1")
    try:
        yield
    finally:
        await blocker.execute("ROLLBACK")


async def test_an_install_that_cannot_lock_the_table_keeps_the_older_trigger_and_waits_no_longer(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with _older_install(postgres_url) as (engine, raw, blocker):
        async with _holding(blocker):
            waited = await _timed_installs(engine, caplog, 1)
            assert DDL_LOCK_TIMEOUT_MS / 1000 <= waited < DDL_LOCK_TIMEOUT_MS / 1000 + 5
            assert "kept the asyncflow_due_notify trigger found in place" in caplog.text
            triggers = await _triggers(raw)
            assert sorted(triggers) == ["asyncflow_due_notify"]  # the older one, still notifying
            assert "AFTER INSERT OR UPDATE OF next_run_at" in triggers["asyncflow_due_notify"][1]
        # with no trigger at all the install fails (the driver logs it and polls)
        await raw.execute("DROP TRIGGER asyncflow_due_notify ON workflow_instance")
        async with _holding(blocker):
            with pytest.raises(DDLLockTimeoutError, match="were not installed"):
                await _install(engine)
        assert await _triggers(raw) == {}
        await _set_older_trigger(raw)
        await _install(engine)  # nothing holds the table now: replaced
        await _assert_the_two_triggers(engine)


async def test_the_install_leaves_the_caller_s_lock_timeout_as_it_was(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await SQLAlchemyWorkflowRepo(engine).create_schema()
        for caller, first in (("7s", True), ("0", False)):
            async with engine.begin() as conn:
                await conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{caller}'")
                await install_notify_trigger(conn)  # the first one creates the triggers
                assert (await conn.exec_driver_sql("SHOW lock_timeout")).scalar() == caller, first


async def test_postgresql_13_drops_the_older_trigger_and_creates_the_two(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await SQLAlchemyWorkflowRepo(engine).create_schema()
        await _install(engine)
        async with engine.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            await _set_older_trigger(raw)
        monkeypatch.setattr(engine.dialect, "server_version_info", (13, 9))  # no CREATE OR REPLACE TRIGGER
        await _install(engine)
        await _assert_the_two_triggers(engine)


async def test_installs_at_once_under_a_held_table_each_give_up_in_time(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with _older_install(postgres_url) as (engine, raw, blocker):
        async with _holding(blocker):
            waited = await _timed_installs(engine, caplog, 3)
        # each waits at most the timeout for its turn and the timeout for the table
        assert waited < 2 * DDL_LOCK_TIMEOUT_MS / 1000 + 1.5, waited  # one after another: 6 s
        assert caplog.text.count("kept the asyncflow_due_notify trigger found in place") == 3
        assert sorted(await _triggers(raw)) == ["asyncflow_due_notify"]  # the older one, kept


async def test_an_install_waits_only_for_installs_of_its_own_schema(postgres_url: str) -> None:
    """Another schema's install, stuck on its own table, does not hold this one up (an install's turn
    is taken per schema); an install of the same schema waits for its turn, then gives up."""
    async with (
        _older_install(postgres_url) as (other_engine, _, blocker),
        isolated_pg_engine(postgres_url) as engine,
    ):
        await SQLAlchemyWorkflowRepo(engine).create_schema()
        async with _holding(blocker):
            stuck = asyncio.create_task(_install(other_engine))  # holds its schema's turn for 2 s
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await _install(engine)  # a fresh schema: it would raise after the timeout if it waited
            assert time.monotonic() - started < DDL_LOCK_TIMEOUT_MS / 1000 - 0.5
            await stuck
        await _assert_the_two_triggers(engine)
        async with engine.connect() as other_conn:
            other: Any = (await other_conn.get_raw_connection()).driver_connection
            schema = await other.fetchval("SELECT current_schema()")
            await other.execute("BEGIN")  # this schema's turn, held: an install waits, then gives up
            await other.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", 0x61737964, schema)
            try:
                with pytest.raises(DDLLockTimeoutError):
                    async with engine.begin() as conn:
                        await conn.exec_driver_sql("DROP TRIGGER asyncflow_due_notify ON workflow_instance")
                        await conn.exec_driver_sql(
                            "DROP TRIGGER asyncflow_due_notify_insert ON workflow_instance"
                        )
                        await install_notify_trigger(conn)
            finally:
                await other.execute("ROLLBACK")
        await _assert_the_two_triggers(engine)  # the failed install's transaction dropped nothing


async def test_a_listen_cut_before_its_reply_never_goes_back_to_the_pool_listening(postgres_url: str) -> None:
    """The driver stops its LISTEN task by cancelling it. A cancellation that lands while LISTEN is on
    the wire (the server ran it, the reply is on its way) left asyncpg unaware of the channel, so the
    UNLISTEN before the connection goes back was skipped: the pooled session kept listening, for the
    next user of the connection."""
    async with StallProxy(postgres_url) as proxy:
        engine = create_async_engine(proxy.url, pool_size=1, max_overflow=0)
        try:
            notifier = DueNotifier(engine, lambda: None, install=False)
            proxy.hold_replies_after(b"LISTEN", later=1)  # its execution, not its parse
            running = asyncio.create_task(notifier.run())
            async with asyncio.timeout(10):
                await proxy.held.wait()
            await asyncio.sleep(0.2)  # the server runs it; its reply waits in the proxy
            running.cancel()
            await asyncio.sleep(0.1)  # the cancellation is in (a session discarded closes gracefully:
            proxy.resume()  # asyncpg's close waits up to 2 s for the held replies)
            await asyncio.wait([running])
            async with engine.connect() as conn:  # the pool's one connection (a new one if discarded)
                channels = (await conn.execute(text("SELECT count(*) FROM pg_listening_channels()"))).scalar()
            assert channels == 0
        finally:
            await engine.dispose()


_BODY = (
    "SELECT prosrc FROM pg_proc WHERE proname = $1 "
    "AND pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
)


async def test_a_driver_of_an_older_release_keeps_the_newer_release_s_triggers(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Rolling deploy: a driver of a newer release (definitions revision + 1, another body) installed
    its NOTIFY functions; a driver of this release starting afterwards keeps them (with a warning)
    instead of putting its own back, and the newer release's next start changes nothing either."""
    newer = notify._FUNCTION_SQL.replace("BEGIN\n", "BEGIN\n    -- a newer release\n", 1)
    newer_body = newer.split("$asyncflow$")[1]
    async with isolated_pg_engine(postgres_url) as engine:
        await SQLAlchemyWorkflowRepo(engine).create_schema()
        await _install(engine)  # this release
        with monkeypatch.context() as patched:  # the newer release's driver starts
            patched.setattr(definitions, "REVISION", definitions.REVISION + 1)
            patched.setattr(notify, "_FUNCTION_SQL", newer)
            await _install(engine)
        with caplog.at_level(logging.WARNING, logger="asyncflow.driver"):
            await _install(engine)  # this release's driver restarts
        async with engine.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            assert await raw.fetchval(_BODY, "asyncflow_notify_due") == newer_body
            assert sorted(await _triggers(raw)) == ["asyncflow_due_notify", "asyncflow_due_notify_insert"]
        assert "newer asyncflow" in caplog.text


@pytest.mark.parametrize("detached", [False, True], ids=["driver", "waiters"])
async def test_a_listen_connection_gone_silent_is_closed_and_listened_again(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, detached: bool
) -> None:
    """A LISTEN connection whose server stops answering (gone without closing it) stayed "listening"
    until TCP gave up (hours): the driver and the waiters missed every wake-up meanwhile. A periodic
    ping finds it; it is closed and a new LISTEN taken."""
    monkeypatch.setattr(notify, "_HEALTH_INTERVAL", 0.2)
    monkeypatch.setattr(notify, "_PING_TIMEOUT", 0.5)
    woken = asyncio.Event()
    async with StallProxy(postgres_url) as proxy:
        engine = create_async_engine(proxy.url, pool_size=2, max_overflow=0)
        notifier = DueNotifier(engine, woken.set, install=False)
        notifier.detached = detached
        running = asyncio.create_task(notifier.run())
        try:
            async with asyncio.timeout(10):
                while not notifier.listening:
                    await asyncio.sleep(0.02)
            first_pid = notifier.server_pid
            proxy.hold_replies_after(b"asyncflow_listen_ping")  # the server's replies stop
            async with asyncio.timeout(10):
                await proxy.held.wait()
                while notifier.listening:
                    await asyncio.sleep(0.02)
                while not notifier.listening:  # a new connection (the held one is closed)
                    await asyncio.sleep(0.02)
            assert notifier.server_pid != first_pid
            woken.clear()
            async with engine.connect() as conn:  # a notification reaches the new LISTEN
                await conn.execute(text(f"NOTIFY {CHANNEL}"))
                await conn.commit()
            async with asyncio.timeout(10):
                await woken.wait()
        finally:
            notifier.stop()
            proxy.resume()
            await asyncio.wait([running], timeout=10)
            running.cancel()
            await engine.dispose()
    assert any("did not answer a ping" in r.getMessage() for r in caplog.records)
