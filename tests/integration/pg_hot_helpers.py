"""Helpers of the PostgreSQL hot-path tests (test_repo_hot_path_postgres.py, test_repo_batch_postgres.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from asyncflow.records import NewWorkflowInstance, Step, TaskInsert, TaskInstanceRecord, TaskUpdate
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
