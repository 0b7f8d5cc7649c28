"""What only PostgreSQL does: JSONB, row locks, commit failures, an unreachable or silent server."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from asyncflow.errors import StoreError, UniqueViolationError
from asyncflow.records import (
    InstanceFields,
    InstanceWhere,
    NewWorkflowInstance,
    QueryWorkflowInstanceParams,
    Step,
    TaskInsert,
)
from asyncflow.store.postgres import backend as pg_backend
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo

from .pg_hot_helpers import claim_plans, claim_plans_on, plan_nodes


def new(business_id: str = "b", **kw: Any) -> NewWorkflowInstance:
    return NewWorkflowInstance(workflow_type="wf", business_id=business_id, workflow_context={}, **kw)


@pytest.fixture
def repo(pg_repo: SQLAlchemyWorkflowRepo) -> SQLAlchemyWorkflowRepo:
    return pg_repo


async def test_unreachable_server_is_a_store_error() -> None:
    repo = SQLAlchemyWorkflowRepo("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(StoreError) as caught:
            await repo.get_workflow_instance(1)
        assert caught.value.__cause__ is not None
    finally:
        await repo.aclose()


async def test_a_silent_server_times_out_as_a_store_error() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    repo = SQLAlchemyWorkflowRepo(
        f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test", connect_args={"timeout": 0.3}
    )
    try:
        with pytest.raises(StoreError) as caught:
            await repo.create_workflow_instance(new())
        assert isinstance(caught.value.__cause__, TimeoutError)
        assert accepted  # it really connected, then waited for an answer that never came
    finally:
        await repo.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def test_a_missing_asyncpg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # what an uninstalled package looks like to import
    with pytest.raises(ImportError, match=r"asyncflow\[postgres\]"):
        SQLAlchemyWorkflowRepo("postgresql+asyncpg://postgres@127.0.0.1/test")
    with pytest.raises(ImportError, match=r"asyncflow\[postgres\]"):
        SQLAlchemyWorkflowRepo("postgresql://postgres@127.0.0.1/test")


@pytest.mark.postgres
async def test_jsonb_reads_an_exponent_float_back_as_an_int_where_sqlite_keeps_it(
    repo: SQLAlchemyWorkflowRepo, tmp_path: Any
) -> None:
    """docs/storage.md: jsonb keeps numbers as ``numeric``, so a float written with an exponent and no
    fraction digits comes back an int, and -0.0 as 0.0; SQLite gives back what was written."""
    context = {"a": 1e16, "b": -0.0, "c": 2.5e20, "d": 1.5}
    on_pg = await repo.create_workflow_instance(
        NewWorkflowInstance(workflow_type="wf", business_id="f", workflow_context=context)
    )
    back = (await repo.get_workflow_instance(on_pg.id)).workflow_context  # type: ignore[union-attr]
    assert back == {"a": 10**16, "b": 0.0, "c": 25 * 10**19, "d": 1.5}
    assert type(back["a"]) is int and type(back["c"]) is int and str(back["b"]) == "0.0"
    async with SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/floats.db") as sqlite_repo:
        await sqlite_repo.migrate()
        on_sqlite = await sqlite_repo.create_workflow_instance(
            NewWorkflowInstance(workflow_type="wf", business_id="f", workflow_context=context)
        )
        kept = (await sqlite_repo.get_workflow_instance(on_sqlite.id)).workflow_context  # type: ignore[union-attr]
    assert kept == context and type(kept["a"]) is float and str(kept["b"]) == "-0.0"


@pytest.mark.postgres
async def test_contexts_are_jsonb_and_indexes_exist(repo: SQLAlchemyWorkflowRepo) -> None:
    async with repo.engine.connect() as conn:
        types = dict(
            (
                await conn.execute(
                    text(
                        "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
                        " WHERE table_schema = current_schema() AND column_name LIKE '%context'"
                    )
                )
            ).all()
        )
        indexes = set(
            (
                await conn.execute(
                    text("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")
                )
            ).scalars()
        )
    assert types == {
        "workflow_instance.workflow_context": "jsonb",
        "task_instance.node_context": "jsonb",
        "workflow_instance.trace_context": "text",  # a W3C traceparent, not JSON
    }
    assert {
        "ix_workflow_instance_status_next_run_at",
        "ix_workflow_instance_business_id",
        "ix_workflow_instance_task_id",
        "ix_workflow_instance_due",
        "uq_task_instance_workflow_instance_id_task_type",
    } <= indexes


async def test_claims_read_the_due_index_and_create_schema_adds_it_to_older_databases(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    async with repo.engine.begin() as conn:
        await conn.execute(text("DROP INDEX ix_workflow_instance_due"))  # a database made before it
        await conn.execute(text("DELETE FROM asyncflow_schema WHERE version > 1"))  # (at version 1)
    await repo.create_schema()
    news = [new(str(i), next_run_at=i) for i in range(20_000)]
    ids = await repo.create_workflow_instances(news)
    await repo.update_workflow_instances(
        InstanceWhere(ids=tuple(ids[::2])), InstanceFields(status="completed")
    )
    async with repo.engine.begin() as conn:
        await conn.execute(text("ANALYZE workflow_instance"))
    plans = await claim_plans(repo.engine, 30_000, 64, 99, None)
    assert [_kind(p) for p in plans] == ["pick", "lease"], plans
    for plan in plans:  # walks the index: no sort of every runnable row
        assert "Sort" not in _node_types(plan), plan
    assert _index_scans(plans[0]) == ["ix_workflow_instance_due"], plans[0]
    assert _index_scans(plans[1]) == ["pk_workflow_instance"], plans[1]
    assert await repo.claim_due_instances(now_ms=30_000, limit=3, lease_ms=10) == [ids[1], ids[3], ids[5]]


async def test_a_typed_claim_walks_the_due_index_before_and_after_the_table_is_analyzed(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    # a bulk-loaded backlog that autovacuum has not analyzed yet: planned on no statistics, the old
    # ``workflow_type = ANY(...)`` filter was estimated to match one row, so claims sorted every due row
    ids = await repo.create_workflow_instances([new(str(i)) for i in range(3)])
    async with repo.engine.begin() as conn:  # a backlog of 100,000 (SQL: the repo's creates are slower)
        await conn.execute(
            text(
                "INSERT INTO workflow_instance (workflow_type, business_id, status, created_at, updated_at, "
                "next_run_at) SELECT 'wf', 'bulk-' || i, 'init', 0, 0, 1 FROM generate_series(1, 100000) i"
            )
        )
    for analyzed in (False, True):
        if analyzed:
            async with repo.engine.begin() as conn:
                await conn.execute(text("ANALYZE workflow_instance"))
        plans = await claim_plans(repo.engine, 30_000, 64, 60_000, ["wf"], analyze=True)
        assert [_kind(p) for p in plans] == ["pick", "lease"], (analyzed, plans)
        pick = plans[0]
        assert "Sort" not in _node_types(pick), (analyzed, pick)
        assert _index_scans(pick) == ["ix_workflow_instance_due"], (analyzed, pick)
        assert max(n.get("Actual Rows", 0) for n in plan_nodes(pick["Plan"])) == 64  # read: the 64 claimed
        # one plan per session, whatever the values: the conditions name parameters, not values
        scan = next(n for n in plan_nodes(pick["Plan"]) if n.get("Index Name"))
        assert scan["Index Cond"] == "(next_run_at <= $1)", (analyzed, scan)
    claimed = await repo.claim_due_instances(now_ms=30_000, limit=3, lease_ms=10, workflow_types=["wf"])
    assert claimed == ids[:3]
    assert await repo.claim_due_instances(now_ms=30_000, limit=3, lease_ms=10, workflow_types=["x"]) == []


def _kind(plan: dict[str, Any]) -> str:
    return "lease" if plan["Query Text"].lstrip().startswith("UPDATE") else "pick"


def _node_types(plan: dict[str, Any]) -> list[str]:
    return [node["Node Type"] for node in plan_nodes(plan["Plan"])]


def _index_scans(plan: dict[str, Any]) -> list[str]:
    return [node["Index Name"] for node in plan_nodes(plan["Plan"]) if "Index Name" in node]


async def test_without_the_claim_function_claims_use_the_older_statement_until_it_is_there(
    repo: SQLAlchemyWorkflowRepo, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This version deployed before `asyncflow migrate` (a database at schema version 12): the driver
    keeps claiming through the statement version 12 sent, says once what to run, and tries the function
    again every few claims, so a migration by another process is taken up without a restart."""
    monkeypatch.setattr(pg_backend, "CLAIM_FUNCTION_RETRY_EVERY", 3)
    ids = await repo.create_workflow_instances([new(str(i), next_run_at=i) for i in range(6)])
    missing = "no asyncflow_claim_v1() function"

    async def drop_the_function() -> None:
        async with repo.engine.begin() as conn:
            await conn.execute(text("DROP FUNCTION asyncflow_claim_v1"))

    def said(level: int) -> int:
        return sum(missing in r.getMessage() and r.levelno == level for r in caplog.records)

    async def claim(limit: int, **kw: Any) -> list[int]:
        return await repo.claim_due_instances(now_ms=10, limit=limit, lease_ms=1000, **kw)

    await drop_the_function()
    caplog.set_level(logging.DEBUG, logger="asyncflow.store.postgres.backend")
    with pytest.raises(StoreError, match=r"asyncflow_claim_v1\(\).*repo\.migrate\(\)"):
        async with repo.transaction():  # the failed call aborted the transaction: no way on
            await claim(2)
    assert await claim(2) == ids[:2]  # tried the function: the older statement, and a warning
    assert await claim(2, workflow_types=["wf"]) == ids[2:4]  # the older statement (3 to go)
    assert await claim(2, workflow_types=["x"]) == []  # (2 to go)
    async with repo.transaction():  # (1 to go) the older statement, in a transaction too
        assert await claim(1) == ids[4:5]
    assert (said(logging.WARNING), said(logging.DEBUG)) == (1, 0)
    assert await claim(5) == ids[5:]  # tried the function again: still missing, said quietly
    assert (said(logging.WARNING), said(logging.DEBUG)) == (1, 1)
    dues = [(await repo.get_workflow_instance(i)).next_run_at for i in ids]  # type: ignore[union-attr]
    assert dues == [1010] * 6

    async with SQLAlchemyWorkflowRepo(repo.engine) as other:  # `asyncflow migrate` in another process
        await other.migrate()
    for _ in range(3):  # the older statement until the next try
        assert await repo.claim_due_instances(now_ms=200, limit=1, lease_ms=1000) == []  # none due
    assert await repo.claim_due_instances(now_ms=2000, limit=9, lease_ms=1000) == ids  # the function
    assert (said(logging.WARNING), said(logging.DEBUG)) == (1, 1)  # it was there: nothing said
    await drop_the_function()  # from now on every claim tries the function first
    assert await repo.claim_due_instances(now_ms=4000, limit=9, lease_ms=1000) == ids
    assert (said(logging.WARNING), said(logging.DEBUG)) == (1, 2)

    await repo.migrate()  # this repo's own migrate(): the function at once, and a new warning if missing
    assert await repo.claim_due_instances(now_ms=6000, limit=9, lease_ms=1000) == ids
    await drop_the_function()
    assert await repo.claim_due_instances(now_ms=8000, limit=9, lease_ms=1000) == ids
    assert (said(logging.WARNING), said(logging.DEBUG)) == (2, 2)


