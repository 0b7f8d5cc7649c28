"""The driver's NOTIFY triggers on PostgreSQL (``asyncflow.store.postgres.notify``): which writes
notify, that an INSERT calls its function once per statement, and that an older install's single row
trigger is replaced."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from asyncflow.store.postgres.notify import CHANNEL, install_notify_trigger
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine

pytestmark = pytest.mark.postgres

_INSERT = (
    "INSERT INTO workflow_instance (workflow_type, business_id, status, created_at, updated_at, next_run_at) "
    "SELECT 't', 'b' || i, $1, 0, 0, $2 FROM generate_series(1, $3) AS i"
)
_CALLS = (
    "SELECT funcname, calls FROM pg_stat_xact_user_functions "
    "WHERE funcname IN ('asyncflow_notify_due', 'asyncflow_notify_due_inserted')"
)
# the trigger asyncflow installed before the INSERT one was split off (0.2's first releases)
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
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            triggers = await _triggers(raw)
            assert sorted(triggers) == ["asyncflow_due_notify", "asyncflow_due_notify_insert"]
            assert "AFTER UPDATE OF next_run_at" in triggers["asyncflow_due_notify"][1]
            assert await _function_calls(raw, _INSERT, "init", 0, 4) == {"asyncflow_notify_due_inserted": 1}
            await raw.execute(_INSERT, "init", 2**62, 2)  # kept: delayed rows
            calls = await _function_calls(raw, "UPDATE workflow_instance SET next_run_at = 0")
            assert calls == {"asyncflow_notify_due": 2}  # made due: the row trigger, per row
