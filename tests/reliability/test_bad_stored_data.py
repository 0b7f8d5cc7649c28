"""Issue 8, item 6 (part 3): bad data a database hands over, on the memory repo, SQLite and PostgreSQL.

Rows written by someone else (another service, a newer version, a hand edit): an instance of a workflow
type this process does not know, rows of nodes the definition does not have, statuses asyncflow does not
know, and context columns holding invalid JSON or JSON that is not an object. Each gets a typed error or
the documented behaviour (docs/reliability.md), and none corrupts what is stored.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from sqlalchemy import text

from asyncflow.driver import WorkflowDriver
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import ConfigNotFoundError
from asyncflow.records import (
    InstanceFields,
    InstanceWhere,
    NewWorkflowInstance,
    QueryWorkflowInstanceParams,
    TaskFields,
    TaskInsert,
    TaskWhere,
)

from .helpers import ALL_ROWS, MIXED, Journal, rows_by_type, service, snapshot, without_epochs


async def test_an_instance_of_a_type_this_process_does_not_know(repo: Any, caplog: Any) -> None:
    """ConfigNotFoundError for a pass (nothing written); the driver logs it at ERROR, backs the
    instance off and completes the others."""
    journal = Journal()
    svc = service(repo, journal, lock_ttl=5)
    [stranger] = await repo.create_workflow_instances(
        [NewWorkflowInstance(workflow_type="other-service-type", business_id="s", workflow_context={})]
    )
    good = [(await svc.create_workflow(MIXED, f"g{i}")).id for i in range(3)]
    before = await snapshot(repo)
    with pytest.raises(ConfigNotFoundError):
        await svc.run_workflow(stranger)
    assert without_epochs(await snapshot(repo)) == without_epochs(before)  # only the pass's epoch moved
    detail = await svc.query_workflow_instance_detail(
        QueryWorkflowInstanceParams(workflow_instance_id=stranger)
    )
    assert detail[0].workflow_type == "other-service-type" and detail[0].task_instances == ()
    driver = WorkflowDriver(svc, concurrency=4, poll_interval=0.05, error_backoff_base=30.0)
    with caplog.at_level(logging.ERROR, logger="asyncflow.driver"):
        for _ in range(200):  # bounded: the good ones need a few passes (retry, not-ready poll)
            await driver.run_until_idle()
            await asyncio.sleep(0.01)
            if await _all_completed(svc, good):
                break
    assert await _all_completed(svc, good)
    record = await repo.get_workflow_instance(stranger)
    assert record is not None and record.status == "init"
    assert await repo.load_task_instances(stranger) == []
    assert record.next_run_at > driver.service.clock.time() * 1000 + 20_000, "backed off"
    assert driver.stats.errors >= 1
    assert any("other-service-type" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


async def _all_completed(svc: WorkflowService, ids: list[int]) -> bool:
    return all([(await svc.get_workflow_instance(i)).status == "completed" for i in ids])


async def test_rows_of_nodes_the_definition_does_not_have(repo: Any) -> None:
    """Documented: a row of an unknown node (a node removed from the config) is left alone; a failed
    one fails the instance (as any failed row does)."""
    svc = service(repo, Journal())
    ignored = await svc.create_workflow(MIXED, "ghost-running")
    await repo.create_task_instance(
        ignored.id, TaskInsert(task_type="ghost", status="running", node_context={})
    )
    while (await svc.run_workflow(ignored.id)).status != "completed":
        pass
    rows = await rows_by_type(repo, ignored.id)
    assert rows["ghost"].status == "running" and set(rows) == {*ALL_ROWS, "ghost"}
    failing = await svc.create_workflow(MIXED, "ghost-failed")
    await repo.create_task_instance(
        failing.id, TaskInsert(task_type="ghost", status="failed", node_context={})
    )
    assert (await svc.run_workflow(failing.id)).status == "failed"
    assert set(await rows_by_type(repo, failing.id)) == {"ghost"}


async def test_a_node_status_nobody_knows_stalls_until_the_node_is_restarted(
    repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Documented: a row whose status is not an asyncflow status is never run (nor overwritten); the
    instance waits, polled, until an operator restarts that node or cancels the instance. The first
    pass says so in a warning, later ones at debug level (the driver polls it every poll interval)."""
    journal = Journal()
    svc = service(repo, journal)
    inst = await svc.create_workflow(MIXED, "weird")
    await repo.create_task_instance(inst.id, TaskInsert(task_type="A", status="weird", node_context={}))
    with caplog.at_level(logging.DEBUG, logger="asyncflow.engine"):
        for _ in range(3):
            assert (await svc.run_workflow(inst.id)).status == "running"
    said = [r for r in caplog.records if "does not run" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "node A of instance" in said[0].getMessage() and "'weird'" in said[0].getMessage()
    assert said[0].task_type == "A" and said[0].status == "weird"  # type: ignore[attr-defined]
    rows = await rows_by_type(repo, inst.id)
    assert rows["A"].status == "weird" and set(rows) == {"root", "A"}
    assert journal.entries == []
    await svc.restart_workflow_node(inst.id, "A")
    while (await svc.run_workflow(inst.id)).status != "completed":
        pass
    assert set(await rows_by_type(repo, inst.id)) == ALL_ROWS


async def test_an_instance_status_nobody_knows_runs_no_worker(repo: Any) -> None:
    """An instance whose status is not an asyncflow status (a newer version's, a hand edit) is returned
    unchanged by a pass, like a terminal one: no worker runs for an instance no write could advance."""
    journal = Journal()
    svc = service(repo, journal)
    inst = await svc.create_workflow(MIXED, "bogus")
    await repo.update_workflow_instances(InstanceWhere(ids=(inst.id,)), InstanceFields(status="bogus"))
    before = await snapshot(repo)
    assert (await svc.run_workflow(inst.id)).status == "bogus"
    assert journal.entries == [], "no worker ran"
    after = await snapshot(repo)
    assert after.instances[0].lease_epoch == before.instances[0].lease_epoch + 1  # the pass began
    assert without_epochs(after) == without_epochs(before)  # and wrote nothing else


@pytest.mark.parametrize("backend_sql", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_corrupt_context_documents_read_as_empty_and_the_run_goes_on(
    backend_sql: str, tmp_path: Any, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    """A context column holding invalid JSON (SQLite) or JSON that is not an object (PostgreSQL jsonb)
    reads as ``{}`` with a WARNING naming the column and row; passes go on and complete the instance;
    other instances are untouched."""
    from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
    from tests.conftest import isolated_pg_engine

    if backend_sql == "sqlite":
        sql_repo = SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/corrupt.db")
        await _corrupt_run(sql_repo, ["'{not json'", "'[1, 2'"], caplog)
        return
    url = request.getfixturevalue("pg_url")
    async with isolated_pg_engine(url) as engine:
        await _corrupt_run(SQLAlchemyWorkflowRepo(engine), ["'[1, 2]'::jsonb", "'\"text\"'::jsonb"], caplog)


async def _corrupt_run(repo: Any, documents: list[str], caplog: pytest.LogCaptureFixture) -> None:
    await repo.create_schema()
    try:
        journal = Journal()
        svc = service(repo, journal)
        bystander = await svc.create_workflow(MIXED, "bystander", context={"keep": 1}, run=True)
        victim = await svc.create_workflow(MIXED, "victim", context={"keep": 2}, run=True)
        before = await snapshot(repo)
        kept = [i for i in before.instances if i.id == bystander.id] + [
            t for t in before.tasks if t.workflow_instance_id == bystander.id
        ]
        rows = await rows_by_type(repo, victim.id)
        assert rows["B"].status == "pending"
        async with repo.engine.begin() as conn:
            await conn.execute(
                text(f"UPDATE workflow_instance SET workflow_context = {documents[0]} WHERE id = :i"),
                {"i": victim.id},
            )
            await conn.execute(
                text(f"UPDATE task_instance SET node_context = {documents[1]} WHERE id = :i"),
                {"i": rows["B"].id},
            )
        with caplog.at_level(logging.WARNING, logger="asyncflow.store._json"):
            while (await svc.run_workflow(victim.id)).status != "completed":
                pass
        warnings = [r.getMessage() for r in caplog.records if r.name == "asyncflow.store._json"]
        assert any(f"row {victim.id}" in m and "workflow_context" in m for m in warnings)
        assert any(f"row {rows['B'].id}" in m and "node_context" in m for m in warnings)
        after = await rows_by_type(repo, victim.id)
        assert set(after) == ALL_ROWS and {r.status for r in after.values()} == {"completed"}
        assert after["F"].node_context["workflow_context"] == {}  # the corrupt document read as {}
        assert journal.done(victim.id, "B", "run") == 1, "a pending node is not run again"
        now = await snapshot(repo)
        assert [i for i in now.instances if i.id == bystander.id] + [
            t for t in now.tasks if t.workflow_instance_id == bystander.id
        ] == kept
    finally:
        await repo.aclose()


def _nested(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return {"deep": value}  # ``depth`` levels


@pytest.mark.parametrize("depth", [150, 500])
async def test_a_stored_context_too_deep_fails_its_instance_once_with_the_reason(
    repo: Any, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Contexts written past the service's depth check (an older version, a hand edit, a worker) would
    fail every pass with RecursionError: the next pass fails the instance with an ERROR naming the
    document; other instances run on."""
    journal = Journal()
    svc = service(repo, journal)
    [deep_workflow] = await repo.create_workflow_instances(
        [NewWorkflowInstance(workflow_type=MIXED, business_id="deep-wf", workflow_context=_nested(depth))]
    )
    deep_node = await svc.create_workflow(MIXED, "deep-node", run=True)
    rows = await rows_by_type(repo, deep_node.id)
    changed = await repo.update_task_instances(
        TaskWhere(ids=(rows["B"].id,)), TaskFields(node_context={"node_event": _nested(depth)})
    )
    assert changed == 1
    good = await svc.create_workflow(MIXED, "good")
    with caplog.at_level(logging.ERROR, logger="asyncflow.engine"):
        for instance_id in (deep_workflow, deep_node.id, good.id):
            for _ in range(50):  # a few passes complete "good"; the deep ones fail at their first
                if (await svc.run_workflow(instance_id)).status != "running":
                    break
    statuses = {
        i: (await svc.get_workflow_instance(i)).status for i in (deep_workflow, deep_node.id, good.id)
    }
    assert statuses == {deep_workflow: "failed", deep_node.id: "failed", good.id: "completed"}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"instance {deep_workflow} fails: the workflow context is nested" in m for m in errors)
    assert any(f"instance {deep_node.id} fails: the context of node 'B' is nested" in m for m in errors)
    assert journal.done(deep_workflow, "A", "run") == 0, "no worker ran on a context it cannot use"