async def test_a_claim_that_fails_otherwise_raises_and_keeps_to_the_function(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    """Only a missing function turns claims to the older statement: any other error is raised, each time."""
    await repo.create_workflow_instances([new("a", next_run_at=1)])
    async with repo.engine.begin() as conn:  # the function is there but fails
        await conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION asyncflow_claim_v1(p_now bigint, p_limit bigint, p_until bigint,"
                " p_types text[]) RETURNS bigint[] LANGUAGE plpgsql"
                " AS $$ BEGIN RAISE EXCEPTION 'claim refused'; END $$"
            )
        )
    for _ in range(2):  # not the older statement (which would claim the row) the second time either
        with pytest.raises(StoreError, match="claim refused"):
            await repo.claim_due_instances(now_ms=10, limit=5, lease_ms=100)


async def test_a_claim_planned_on_a_small_table_still_walks_the_index_once_it_grew(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    """One plan per session: the plan a session made while the table held a few analyzed rows is kept
    until the next ``ANALYZE``. It is the index walk then too (no sequential scan, no sort of every due
    row), so a backlog that grows after it is claimed as fast."""
    await repo.create_workflow_instances([new(str(i), next_run_at=i) for i in range(5)])
    async with repo.engine.connect() as conn:
        await conn.execute(text("ANALYZE workflow_instance"))
        await conn.commit()
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        small = await claim_plans_on(driver, 30_000, 64, 60_000, ["wf"])  # planned now, on 5 rows
        await driver.execute(
            "INSERT INTO workflow_instance (workflow_type, business_id, status, created_at, updated_at, "
            "next_run_at) SELECT 'wf', 'bulk-' || i, 'init', 0, 0, 1 FROM generate_series(1, 100000) i"
        )
        grown = await claim_plans_on(driver, 30_000, 64, 60_000, ["wf"], analyze=True)  # the same plan
    for plans in (small, grown):
        assert [_kind(p) for p in plans] == ["pick", "lease"], plans
        assert not {"Sort", "Seq Scan"} & {t for p in plans for t in _node_types(p)}, plans
        assert _index_scans(plans[0]) == ["ix_workflow_instance_due"], plans[0]
    assert max(n.get("Actual Rows", 0) for n in plan_nodes(grown[0]["Plan"])) == 64  # not 100,005


@pytest.mark.postgres
async def test_unique_violation_carries_the_asyncpg_error(repo: SQLAlchemyWorkflowRepo) -> None:
    import asyncpg

    made = await repo.create_workflow_instance(new())
    await repo.create_task_instance(made.id, TaskInsert(task_type="a", status="running", node_context={}))
    with pytest.raises(UniqueViolationError) as caught:
        await repo.create_task_instance(made.id, TaskInsert(task_type="a", status="init", node_context={}))
    assert isinstance(caught.value.__cause__, asyncpg.UniqueViolationError)


@pytest.mark.postgres
async def test_a_commit_failure_is_raised_as_store_error(repo: SQLAlchemyWorkflowRepo) -> None:
    async with repo.engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN IF NEW.business_id = 'refused' THEN RAISE EXCEPTION 'refused at commit'; END IF;"
                " RETURN NULL; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON workflow_instance"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        )
    with pytest.raises(StoreError, match="refused at commit"):
        async with repo.transaction():
            await repo.create_workflow_instance(new("accepted"))
            await repo.create_workflow_instance(new("refused"))
    assert await repo.count_workflow_instances(QueryWorkflowInstanceParams()) == 0
    made = await repo.create_workflow_instance(new("after"))
    assert await repo.get_workflow_instance(made.id) == made


