"""Group commit on PostgreSQL: concurrent steps share statements, each applied (or not) on its own."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import text

from asyncflow.errors import StoreError
from asyncflow.records import NewWorkflowInstance, Step, TaskUpdate
from asyncflow.store.commit_counter import CommitCounter
from asyncflow.store.postgres import sql as pg
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine

from .pg_hot_helpers import (
    BLOCKED_BY_ME,
    add_refusing_trigger,
    add_trigger,
    instance_with,
    new,
    task,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
def repo(pg_repo: SQLAlchemyWorkflowRepo) -> SQLAlchemyWorkflowRepo:
    return pg_repo


@contextmanager
def runner_batches(batcher: Any, *, least: int = 1) -> Iterator[list[int]]:
    """The size of every batch of at least ``least`` items ``batcher`` hands its runner meanwhile."""
    assert batcher is not None
    sizes: list[int] = []
    original = batcher._runner

    async def counted(batch: Any) -> Any:
        if len(batch) >= least:
            sizes.append(len(batch))
        return await original(batch)

    batcher._runner = counted
    try:
        yield sizes
    finally:
        batcher._runner = original


def batch_sizes(repo: SQLAlchemyWorkflowRepo) -> Any:
    """The size of every multi-step statement the repo's step batcher sends meanwhile."""
    return runner_batches(repo._backend._step_batcher, least=2)


async def test_concurrent_steps_share_statements_and_get_their_own_rows(repo: SQLAlchemyWorkflowRepo) -> None:
    made = [await instance_with(repo, "a") for _ in range(40)]
    steps = [
        Step(
            instance_id=instance_id,
            instance_status="running",
            updates=(
                TaskUpdate(id=rows["a"].id, expected_version=1, status="completed", node_context={"i": i}),
            ),
            inserts=(task(f"b{i}"), task("c")),
        )
        for i, (instance_id, rows) in enumerate(made)
    ]
    with batch_sizes(repo) as sizes, CommitCounter(repo.engine) as counter:
        results = await asyncio.gather(*(repo.apply_step(step) for step in steps))
    assert sizes and max(sizes) > 1 and sum(sizes) <= len(steps)  # some steps went together
    assert counter.commits == len(steps)  # each applied step counts as one write
    for i, ((instance_id, _), result) in enumerate(zip(made, results, strict=True)):
        loaded = await repo.load_task_instances(instance_id)
        assert result.applied and list(result.inserted) == loaded[1:]
        assert [(r.task_type, r.status, r.node_context) for r in loaded] == [
            ("a", "completed", {"i": i}),
            (f"b{i}", "running", {"n": f"b{i}"}),
            ("c", "running", {"n": "c"}),
        ]


async def test_one_batch_applies_conflicts_and_failures_step_by_step(repo: SQLAlchemyWorkflowRepo) -> None:
    import asyncpg

    await add_refusing_trigger(repo.engine)
    batcher = repo._backend._step_batcher
    assert batcher is not None
    batcher._slots = 1  # one statement in flight: the others queue behind it and go together
    blocker_id, _ = await instance_with(repo)
    ok_id, ok_rows = await instance_with(repo, "a")
    stale_id, stale_rows = await instance_with(repo, "a")
    refused_id, refused_rows = await instance_with(repo, "a")
    ok = Step(instance_id=ok_id, updates=(TaskUpdate(id=ok_rows["a"].id, expected_version=1, status="done"),))
    stale = Step(
        instance_id=stale_id,
        updates=(TaskUpdate(id=stale_rows["a"].id, expected_version=5, status="done"),),
        inserts=(task("never"),),
    )
    refused = Step(
        instance_id=refused_id,
        updates=(TaskUpdate(id=refused_rows["a"].id, expected_version=1, status="done"),),
        inserts=(task("refused"),),
    )
    also_ok = Step(instance_id=ok_id, inserts=(task("b"),))  # the same instance, after `ok`
    with batch_sizes(repo) as sizes:
        async with repo.engine.connect() as other, other.begin():
            await other.execute(
                text("SELECT 1 FROM workflow_instance WHERE id = :i FOR UPDATE"), {"i": blocker_id}
            )
            first = asyncio.create_task(repo.apply_step(Step(instance_id=blocker_id, inserts=(task("x"),))))
            while not (await other.execute(BLOCKED_BY_ME)).scalars().all():
                await asyncio.sleep(0.01)
            queued = [asyncio.create_task(repo.apply_step(s)) for s in (ok, stale, refused, also_ok)]
            await asyncio.sleep(0.05)
        results = await asyncio.gather(first, *queued, return_exceptions=True)
    assert sizes == [4]
    assert [getattr(r, "applied", None) for r in results] == [True, True, False, None, True]
    failure = results[3]
    assert isinstance(failure, StoreError) and "refused node" in str(failure)
    assert isinstance(failure.__cause__, asyncpg.PostgresError)  # the step's own error, run alone
    assert [(r.task_type, r.status) for r in await repo.load_task_instances(ok_id)] == [
        ("a", "done"),
        ("b", "running"),
    ]
    assert await repo.load_task_instances(stale_id) == [stale_rows["a"]]
    assert await repo.load_task_instances(refused_id) == [refused_rows["a"]]
    refused_instance = await repo.get_workflow_instance(refused_id)
    assert refused_instance is not None and refused_instance.version == 1


