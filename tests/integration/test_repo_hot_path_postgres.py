"""The PostgreSQL hot path: the step function, its fallback, kept connections (lanes) and their failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from asyncflow.errors import StoreError
from asyncflow.records import NewWorkflowInstance, Step, TaskInsert, TaskInstanceRecord, TaskUpdate
from asyncflow.store.commit_counter import CommitCounter
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine

pytestmark = pytest.mark.postgres


def new(business_id: str = "b") -> NewWorkflowInstance:
    return NewWorkflowInstance(workflow_type="wf", business_id=business_id, workflow_context={})


def task(task_type: str, status: str = "running") -> TaskInsert:
    return TaskInsert(task_type=task_type, status=status, node_context={"n": task_type})


@pytest.fixture
async def repo(pg_engine: AsyncEngine) -> AsyncIterator[SQLAlchemyWorkflowRepo]:
    made = SQLAlchemyWorkflowRepo(pg_engine)
    await made.create_schema()
    yield made
    await made.aclose()


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


async def add_refusing_trigger(engine: AsyncEngine) -> None:
    """A trigger that fails the insert of a node row of type ``refused``."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE FUNCTION refuse_node() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.task_type = 'refused' THEN RAISE EXCEPTION 'refused node'; END IF; RETURN NEW; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER refuse BEFORE INSERT ON task_instance"
                " FOR EACH ROW EXECUTE FUNCTION refuse_node()"
            )
        )


# pg_locks, not pg_stat_activity: the latter is a snapshot taken once per transaction
BLOCKED_BY_ME = text(
    "SELECT pid FROM pg_locks WHERE NOT granted AND pg_backend_pid() = ANY (pg_blocking_pids(pid))"
)