@pytest.mark.postgres
async def test_claim_skips_rows_locked_by_another_transaction(repo: SQLAlchemyWorkflowRepo) -> None:
    ids = await repo.create_workflow_instances([new(str(i), next_run_at=i) for i in range(4)])
    async with repo.engine.connect() as other, other.begin():
        await other.execute(text("SELECT id FROM workflow_instance WHERE id = :i FOR UPDATE"), {"i": ids[0]})
        claimed = await repo.claim_due_instances(now_ms=100, limit=10, lease_ms=1000)
        assert claimed == ids[1:]
    assert await repo.claim_due_instances(now_ms=100, limit=10, lease_ms=1000) == ids[:1]


@pytest.mark.postgres
async def test_a_step_waits_for_a_concurrent_writer_of_its_instance(repo: SQLAlchemyWorkflowRepo) -> None:
    made = await repo.create_workflow_instance(new(status="running"))
    step = Step(instance_id=made.id, inserts=(TaskInsert(task_type="a", status="running", node_context={}),))
    async with repo.engine.connect() as canceler, canceler.begin():
        await canceler.execute(
            text("UPDATE workflow_instance SET status = 'canceled' WHERE id = :i"), {"i": made.id}
        )
        pending = asyncio.create_task(repo.apply_step(step))
        waiting = 0
        while not waiting and not pending.done():  # until the step's connection waits on the row lock
            await asyncio.sleep(0.01)
            query = text("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'")
            waiting = (await canceler.execute(query)).scalar_one()
        assert not pending.done()  # blocked on the instance row, before any node write
    result = await pending  # the cancel committed first: the step's status condition fails
    assert not result.applied
    assert await repo.load_task_instances(made.id) == []


