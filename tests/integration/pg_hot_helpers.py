"""Helpers of the PostgreSQL hot-path tests (test_repo_hot_path_postgres.py, test_repo_batch_postgres.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from asyncflow.records import NewWorkflowInstance, Step, TaskInsert, TaskInstanceRecord, TaskUpdate
from asyncflow.store.postgres import sql as pg_sql
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo


def new(business_id: str = "b") -> NewWorkflowInstance:
    return NewWorkflowInstance(workflow_type="wf", business_id=business_id, workflow_context={})


def task(task_type: str, status: str = "running") -> TaskInsert:
    return TaskInsert(task_type=task_type, status=status, node_context={"n": task_type})


async def instance_with(
    repo: SQLAlchemyWorkflowRepo, *types: str
) -> tuple[int, dict[str, TaskInstanceRecord]]:
    made = await repo.create_workflow_instance(new())
    return made.id, {t: await repo.create_task_instance(made.id, task(t)) for t in types}


def partly_applicable_step(instance_id: int, rows: dict[str, TaskInstanceRecord]) -> Step:
    """The instance update and the first node update would apply; the second node's version is stale."""
    return Step(
        instance_id=instance_id,
        instance_status="running",
        next_run_at=99,
        updates=(
            TaskUpdate(id=rows["a"].id, expected_version=1, status="completed"),
            TaskUpdate(id=rows["b"].id, expected_version=7, status="completed"),
        ),
        inserts=(task("c"),),
        cancel_other_tasks=True,
    )


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """The statements SQLAlchemy runs on ``engine`` meanwhile."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def function_exists(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        found = await conn.execute(text("SELECT to_regprocedure('asyncflow_step_v1(jsonb)')"))
        return found.scalar() is not None


async def add_trigger(engine: AsyncEngine, table: str, name: str, body: str) -> None:
    """A ``BEFORE INSERT`` row trigger ``name`` on ``table`` running the plpgsql ``body``."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                f"CREATE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} "
                "RETURN NEW; END $$"
            )
        )
        await conn.execute(
            text(f"CREATE TRIGGER {name} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {name}_fn()")
        )


async def add_refusing_trigger(engine: AsyncEngine) -> None:
    """A trigger that fails the insert of a node row of type ``refused``."""
    await add_trigger(
        engine,
        "task_instance",
        "refuse",
        "IF NEW.task_type = 'refused' THEN RAISE EXCEPTION 'refused node'; END IF;",
    )


# pg_locks, not pg_stat_activity: the latter is a snapshot taken once per transaction
BLOCKED_BY_ME = text(
    "SELECT pid FROM pg_locks WHERE NOT granted AND pg_backend_pid() = ANY (pg_blocking_pids(pid))"
)


async def claim_plans(engine: AsyncEngine, *args: Any, **options: Any) -> list[dict[str, Any]]:
    """:func:`claim_plans_on` (the same arguments after the connection) on a connection of ``engine``."""
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        return await claim_plans_on(driver, *args, **options)


async def claim_plans_on(
    driver: Any,
    now_ms: int,
    limit: int,
    until_ms: int,
    types: list[str] | None,
    *,
    analyze: bool = False,
) -> list[dict[str, Any]]:
    """The plans of the statements inside one ``asyncflow_claim_v1`` call on the asyncpg connection
    ``driver`` (``auto_explain`` of its nested statements, JSON, sent to the client as LOG messages), in
    a transaction that is rolled back: the plans the function really runs, not an ``EXPLAIN`` of the
    same text. Each is ``auto_explain``'s object: ``{"Query Text": ..., "Plan": {...}}``."""
    messages: list[str] = []

    def listen(_conn: Any, message: Any) -> None:
        messages.append(message.message)

    driver.add_log_listener(listen)
    transaction = driver.transaction()
    await transaction.start()
    try:
        await driver.execute("LOAD 'auto_explain'")
        for setting in (
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_nested_statements = on",
            "auto_explain.log_format = 'json'",
            f"auto_explain.log_analyze = {analyze}",
            "client_min_messages = log",
        ):
            await driver.execute(f"SET LOCAL {setting}")
        await driver.fetchval(pg_sql.CLAIM_CALL, now_ms, limit, until_ms, types)
        for _ in range(10):  # the listener is called soon after the message, not at once
            await asyncio.sleep(0)
    finally:
        await transaction.rollback()
        driver.remove_log_listener(listen)
    plans = [json.loads(m[m.index("{") :]) for m in messages if "plan:" in m]
    # the function's own statements: not the call itself, nor asyncpg's introspection of types
    own = ("FROM workflow_instance", "UPDATE workflow_instance")
    return [p for p in plans if any(words in p["Query Text"] for words in own)]


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``node`` and every node under it."""
    yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child)