async def test_a_batch_whose_steps_all_apply_needs_no_subtransaction(
    repo: SQLAlchemyWorkflowRepo, caplog: pytest.LogCaptureFixture
) -> None:
    # without the batch function (its subtransaction per step), steps that all apply still go
    # together: one statement calls the step function for each of them
    async with repo.engine.begin() as conn:
        await conn.execute(text("DROP FUNCTION asyncflow_steps_v1"))
    made = [await instance_with(repo, "a") for _ in range(40)]
    steps = [
        Step(
            instance_id=instance_id,
            updates=(TaskUpdate(id=rows["a"].id, expected_version=1, status="completed"),),
            inserts=(task(f"b{i}"),),
        )
        for i, (instance_id, rows) in enumerate(made)
    ]
    logged = caplog.at_level(logging.DEBUG, logger="asyncflow.store.postgres.batches")
    with batch_sizes(repo) as sizes, logged:
        results = await asyncio.gather(*(repo.apply_step(step) for step in steps))
    assert sizes and max(sizes) > 1  # some went together, and none needed the batch function
    assert not [r.getMessage() for r in caplog.records]  # no fallback: no warning, no "each runs alone"
    for i, ((instance_id, _), result) in enumerate(zip(made, results, strict=True)):
        loaded = await repo.load_task_instances(instance_id)
        assert result.applied and list(result.inserted) == loaded[1:]
        assert [(r.task_type, r.status, r.version) for r in loaded] == [
            ("a", "completed", 2),
            (f"b{i}", "running", 1),
        ]


async def test_without_the_batch_function_steps_go_one_by_one(
    repo: SQLAlchemyWorkflowRepo, caplog: pytest.LogCaptureFixture
) -> None:
    async with repo.engine.begin() as conn:
        await conn.execute(text("DROP FUNCTION asyncflow_steps_v1"))
    made = [await instance_with(repo) for _ in range(20)]
    with caplog.at_level(logging.WARNING, logger="asyncflow.store.postgres.batches"):
        results = await asyncio.gather(
            *(repo.apply_step(Step(instance_id=i, inserts=(task("a"),))) for i, _ in made),
            *(repo.apply_step(Step(instance_id=i, inserts=(task("a"),))) for i, _ in made),
        )
    assert sorted(r.applied for r in results) == [False] * 20 + [True] * 20  # each instance: one of two
    assert len([r for r in caplog.records if "asyncflow_steps_v1" in r.getMessage()]) == 1
    for instance_id, _ in made:
        assert [r.task_type for r in await repo.load_task_instances(instance_id)] == ["a"]


