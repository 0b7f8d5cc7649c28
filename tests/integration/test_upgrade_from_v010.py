"""A database written by asyncflow 0.1.0 upgrades with every row kept, and its unfinished instances
then run to completion (fixtures made by ``tests/fixtures/make_v010_db.py`` from 0.1.0's code)."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import shutil
import sqlite3
import sys
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import asyncflow as af
from tests.conftest import isolated_pg_engine
from tests.fixtures.v010_workflows import EXPECTED, UNFINISHED, WORKFLOW_TYPE, make_registry

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"
ROWS = "SELECT * FROM {table} ORDER BY id -- read {count}"
"""A new text per read: a statement prepared before the migration added columns is never reused."""
_READS = iter(range(1_000_000))


async def _rows(engine: AsyncEngine, table: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text(ROWS.format(table=table, count=next(_READS))))).all()
    return [tuple(row) for row in rows]


async def _versions(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        found = (await conn.execute(text("SELECT version FROM asyncflow_schema ORDER BY version"))).all()
    return [row[0] for row in found]


async def _upgrade_and_finish(repo: af.SQLAlchemyWorkflowRepo) -> None:
    engine = repo.engine
    assert await _versions(engine) == [1]
    before = {table: await _rows(engine, table) for table in ("workflow_instance", "task_instance")}
    assert len(before["workflow_instance"]) == len(EXPECTED)

    await asyncio.gather(*(repo.migrate() for _ in range(3)))  # concurrent migrators
    await repo.migrate()  # and once more: nothing to do

    assert await _versions(engine) == list(range(1, af.SCHEMA_VERSION + 1))
    added = {
        "workflow_instance": (0, None, None, None, None, None, False),
        "task_instance": (),
    }  # lease_epoch 0; unique_key, trace_context, parent_id, parent_node, child_key NULL; notify_finished
    # false (SQLite's 0 compares equal)
    for table, rows in before.items():  # every row kept, as it was (plus the columns added since)
        assert await _rows(engine, table) == [row + added[table] for row in rows]
    svc = af.WorkflowService(repo, af.LocalWorkflowLock(), make_registry(gate_open=True, approval_wait=0))
    by_business = {
        inst.business_id: inst
        for inst in await svc.query_workflow_instances(af.QueryWorkflowInstanceParams())
    }
    assert {key: inst.status for key, inst in by_business.items()} == EXPECTED

    event = af.NodeExternalEvent(event_ts=2, event_content={"approved": True})
    driver = af.WorkflowDriver(svc, poll_interval=0.05)
    for _ in range(20):
        await driver.run_until_idle()
        details = await svc.query_workflow_instance_detail(
            af.QueryWorkflowInstanceParams(workflow_type_in=[WORKFLOW_TYPE])
        )
        if all(detail.status != "running" and detail.status != "init" for detail in details):
            break
        for detail in details:
            approval = detail.node("approval")
            if approval.status == "pending" and "node_event" not in approval.node_context:
                await svc.add_node_external_event(detail.id, "approval", event)
        await asyncio.sleep(0.06)
    after = {
        inst.business_id: inst.status
        for inst in await svc.query_workflow_instances(af.QueryWorkflowInstanceParams())
    }
    assert after == {**EXPECTED, **dict.fromkeys(UNFINISHED, "completed")}
    for business_id in UNFINISHED:
        [detail] = await svc.query_workflow_instance_detail(
            af.QueryWorkflowInstanceParams(business_id=business_id)
        )
        assert detail.node("finish").node_context["finished"] is True
        assert detail.node("gated").node_context["gated"] == "passed"


async def test_a_sqlite_database_of_v010_upgrades_and_its_instances_finish(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "v010.sqlite"
    shutil.copy(FIXTURES / "v010.sqlite", path)
    # the fixture is what 0.1.0 wrote: version 1, no newer objects
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT version FROM asyncflow_schema").fetchall() == [(1,)]
    async with af.SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{path}") as repo:
        await _upgrade_and_finish(repo)


async def _load_pg_fixture(engine: AsyncEngine) -> None:
    dump = (FIXTURES / "v010_postgres.sql").read_text()
    async with engine.connect() as conn:
        schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
        raw = await conn.get_raw_connection()
        await raw.driver_connection.execute(dump.replace("__SCHEMA__", f'"{schema}"'))
        await conn.commit()


async def test_a_postgres_database_of_v010_upgrades_and_its_instances_finish(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await _load_pg_fixture(engine)
        async with af.SQLAlchemyWorkflowRepo(engine) as repo:
            await _upgrade_and_finish(repo)


_MIGRATE_IN_A_PROCESS = """
import asyncio, sys
import asyncflow as af
from sqlalchemy.ext.asyncio import create_async_engine

async def main(url, schema):
    options = {"server_settings": {"search_path": schema}} if schema else {}
    engine = create_async_engine(url, connect_args=options)
    async with af.SQLAlchemyWorkflowRepo(engine) as repo:
        await repo.migrate()
    await engine.dispose()

asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
"""


async def _migrate_in_processes(count: int, *args: str) -> None:
    runs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _MIGRATE_IN_A_PROCESS, *args, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(count)
    ]
    results = [await run.communicate() for run in runs]
    assert [run.returncode for run in runs] == [0] * count, results


async def test_concurrent_migrators_in_processes_on_a_v010_sqlite_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "v010.sqlite"
    shutil.copy(FIXTURES / "v010.sqlite", path)
    await _migrate_in_processes(3, f"sqlite+aiosqlite:///{path}")
    with contextlib.closing(sqlite3.connect(path)) as db:
        versions = [row[0] for row in db.execute("SELECT version FROM asyncflow_schema ORDER BY version")]
        count = db.execute("SELECT count(*) FROM workflow_instance").fetchone()[0]
    assert versions == list(range(1, af.SCHEMA_VERSION + 1))
    assert count == len(EXPECTED)


@pytest.mark.parametrize("fixture", ["fresh", "v010"])
async def test_concurrent_migrators_in_processes_on_postgres(postgres_url: str, fixture: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        if fixture == "v010":
            await _load_pg_fixture(engine)
        async with engine.connect() as conn:
            schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
        await _migrate_in_processes(3, postgres_url, schema)
        assert await _versions(engine) == list(range(1, af.SCHEMA_VERSION + 1))
        expected = len(EXPECTED) if fixture == "v010" else 0
        assert len(await _rows(engine, "workflow_instance")) == expected