@pytest.mark.postgres
async def test_non_object_json_reads_as_empty_with_a_warning(
    repo: SQLAlchemyWorkflowRepo, caplog: pytest.LogCaptureFixture
) -> None:
    made = await repo.create_workflow_instance(new())
    async with repo.engine.begin() as conn:
        await conn.execute(
            text("UPDATE workflow_instance SET workflow_context = '[1, 2]'::jsonb WHERE id = :i"),
            {"i": made.id},
        )
    with caplog.at_level(logging.WARNING, logger="asyncflow.store._json"):
        read = await repo.get_workflow_instance(made.id)
    assert read is not None and read.workflow_context == {}
    assert any("not an object" in record.getMessage() for record in caplog.records)


@pytest.mark.postgres
async def test_url_built_repo_owns_its_engine_and_schema_creation_is_serialized(
    pg_engine: AsyncEngine, postgres_url: str
) -> None:
    async with pg_engine.connect() as conn:
        schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
    settings = {"connect_args": {"server_settings": {"search_path": schema}}}
    repos = [SQLAlchemyWorkflowRepo(postgres_url, **settings) for _ in range(4)]
    try:
        await asyncio.gather(*(repo.create_schema() for repo in repos))
        made = await repos[0].create_workflow_instance(new())
        assert await repos[3].get_workflow_instance(made.id) == made
    finally:
        for repo in repos:
            await repo.aclose()
    assert all(repo.engine.pool.checkedin() == 0 for repo in repos)
    shared = SQLAlchemyWorkflowRepo(pg_engine)
    await shared.aclose()
    async with pg_engine.connect() as conn:  # the caller's engine still works
        assert (await conn.execute(text("SELECT count(*) FROM workflow_instance"))).scalar() == 1