async def test_a_step_is_one_function_call_that_rolls_back_whole_on_a_version_conflict(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    assert await function_exists(repo.engine)
    instance_id, rows = await instance_with(repo, "a", "b")
    before = await repo.load_task_instances(instance_id)
    with statements(repo.engine) as seen, CommitCounter(repo.engine) as counter:
        result = await repo.apply_step(partly_applicable_step(instance_id, rows))
        assert not result.applied and result.inserted == ()
        good = Step(
            instance_id=instance_id, updates=(TaskUpdate(id=rows["a"].id, expected_version=1, status="x"),)
        )
        assert (await repo.apply_step(good)).applied
    assert seen == []  # neither step went through SQLAlchemy: one asyncpg statement each
    assert counter.commits == 1  # the applied one
    after = await repo.load_task_instances(instance_id)
    assert [(r.task_type, r.status, r.version) for r in after] == [("a", "x", 2), ("b", "running", 1)]
    assert after[1] == before[1]
    instance = await repo.get_workflow_instance(instance_id)
    assert instance is not None and (instance.version, instance.next_run_at) == (2, 0)


async def test_a_conflict_inside_a_transaction_rolls_back_only_the_step(repo: SQLAlchemyWorkflowRepo) -> None:
    instance_id, rows = await instance_with(repo, "a", "b")
    with statements(repo.engine) as seen:
        async with repo.transaction():
            first = await repo.create_workflow_instance(new("first"))
            assert not (await repo.apply_step(partly_applicable_step(instance_id, rows))).applied
            ok = await repo.apply_step(Step(instance_id=instance_id, inserts=(task("c"),)))
            assert ok.applied and [r.task_type for r in ok.inserted] == ["c"]
            second = await repo.create_workflow_instance(new("second"))
    assert sum("asyncflow_step_v1" in s for s in seen) == 2  # the function, in a SAVEPOINT each
    assert sum(s.startswith("SAVEPOINT") for s in seen) == 2
    assert await repo.get_workflow_instance(first.id) == first
    assert await repo.get_workflow_instance(second.id) == second
    loaded = await repo.load_task_instances(instance_id)
    assert [(r.task_type, r.status, r.version) for r in loaded] == [
        ("a", "running", 1),
        ("b", "running", 1),
        ("c", "running", 1),
    ]
    assert loaded[2] == ok.inserted[0]


async def test_create_schema_installs_the_function_on_an_existing_database(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    async with repo.engine.begin() as conn:
        await conn.execute(text("DROP FUNCTION asyncflow_step_v1"))
    assert not await function_exists(repo.engine)
    await repo.create_schema()  # a database made before the function existed (schema version 1)
    assert await function_exists(repo.engine)
    async with repo.engine.connect() as conn:
        versions = (await conn.execute(text("SELECT version FROM asyncflow_schema"))).scalars().all()
    assert versions == [1]


async def test_without_the_function_steps_fall_back_to_core_statements(
    repo: SQLAlchemyWorkflowRepo, caplog: pytest.LogCaptureFixture
) -> None:
    async with repo.engine.begin() as conn:
        await conn.execute(text("DROP FUNCTION asyncflow_step_v1"))  # a schema made by migrations alone
    instance_id, rows = await instance_with(repo, "a", "b")
    with caplog.at_level(logging.WARNING, logger="asyncflow.store._hot"):
        assert not (await repo.apply_step(partly_applicable_step(instance_id, rows))).applied
        done = await repo.apply_step(Step(instance_id=instance_id, inserts=(task("c"),)))
        async with repo.transaction():
            inside = await repo.apply_step(Step(instance_id=instance_id, inserts=(task("d"),)))
            assert not (await repo.apply_step(Step(instance_id=instance_id, inserts=(task("d"),)))).applied
    assert done.applied and inside.applied
    warnings = [r for r in caplog.records if "asyncflow_step_v1" in r.getMessage()]
    assert len(warnings) == 1 and "create_schema()" in warnings[0].getMessage()
    loaded = await repo.load_task_instances(instance_id)
    assert [(r.task_type, r.version) for r in loaded] == [("a", 1), ("b", 1), ("c", 1), ("d", 1)]
    await repo.create_schema()  # installs it: the fast path is back
    with statements(repo.engine) as seen:
        assert (await repo.apply_step(Step(instance_id=instance_id, inserts=(task("e"),)))).applied
    assert seen == []


async def test_a_trigger_failure_mid_step_is_a_store_error_and_writes_nothing(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    import asyncpg

    await add_refusing_trigger(repo.engine)
    instance_id, rows = await instance_with(repo, "a")
    step = Step(
        instance_id=instance_id,
        instance_status="running",
        updates=(TaskUpdate(id=rows["a"].id, expected_version=1, status="completed"),),
        inserts=(task("fine"), task("refused")),
    )
    with pytest.raises(StoreError, match="refused node") as caught:
        await repo.apply_step(step)
    assert isinstance(caught.value.__cause__, asyncpg.PostgresError)
    assert await repo.load_task_instances(instance_id) == [rows["a"]]
    instance = await repo.get_workflow_instance(instance_id)
    assert instance is not None and (instance.status, instance.version) == ("init", 1)


async def test_an_idle_repo_holds_no_connection(repo: SQLAlchemyWorkflowRepo) -> None:
    made = await asyncio.gather(*(repo.create_workflow_instance(new(str(i))) for i in range(30)))
    await asyncio.gather(*(repo.get_workflow_instance(m.id) for m in made))
    pool = cast(QueuePool, repo.engine.pool)
    assert pool.checkedout() == 0
    assert pool.checkedin() >= 2  # calls ran side by side, and their connections went back


async def test_concurrent_calls_never_take_the_whole_pool(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url, pool_size=4, max_overflow=0, pool_timeout=5) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        peak = 0

        def checked_out(*args: Any) -> None:
            nonlocal peak
            peak = max(peak, cast(QueuePool, engine.pool).checkedout())

        event.listen(engine.sync_engine.pool, "checkout", checked_out)
        made = await asyncio.gather(*(repo.create_workflow_instance(new(str(i))) for i in range(40)))
        busy = asyncio.gather(*(repo.get_workflow_instance(m.id) for m in made * 5))
        async with repo.transaction():  # needs a connection of its own while the hot path is busy
            await repo.create_workflow_instance(new("in-transaction"))
        assert all(record is not None for record in await busy)
        await repo.aclose()
    assert 3 <= peak <= 4  # at most three lanes: one connection is always left for the transaction


async def test_a_step_cancelled_while_waiting_on_a_row_lock_lands_whole_or_not_at_all(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    made = await repo.create_workflow_instance(new())
    step = Step(instance_id=made.id, instance_status="running", inserts=(task("a"),))
    async with repo.engine.connect() as other, other.begin():
        await other.execute(
            text("UPDATE workflow_instance SET business_id = 'x' WHERE id = :i"), {"i": made.id}
        )
        pending = asyncio.create_task(repo.apply_step(step))
        while not (waiting := (await other.execute(BLOCKED_BY_ME)).scalars().all()):
            await asyncio.sleep(0.01)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await other.rollback()
    still = text(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY (CAST(:p AS int[])) AND state = 'active'"
    )
    while True:  # the statement, if the server did not cancel it, finishing (a fresh snapshot each time)
        async with repo.engine.connect() as conn:
            if not (await conn.execute(still, {"p": waiting})).scalar_one():
                break
        await asyncio.sleep(0.01)
    rows = await repo.load_task_instances(made.id)
    instance = await repo.get_workflow_instance(made.id)
    assert instance is not None
    landed = ([r.task_type for r in rows], instance.status, instance.version)
    assert landed in ((["a"], "running", 2), ([], "init", 1))  # one statement: all of it or none
    again = await repo.apply_step(Step(instance_id=made.id, inserts=(task("b"),)))
    assert again.applied  # the interrupted connection was replaced


async def test_a_server_dropped_connection_is_one_store_error_then_the_pool_recovers(
    postgres_url: str,
) -> None:
    async with isolated_pg_engine(postgres_url, pool_size=4, max_overflow=0) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        made = await asyncio.gather(*(repo.create_workflow_instance(new(str(i))) for i in range(12)))
        pids = []
        conns = [await engine.connect() for _ in range(4)]  # every pooled connection
        for conn in conns:
            pids.append((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            await conn.close()
        async with isolated_pg_engine(postgres_url) as admin, admin.connect() as conn:
            await conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:p AS int[])) AS pid"), {"p": pids}
            )
        with pytest.raises(StoreError) as caught:
            await repo.get_workflow_instance(made[0].id)
        assert caught.value.__cause__ is not None
        assert await repo.get_workflow_instance(made[0].id) == made[0]  # the older connections aged out
        await repo.aclose()


# ------------------------------------------------------------------------------------- group commit


@contextmanager
def batch_sizes(repo: SQLAlchemyWorkflowRepo) -> Iterator[list[int]]:
    """The size of every multi-step statement the repo's batcher sends meanwhile."""
    batcher = repo._hot.batcher
    assert batcher is not None
    sizes: list[int] = []
    original = batcher._call

    async def counted(batch: Any) -> Any:
        sizes.append(len(batch))
        return await original(batch)

    batcher._call = counted  # type: ignore[method-assign]
    try:
        yield sizes
    finally:
        batcher._call = original  # type: ignore[method-assign]


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
    batcher = repo._hot.batcher
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


async def test_without_the_batch_function_steps_go_one_by_one(
    repo: SQLAlchemyWorkflowRepo, caplog: pytest.LogCaptureFixture
) -> None:
    async with repo.engine.begin() as conn:
        await conn.execute(text("DROP FUNCTION asyncflow_steps_v1"))
    made = [await instance_with(repo) for _ in range(20)]
    with caplog.at_level(logging.WARNING, logger="asyncflow.store._pg_batch"):
        results = await asyncio.gather(
            *(repo.apply_step(Step(instance_id=i, inserts=(task("a"),))) for i, _ in made),
            *(repo.apply_step(Step(instance_id=i, inserts=(task("a"),))) for i, _ in made),
        )
    assert sorted(r.applied for r in results) == [False] * 20 + [True] * 20  # each instance: one of two
    assert len([r for r in caplog.records if "asyncflow_steps_v1" in r.getMessage()]) == 1
    for instance_id, _ in made:
        assert [r.task_type for r in await repo.load_task_instances(instance_id)] == ["a"]
