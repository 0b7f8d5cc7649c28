"""What only SQLite does: connection settings, immediate write transactions, one file, many writers."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool

from asyncflow.errors import ParamInvalidError, StoreError, UniqueViolationError
from asyncflow.records import (
    InstanceFields,
    InstanceWhere,
    NewWorkflowInstance,
    QueryWorkflowInstanceParams,
    Step,
    TaskInsert,
    TaskUpdate,
)
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.store.sqlite import sql as lite
from asyncflow.store.tables import SCHEMA_VERSION

from .sqlite_helpers import db_path, write_elsewhere


def new(business_id: str = "b", **kw: object) -> NewWorkflowInstance:
    return NewWorkflowInstance(workflow_type="wf", business_id=business_id, workflow_context={}, **kw)  # type: ignore[arg-type]


async def test_connections_get_wal_busy_timeout_and_foreign_keys(sqlite_url: str) -> None:
    repo = SQLAlchemyWorkflowRepo(sqlite_url)
    try:
        async with repo.engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 30_000
            assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        await repo.aclose()


async def test_a_callers_engine_is_configured_and_never_disposed(sqlite_url: str) -> None:
    engine = create_async_engine(sqlite_url)
    async with engine.connect() as conn:  # pooled before the repo saw the engine
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 0
    repo = SQLAlchemyWorkflowRepo(engine)
    await repo.create_schema()
    made = await repo.create_workflow_instance(new())
    async with engine.connect() as conn:
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    await repo.aclose()
    assert engine.pool.checkedin() >= 1  # still pooled: aclose() left the caller's engine alone
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM workflow_instance"))).scalar() == 1
    with pytest.raises(StoreError, match="closed"):
        await repo.get_workflow_instance(made.id)
    await engine.dispose()


async def test_a_url_built_engine_is_disposed_by_aclose(sqlite_url: str) -> None:
    repo = SQLAlchemyWorkflowRepo(sqlite_url)
    await repo.create_schema()
    await repo.create_workflow_instance(new())
    pool = cast(QueuePool, repo.engine.pool)
    assert pool.checkedin() + pool.checkedout() >= 1  # pooled, or kept by the idle repo for a moment
    await repo.aclose()
    await repo.aclose()  # idempotent
    assert pool.checkedin() == pool.checkedout() == 0


async def test_transactions_take_the_write_lock_when_they_begin(sqlite_url: str) -> None:
    async with SQLAlchemyWorkflowRepo(sqlite_url) as repo:
        await repo.create_schema()
        made = await repo.create_workflow_instance(new())

        async with repo.transaction():
            await repo.get_workflow_instance(made.id)  # only a read so far
            assert await asyncio.to_thread(write_elsewhere, db_path(sqlite_url)) == "database is locked"
        assert await asyncio.to_thread(write_elsewhere, db_path(sqlite_url)) == "written"


async def test_twenty_concurrent_writers_on_one_file_never_see_database_is_locked(sqlite_url: str) -> None:
    async with SQLAlchemyWorkflowRepo(sqlite_url) as setup:
        await setup.create_schema()
        counter = await setup.create_workflow_instance(new("counter"))
        node = await setup.create_task_instance(
            counter.id, TaskInsert(task_type="n", status="running", node_context={"n": 0})
        )
    writers = [SQLAlchemyWorkflowRepo(sqlite_url) for _ in range(20)]  # 20 engines: as 20 processes would

    async def writer(repo: SQLAlchemyWorkflowRepo, index: int) -> None:
        for round_ in range(4):
            # read-modify-write: a deferred transaction would fail to upgrade its read lock
            async with repo.transaction():
                current = await repo.get_workflow_instance(counter.id)
                assert current is not None
                total = current.workflow_context.get("total", 0) + 1
                where = InstanceWhere(ids=(counter.id,))
                assert await repo.update_workflow_instances(
                    where, InstanceFields(workflow_context={"total": total})
                )
            while True:
                rows = await repo.load_task_instances(counter.id)
                update = TaskUpdate(
                    id=node.id,
                    expected_version=rows[0].version,
                    node_context={"n": rows[0].node_context["n"] + 1},
                )
                step = Step(
                    instance_id=counter.id,
                    updates=(update,),
                    inserts=(TaskInsert(task_type=f"w{index}-{round_}", status="running", node_context={}),),
                )
                if (await repo.apply_step(step)).applied:
                    break

    try:
        await asyncio.gather(*(writer(repo, i) for i, repo in enumerate(writers)))
    finally:
        for repo in writers:
            await repo.aclose()
    async with SQLAlchemyWorkflowRepo(sqlite_url) as check:
        final = await check.get_workflow_instance(counter.id)
        rows = await check.load_task_instances(counter.id)
    assert final is not None and final.workflow_context == {"total": 80}
    assert rows[0].node_context == {"n": 80} and len(rows) == 81


async def test_corrupt_stored_contexts_read_as_empty_with_a_warning(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with SQLAlchemyWorkflowRepo(sqlite_url) as repo:
        await repo.create_schema()
        bad = await repo.create_workflow_instance(new("bad"))
        listy = await repo.create_workflow_instance(new("list"))
        node = await repo.create_task_instance(
            bad.id, TaskInsert(task_type="a", status="running", node_context={})
        )
        async with repo.engine.begin() as conn:
            await conn.execute(
                text("UPDATE workflow_instance SET workflow_context = '{not json' WHERE id = :i"),
                {"i": bad.id},
            )
            await conn.execute(
                text("UPDATE workflow_instance SET workflow_context = '[1, 2]' WHERE id = :i"),
                {"i": listy.id},
            )
            await conn.execute(
                text("UPDATE task_instance SET node_context = 'null{' WHERE id = :i"), {"i": node.id}
            )
        with caplog.at_level(logging.WARNING, logger="asyncflow.store._json"):
            read_bad = await repo.get_workflow_instance(bad.id)
            read_list = await repo.get_workflow_instance(listy.id)
            rows = await repo.load_task_instances(bad.id)
            everything = await repo.query_workflow_instances(QueryWorkflowInstanceParams())
    assert read_bad is not None and read_bad.workflow_context == {} and read_bad.business_id == "bad"
    assert read_list is not None and read_list.workflow_context == {}
    assert rows[0].node_context == {} and rows[0].status == "running"
    assert [item.workflow_context for item in everything] == [{}, {}]
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("invalid JSON" in m and f"row {bad.id}" in m for m in messages)
    assert any("list" in m and f"row {listy.id}" in m for m in messages)
    assert any("task_instance.node_context" in m for m in messages)


async def test_create_schema_records_its_version_once_and_refuses_newer(sqlite_url: str) -> None:
    async with SQLAlchemyWorkflowRepo(sqlite_url) as repo:
        await asyncio.gather(*(repo.create_schema() for _ in range(3)))
        async with repo.engine.connect() as conn:
            versions = (await conn.execute(text("SELECT version FROM asyncflow_schema"))).scalars().all()
            names = set((await conn.execute(text("SELECT name FROM sqlite_master"))).scalars().all())
        assert versions == list(range(1, SCHEMA_VERSION + 1))  # each version once
        assert {
            "workflow_instance",
            "task_instance",
            "asyncflow_schema",
            "ix_workflow_instance_status_next_run_at",
            "ix_workflow_instance_business_id",
            "ix_workflow_instance_task_id",
            "ix_workflow_instance_due",
        } <= names
        async with repo.engine.begin() as conn:
            await conn.execute(text("INSERT INTO asyncflow_schema VALUES (:v, 0)"), {"v": SCHEMA_VERSION + 1})
        with pytest.raises(StoreError, match="newer"):
            await repo.create_schema()


async def test_claims_read_the_due_index_and_create_schema_adds_it_to_older_databases(
    sqlite_url: str,
) -> None:
    async with SQLAlchemyWorkflowRepo(sqlite_url) as repo:
        await repo.create_schema()
        async with repo.engine.begin() as conn:
            await conn.execute(text("DROP INDEX ix_workflow_instance_due"))  # a database made before it
            await conn.execute(text("DELETE FROM asyncflow_schema WHERE version > 1"))  # (at version 1)
        await repo.create_schema()
        ids = await repo.create_workflow_instances([new(str(i), next_run_at=i) for i in range(2000)])
        async with repo.engine.connect() as conn:
            await conn.execute(text("ANALYZE"))
            for sql, args in ((lite.due_select(0), (5000, 3)),):  # the one claim's SELECT
                plan = (await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", args)).all()
                details = " | ".join(str(row[-1]) for row in plan)
                assert "ix_workflow_instance_due" in details and "TEMP B-TREE" not in details, details
        assert await repo.claim_due_instances(now_ms=5000, limit=3, lease_ms=10) == ids[:3]


async def test_missing_tables_say_create_schema(sqlite_url: str) -> None:
    async with SQLAlchemyWorkflowRepo(sqlite_url) as repo:
        with pytest.raises(StoreError, match="create_schema") as caught:
            await repo.get_workflow_instance(1)
    assert isinstance(caught.value.__cause__, sqlite3.OperationalError)


async def test_unique_violation_carries_the_sqlite_error(sqlite_url: str) -> None:
    async with SQLAlchemyWorkflowRepo(sqlite_url) as repo:
        await repo.create_schema()
        made = await repo.create_workflow_instance(new())
        await repo.create_task_instance(made.id, TaskInsert(task_type="a", status="running", node_context={}))
        with pytest.raises(UniqueViolationError) as caught:
            await repo.create_task_instance(
                made.id, TaskInsert(task_type="a", status="init", node_context={})
            )
    assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)


@pytest.mark.parametrize("url", ["sqlite+aiosqlite://", "sqlite://", "sqlite:///:memory:"])
async def test_in_memory_urls_work(url: str) -> None:
    async with SQLAlchemyWorkflowRepo(url) as repo:
        await repo.create_schema()
        made = await asyncio.gather(*(repo.create_workflow_instance(new(str(i))) for i in range(10)))
        async with repo.transaction():
            await repo.create_workflow_instance(new("tx"))
        assert await repo.count_workflow_instances(QueryWorkflowInstanceParams()) == 11
        assert await repo.get_workflow_instance(made[3].id) == made[3]


async def test_a_driverless_file_url_gets_aiosqlite(tmp_path: Path) -> None:
    async with SQLAlchemyWorkflowRepo(f"sqlite:///{tmp_path}/plain.db") as repo:
        assert repo.engine.dialect.driver == "aiosqlite"
        await repo.create_schema()
        assert (await repo.create_workflow_instance(new())).id == 1


async def test_bad_arguments_are_refused(sqlite_url: str) -> None:
    engine = create_async_engine(sqlite_url)
    with pytest.raises(ParamInvalidError):
        SQLAlchemyWorkflowRepo(engine, pool_size=3)
    with pytest.raises(ParamInvalidError):
        SQLAlchemyWorkflowRepo("mysql://user@localhost/db")
    with pytest.raises(ParamInvalidError):
        SQLAlchemyWorkflowRepo("not a url")
    with pytest.raises(ParamInvalidError):
        SQLAlchemyWorkflowRepo(42)  # type: ignore[arg-type]
    await engine.dispose()


async def repo_with_function(sqlite_url: str, name: str, fn: Callable[[], int]) -> SQLAlchemyWorkflowRepo:
    """A repo on an engine whose connections know the SQL function ``name()`` (a caller's setting)."""
    engine = create_async_engine(sqlite_url)

    def register(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.create_function(name, 0, fn)

    event.listen(engine.sync_engine, "connect", register)
    repo = SQLAlchemyWorkflowRepo(engine)
    await repo.create_schema()
    await repo.create_workflow_instance(new())
    return repo


async def run_in_transaction(repo: SQLAlchemyWorkflowRepo, sql: str) -> None:
    """``sql`` on the connection of ``repo.transaction()``, as a slow query of the repo would run."""
    async with repo.transaction(), repo._units.connection() as conn:
        await conn.exec_driver_sql(sql)


async def test_a_statement_cancelled_in_a_transaction_frees_the_write_lock_at_once(sqlite_url: str) -> None:
    """A statement cut by a cancellation in ``transaction()`` (a web request whose client went away)
    made SQLAlchemy close its connection without a ROLLBACK; the cut statement, still referenced by
    the cancellation's traceback, kept the closed connection alive with its transaction, and so the
    file's write lock, until the garbage collector ran: every other writer failed ("database is
    locked") or waited out its busy timeout."""
    started, release = threading.Event(), threading.Event()

    def held() -> int:
        started.set()
        release.wait(10)
        return 1

    repo = await repo_with_function(sqlite_url, "held", held)
    try:
        cut = asyncio.create_task(run_in_transaction(repo, "SELECT held()"))
        async with asyncio.timeout(10):
            while not started.is_set():
                await asyncio.sleep(0.005)
        cut.cancel()
        await asyncio.sleep(0.05)  # the cancellation reaches SQLAlchemy while the statement runs
        release.set()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await asyncio.shield(cut)
        assert await asyncio.to_thread(write_elsewhere, db_path(sqlite_url)) == "written"
        async with asyncio.timeout(10):  # the repo's writes go on
            where, fields = InstanceWhere(ids=(1,)), InstanceFields(status="x")
            changed = await repo.update_workflow_instances(where, fields)
        assert changed == 1
    finally:
        release.set()
        await repo.aclose()
        await repo.engine.dispose()


async def test_a_slow_query_cancelled_in_a_transaction_stops_at_once(sqlite_url: str) -> None:
    """The cancellation of a slow query in ``transaction()`` used to wait for the query to run to its
    end (SQLAlchemy closes the connection only after it), however long it took: it is interrupted."""
    started, stop = threading.Event(), threading.Event()

    def keep_going() -> int:
        started.set()
        return 0 if stop.is_set() else 1

    repo = await repo_with_function(sqlite_url, "keep_going", keep_going)
    endless = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE keep_going()) "
        "SELECT count(*) FROM c"
    )
    try:
        cut = asyncio.create_task(run_in_transaction(repo, endless))
        async with asyncio.timeout(10):
            while not started.is_set():
                await asyncio.sleep(0.005)
        cut.cancel()
        done, _ = await asyncio.wait([cut], timeout=5)
        assert done, "the cancelled query still ran 5 s later"
        assert cut.cancelled()
        assert await asyncio.to_thread(write_elsewhere, db_path(sqlite_url)) == "written"
    finally:
        stop.set()
        await repo.aclose()
        await repo.engine.dispose()