async def test_without_the_claim_states_function_claims_hand_over_nothing_until_it_is_there(
    repo: SQLAlchemyWorkflowRepo, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database an older release migrated has no ``asyncflow_claim_states_v1`` (definitions revision
    2): claims go through ``asyncflow_claim_v1`` without rows (the passes read their instances), try the
    function again every few claims, and use it once ``migrate()`` installed it."""
    monkeypatch.setattr(pg_backend, "CLAIM_FUNCTION_RETRY_EVERY", 2)
    ids = await repo.create_workflow_instances([new(str(i), next_run_at=i) for i in range(5)])
    async with repo.engine.begin() as conn:
        await conn.execute(text("DROP FUNCTION asyncflow_claim_states_v1"))
    caplog.set_level(logging.INFO, logger="asyncflow.store.postgres.backend")

    async def claim(limit: int) -> list[tuple[int, Any]]:
        return await repo.claim_due_states(now_ms=10, limit=limit, lease_ms=1000)

    assert await claim(1) == [(ids[0], None)]  # tried the function: missing, said once
    assert await claim(1) == [(ids[1], None)]  # (1 to go)
    assert await claim(1) == [(ids[2], None)]  # (0 to go)
    assert sum("asyncflow_claim_states_v1" in r.getMessage() for r in caplog.records) == 1
    await repo.migrate()  # installs it (a definitions repair), and claims try it at once
    [(claimed, record)] = await claim(1)
    assert claimed == ids[3] and record == await repo.get_workflow_instance(ids[3])
    async with repo.transaction():  # inside a transaction: the plain claim, no rows
        assert await claim(1) == [(ids[4], None)]
