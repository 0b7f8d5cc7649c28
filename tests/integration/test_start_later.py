"""create_workflow(start_at=, start_in=): stored now, run by no driver before its time, on every backend;
the claim reads due rows only (PostgreSQL EXPLAIN); bad start arguments write nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text

from asyncflow.driver import WorkflowDriver
from asyncflow.errors import ParamInvalidError
from asyncflow.records import NewWorkflowInstance
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.integration.pg_hot_helpers import claim_plans, plan_nodes
from tests.integration.start_helpers import fake_service, one_node_registry


async def test_a_delayed_instance_waits_for_its_time_then_runs(engine_repo: Any) -> None:
    ran: list[int] = []
    service, clock = fake_service(engine_repo, one_node_registry("w", ran=ran))
    later = await service.create_workflow("w", "later", start_in=60)
    at = await service.create_workflow(
        "w", "at", start_at=datetime.fromtimestamp(clock.time() + 120, timezone(timedelta(hours=2)))
    )
    now = await service.create_workflow("w", "now")
    stored = await engine_repo.get_workflow_instance(later.id)
    assert stored.next_run_at == int(clock.time() * 1000) + 60_000
    driver = WorkflowDriver(service, poll_interval=0.05)
    await driver.run_until_idle()
    assert ran == [now.id]
    clock.advance(59)
    await driver.run_until_idle()
    assert ran == [now.id]
    clock.advance(1.5)
    await driver.run_until_idle()
    assert ran == [now.id, later.id]
    clock.advance(60)
    await driver.run_until_idle()
    assert ran == [now.id, later.id, at.id]
    assert (await service.get_workflow_instance(at.id)).status == "completed"


async def test_start_in_takes_a_timedelta_and_run_workflow_overrides_the_delay(engine_repo: Any) -> None:
    ran: list[int] = []
    service, _ = fake_service(engine_repo, one_node_registry("w", ran=ran))
    inst = await service.create_workflow("w", "b", start_in=timedelta(hours=1))
    assert (await service.run_workflow(inst.id)).status == "completed"
    assert ran == [inst.id]


async def test_a_start_in_the_past_or_now_is_due_at_once(engine_repo: Any) -> None:
    ran: list[int] = []
    service, clock = fake_service(engine_repo, one_node_registry("w", ran=ran))
    past = await service.create_workflow("w", "p", start_at=datetime.fromtimestamp(clock.time() - 5, UTC))
    zero = await service.create_workflow("w", "z", start_in=0)
    await WorkflowDriver(service, poll_interval=0.05).run_until_idle()
    assert sorted(ran) == [past.id, zero.id]
    assert (await service.create_workflow("w", "r", start_in=0, run=True)).status == "completed"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"start_at": datetime(2030, 1, 1)}, "timezone-aware"),
        ({"start_at": "2030-01-01T00:00:00Z"}, "datetime"),
        ({"start_in": 5, "start_at": datetime(2030, 1, 1, tzinfo=UTC)}, "not both"),
        ({"start_in": -1}, ">= 0"),
        ({"start_in": float("nan")}, ">= 0"),
        ({"start_in": float("inf")}, ">= 0"),
        ({"start_in": True}, "timedelta"),
        ({"start_in": "10"}, "timedelta"),
        ({"start_in": timedelta(seconds=-3)}, ">= 0"),
        ({"start_in": 10, "run": True}, "future"),
    ],
)
async def test_bad_start_arguments_raise_and_write_nothing(kwargs: dict[str, Any], words: str) -> None:
    repo = MemoryWorkflowRepo()
    service, _ = fake_service(repo, one_node_registry("w"))
    with pytest.raises(ParamInvalidError, match=words):
        await service.create_workflow("w", "b", **kwargs)
    assert await service.count_workflow_instances() == 0


async def test_the_claim_reads_due_rows_only_with_10000_delayed_instances(pg_engine: Any) -> None:
    repo = SQLAlchemyWorkflowRepo(pg_engine)
    await repo.migrate()
    try:
        now_ms = 1_800_000_000_000
        future = [
            NewWorkflowInstance(
                workflow_type="w", business_id=f"f{i}", workflow_context={}, next_run_at=now_ms + 1000 + i
            )
            for i in range(10_000)
        ]
        await repo.create_workflow_instances(future)
        due = [
            NewWorkflowInstance(
                workflow_type="w", business_id=f"d{i}", workflow_context={}, next_run_at=now_ms - 1000 + i
            )
            for i in range(1000)
        ]
        due_ids = await repo.create_workflow_instances(due)
        async with pg_engine.connect() as conn:
            await conn.execute(text("ANALYZE workflow_instance"))
            plan = (
                await conn.execute(
                    text(
                        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT id FROM workflow_instance "
                        "WHERE status IN ('init', 'running') AND next_run_at <= :now "
                        "ORDER BY next_run_at, id LIMIT 64"
                    ),
                    {"now": now_ms},
                )
            ).scalar_one()
        plan = plan if isinstance(plan, list) else json.loads(plan)
        scans = list(plan_nodes(plan[0]["Plan"]))
        scan = next(node for node in scans if "Index Name" in node)
        assert scan["Index Name"] == "ix_workflow_instance_due"
        assert "next_run_at <=" in scan["Index Cond"]
        assert scan["Actual Rows"] <= 1000  # due rows only: the 10,000 future rows are never read
        # the claim function's own statements, as it runs them (rolled back)
        claim = await claim_plans(pg_engine, now_ms, 64, now_ms + 1000, None, analyze=True)
        scanned = [n for p in claim for n in plan_nodes(p["Plan"]) if n["Node Type"].endswith("Scan")]
        assert scanned and "Seq Scan" not in {n["Node Type"] for n in scanned}, scanned
        # every scan reads due rows only (never one of the 10,000 delayed rows)
        assert all(n["Actual Rows"] <= 1000 for n in scanned), [
            (n["Node Type"], n["Actual Rows"]) for n in scanned
        ]
        claimed = await repo.claim_due_instances(now_ms=now_ms, limit=64, lease_ms=1000)
        assert claimed == due_ids[:64]  # oldest due first
    finally:
        await repo.aclose()