async def test_concurrent_creates_share_statements_and_get_their_own_ids(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    news = [new(f"c{i}") for i in range(70)]
    with runner_batches(repo._backend._creates) as sizes, CommitCounter(repo.engine) as counter:
        made = await asyncio.gather(*(repo.create_workflow_instance(item) for item in news))
    assert max(sizes) > 1 and sum(sizes) == 70 and len(sizes) < 70
    assert counter.commits == 70  # each create still counts as one write
    assert len({item.id for item in made}) == 70
    for i, item in enumerate(made):
        assert item.business_id == f"c{i}"
        assert await repo.get_workflow_instance(item.id) == item


async def test_a_refused_create_in_a_batch_fails_alone(repo: SQLAlchemyWorkflowRepo) -> None:
    await add_trigger(
        repo.engine,
        "workflow_instance",
        "refuse_instance",
        "IF NEW.business_id = 'refused' THEN RAISE EXCEPTION 'refused instance'; END IF;",
    )
    names = ["ok-1", "refused", "ok-2", "ok-3"]
    with runner_batches(repo._backend._creates) as sizes:
        results = await asyncio.gather(
            *(repo.create_workflow_instance(new(name)) for name in names), return_exceptions=True
        )
    assert sizes[0] == 4  # they went together first, then each alone
    failure = results[1]
    assert isinstance(failure, StoreError) and "refused instance" in str(failure)
    made = [r for r in results if not isinstance(r, BaseException)]
    assert [r.business_id for r in made] == ["ok-1", "ok-2", "ok-3"]
    for item in made:
        assert await repo.get_workflow_instance(item.id) == item
    async with repo.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM workflow_instance"))).scalar() == 3


async def test_a_bulk_create_goes_in_several_statements_past_the_context_limit(
    repo: SQLAlchemyWorkflowRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page's contexts travel in one jsonb array, which PostgreSQL caps at 256 MiB in all: past
    CREATE_CONTEXT_CHARS (lowered here) the page goes in several statements of one transaction."""
    monkeypatch.setattr(pg, "CREATE_CONTEXT_CHARS", 100)
    news = [
        NewWorkflowInstance(workflow_type="wf", business_id=f"big-{i}", workflow_context={"s": "x" * 40})
        for i in range(7)
    ]
    statements: list[int] = []
    original = pg.create_instances

    async def counted(db: Any, rows: Any) -> Any:
        statements.append(len(rows))
        return await original(db, rows)

    monkeypatch.setattr(pg, "create_instances", counted)
    ids = await repo.create_workflow_instances(news)
    assert statements == [2, 2, 2, 1]  # 48 characters of context each: two fit in 100
    for i, instance_id in enumerate(ids):  # in input order
        made = await repo.get_workflow_instance(instance_id)
        assert made is not None and made.business_id == f"big-{i}"
        assert made.workflow_context == {"s": "x" * 40}

    await add_trigger(
        repo.engine,
        "workflow_instance",
        "refuse_instance",
        "IF NEW.business_id = 'late-5' THEN RAISE EXCEPTION 'refused instance'; END IF;",
    )
    late = [
        NewWorkflowInstance(workflow_type="wf", business_id=f"late-{i}", workflow_context={"s": "x" * 40})
        for i in range(7)
    ]
    with pytest.raises(StoreError, match="refused instance"):  # the third statement fails
        await repo.create_workflow_instances(late)
    async with repo.engine.connect() as conn:  # one transaction: the first two statements' rows too
        query = text("SELECT count(*) FROM workflow_instance WHERE business_id LIKE 'late-%'")
        assert (await conn.execute(query)).scalar() == 0


async def test_concurrent_state_reads_share_statements(repo: SQLAlchemyWorkflowRepo) -> None:
    made = [await instance_with(repo, "a", "b") for _ in range(40)]
    with runner_batches(repo._backend._reads) as sizes:
        states = await asyncio.gather(*(repo.load_instance_state(i) for i, _ in made))
    assert max(sizes) > 1 and sum(sizes) == 40
    for (instance_id, rows), state in zip(made, states, strict=True):
        assert state == (await repo.get_workflow_instance(instance_id), [rows["a"], rows["b"]])


async def test_creates_and_reads_of_a_closed_repo_are_store_errors(repo: SQLAlchemyWorkflowRepo) -> None:
    instance_id, _ = await instance_with(repo)
    await repo.aclose()
    with pytest.raises(StoreError, match="closed"):
        await repo.create_workflow_instance(new())
    with pytest.raises(StoreError, match="closed"):
        await repo.load_instance_state(instance_id)


async def test_a_create_batch_whose_connection_the_server_ends_fails_whole_then_creates_work(
    postgres_url: str,
) -> None:
    name = f"asyncflow-test-{uuid.uuid4().hex[:12]}"  # end this repo's batch, never another test's
    async with isolated_pg_engine(postgres_url, application_name=name) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        try:
            await repo.create_schema()
            await _end_a_create_batch(repo, name)
        finally:
            await repo.aclose()


async def _end_a_create_batch(repo: SQLAlchemyWorkflowRepo, name: str) -> None:
    await add_trigger(
        repo.engine,
        "workflow_instance",
        "slow_instance",
        "IF NEW.business_id = 'slow' THEN PERFORM pg_sleep(0.5); END IF;",
    )
    terminated: list[int] = []

    async def end_the_batchs_backend() -> None:
        async with repo.engine.connect() as conn:
            while not terminated:
                found = await conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE state = 'active' "
                        "AND query LIKE 'WITH r AS (SELECT nextval%jsonb_array_elements%"
                        "INSERT INTO workflow_instance%' "
                        "AND application_name = :name"
                    ),
                    {"name": name},
                )
                for pid in found.scalars().all():
                    await conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                    terminated.append(pid)
                await conn.rollback()  # pg_stat_activity is a snapshot per transaction: take a new one
                await asyncio.sleep(0.01)

    killer = asyncio.create_task(end_the_batchs_backend())
    async with asyncio.timeout(20):
        results = await asyncio.gather(
            *(repo.create_workflow_instance(new(name)) for name in ("a", "slow", "b")),
            return_exceptions=True,
        )
        await killer
    assert terminated  # the server ended the batch's connection mid-statement
    assert all(isinstance(r, StoreError) for r in results)  # every caller, as for a single statement
    async with repo.engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM workflow_instance"))).scalar() == 0
    made = await asyncio.gather(*(repo.create_workflow_instance(new(f"c{i}")) for i in range(5)))
    assert [m.business_id for m in made] == [f"c{i}" for i in range(5)]  # the dead lane was dropped
