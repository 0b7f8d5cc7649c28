"""``workflow_instance.trace_context`` on every backend: stored at creation (single, grouped, bulk,
inside and outside ``transaction()``), read back by every read path, added by migration 7 to a
version-6 database, and adopted when the tables were made from ``af.metadata``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncflow as af
from asyncflow.errors import ParamInvalidError
from asyncflow.records import NewWorkflowInstance, QueryWorkflowInstanceParams, Step, TaskInsert
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
OTHER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _new(business_id: str, trace: str | None) -> NewWorkflowInstance:
    return NewWorkflowInstance(
        workflow_type="t", business_id=business_id, workflow_context={"k": 1}, trace_context=trace
    )


async def _check_reads(repo: Any, expected: dict[int, str | None]) -> None:
    for instance_id, trace in expected.items():
        record = await repo.get_workflow_instance(instance_id)
        assert record is not None and record.trace_context == trace
        state = await repo.load_instance_state(instance_id)
        assert state is not None and state[0].trace_context == trace
    queried = await repo.query_workflow_instances(QueryWorkflowInstanceParams(order_by_id_asc=True))
    assert {r.id: r.trace_context for r in queried if r.id in expected} == expected


async def test_trace_context_round_trips_through_every_read(engine_repo: Any) -> None:
    repo = engine_repo
    traced = await repo.create_workflow_instance(_new("a", TRACE))
    plain = await repo.create_workflow_instance(_new("b", None))
    assert (traced.trace_context, plain.trace_context) == (TRACE, None)
    bulk = await repo.create_workflow_instances([_new("c", TRACE), _new("d", None)])
    # concurrent single creates (grouped into one statement on PostgreSQL)
    grouped = await asyncio.gather(*(repo.create_workflow_instance(_new(f"g{i}", OTHER)) for i in range(6)))
    assert {record.trace_context for record in grouped} == {OTHER}
    node = TaskInsert(task_type="A", status="completed", node_context={"out": 1})
    assert (await repo.apply_step(Step(instance_id=traced.id, inserts=(node,)))).applied
    expected = {traced.id: TRACE, plain.id: None, bulk[0]: TRACE, bulk[1]: None}
    expected.update({record.id: OTHER for record in grouped})
    await _check_reads(repo, expected)
    # concurrent state reads (one statement on PostgreSQL) keep instance and node columns apart
    states = await asyncio.gather(*(repo.load_instance_state(i) for i in (traced.id, plain.id, bulk[0])))
    assert [s[0].trace_context for s in states] == [TRACE, None, TRACE]
    (row,) = states[0][1]
    assert (row.task_type, row.status, row.node_context) == ("A", "completed", {"out": 1})
    with pytest.raises(ParamInvalidError, match="trace_context"):
        await repo.create_workflow_instance(_new("e", "x" * 2000))


async def test_trace_context_inside_a_transaction(engine_repo: Any) -> None:
    repo = engine_repo
    async with repo.transaction():
        single = await repo.create_workflow_instance(_new("a", TRACE))
        bulk = await repo.create_workflow_instances([_new("b", None), _new("c", OTHER)])
        expected = {single.id: TRACE, bulk[0]: None, bulk[1]: OTHER}
        await _check_reads(repo, expected)  # read inside, before the commit
    await _check_reads(repo, expected)


async def _version_6_database(engine: AsyncEngine) -> None:
    """Bring a migrated database back to version 6 (no column) with one instance of then."""
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE workflow_instance DROP COLUMN trace_context"))
        await conn.execute(text("DELETE FROM asyncflow_schema WHERE version >= 7"))
        await conn.execute(
            text(
                "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, "
                "task_id, created_at, updated_at, next_run_at, version) "
                "VALUES ('t', 'old', 'init', '{}', 0, 1, 1, 0, 1)"
            )
        )


async def _upgrade(engine: AsyncEngine) -> None:
    repo = SQLAlchemyWorkflowRepo(engine)
    try:
        await repo.migrate()
        await _version_6_database(engine)
        await repo.migrate()  # migration 7 adds the column back, keeps the row
        await repo.migrate()  # and is applied once
        async with engine.connect() as conn:
            versions = (
                await conn.execute(text("SELECT version FROM asyncflow_schema ORDER BY version"))
            ).all()
        assert [v[0] for v in versions] == list(range(1, af.SCHEMA_VERSION + 1))
        (old,) = await repo.query_workflow_instances(QueryWorkflowInstanceParams())
        assert (old.business_id, old.trace_context) == ("old", None)
        new = await repo.create_workflow_instance(_new("new", TRACE))
        await _check_reads(repo, {old.id: None, new.id: TRACE})
    finally:
        await repo.aclose()


async def _adopt(engine: AsyncEngine) -> None:
    """Tables made from ``af.metadata`` (already with the column) are adopted by every migration."""
    async with engine.begin() as conn:
        await conn.run_sync(af.metadata.create_all)
    repo = SQLAlchemyWorkflowRepo(engine)
    try:
        await repo.migrate()
        new = await repo.create_workflow_instance(_new("new", TRACE))
        await _check_reads(repo, {new.id: TRACE})
    finally:
        await repo.aclose()


@asynccontextmanager
async def _sqlite(path: Any) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.mark.parametrize("scenario", [_upgrade, _adopt])
async def test_migration_7_on_sqlite(
    tmp_path: Any, scenario: Callable[[AsyncEngine], Awaitable[None]]
) -> None:
    async with _sqlite(tmp_path / "db.sqlite") as engine:
        await scenario(engine)


@pytest.mark.postgres
@pytest.mark.parametrize("scenario", [_upgrade, _adopt])
async def test_migration_7_on_postgres(
    postgres_url: str, scenario: Callable[[AsyncEngine], Awaitable[None]]
) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await scenario(engine)
