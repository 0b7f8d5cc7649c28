"""The PostgreSQL hot path: the step function, its fallback, kept connections (lanes) and their failures."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
import warnings
from typing import Any, cast

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool

from asyncflow._held import HOLD_STEPS
from asyncflow.errors import StoreError
from asyncflow.records import Step, TaskUpdate
from asyncflow.store.commit_counter import CommitCounter
from asyncflow.store.postgres import functions as pg_functions
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.store.tables import SCHEMA_VERSION
from tests.conftest import isolated_pg_engine

from .pg_hot_helpers import (
    BLOCKED_BY_ME,
    add_refusing_trigger,
    function_exists,
    instance_with,
    new,
    partly_applicable_step,
    statements,
    task,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
def repo(pg_repo: SQLAlchemyWorkflowRepo) -> SQLAlchemyWorkflowRepo:
    return pg_repo


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
    await repo.create_schema()  # a database whose function was dropped: migrate() re-installs it
    assert await function_exists(repo.engine)
    async with repo.engine.connect() as conn:
        versions = (await conn.execute(text("SELECT version FROM asyncflow_schema"))).scalars().all()
    assert versions == list(range(1, SCHEMA_VERSION + 1))


async def test_a_migration_can_install_the_functions_itself(repo: SQLAlchemyWorkflowRepo) -> None:
    async with repo.engine.begin() as conn:
        await conn.execute(text("DROP FUNCTION asyncflow_steps_v1"))
        await conn.execute(text("DROP FUNCTION asyncflow_step_v1"))
        for ddl in pg_functions.ALL:  # as an Alembic migration would: op.execute(ddl)
            await conn.execute(text(ddl))
    assert await function_exists(repo.engine)
    instance_id, rows = await instance_with(repo, "a", "b")
    with statements(repo.engine) as seen:
        assert not (await repo.apply_step(partly_applicable_step(instance_id, rows))).applied
        assert (await repo.apply_step(Step(instance_id=instance_id, inserts=(task("c"),)))).applied
    assert seen == []


async def test_without_the_function_a_step_is_a_store_error_naming_migrate(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    async with repo.engine.begin() as conn:
        await conn.execute(text("DROP FUNCTION asyncflow_step_v1"))  # a schema made by other tools
    instance_id, _ = await instance_with(repo, "a", "b")
    with pytest.raises(StoreError, match=r"asyncflow_step_v1\(\).*repo\.migrate\(\)"):
        await repo.apply_step(Step(instance_id=instance_id, inserts=(task("c"),)))
    with pytest.raises(StoreError, match="migrate"):
        async with repo.transaction():
            await repo.apply_step(Step(instance_id=instance_id, inserts=(task("d"),)))
    loaded = await repo.load_task_instances(instance_id)
    assert [r.task_type for r in loaded] == ["a", "b"]  # nothing written
    await repo.migrate()  # installs it: steps work again
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


async def test_a_step_names_the_instance_s_status_and_due_time_only_when_it_changes_them(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    """The step function's ``UPDATE`` of the instance SETs ``status`` only when the step sets it, and
    ``next_run_at`` only when the step sets it or may make the instance runnable from a status that
    is not (then the driver's due trigger still sees an instance that became due): the row triggers
    ``AFTER UPDATE OF`` those columns (the finished and due NOTIFYs) are not even looked at by the
    other steps. The values written are the same as before."""
    async with repo.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE step_seen (n serial, col text)"))
        await conn.execute(
            text(
                "CREATE FUNCTION step_seen_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "INSERT INTO step_seen (col) VALUES (TG_ARGV[0]); RETURN NULL; END $$"
            )
        )
        for col in ("status", "next_run_at"):
            await conn.execute(
                text(
                    f"CREATE TRIGGER step_seen_{col} AFTER UPDATE OF {col} ON workflow_instance "
                    f"FOR EACH ROW EXECUTE FUNCTION step_seen_fn('{col}')"
                )
            )
    instance_id, _ = await instance_with(repo)
    start = await repo.get_workflow_instance(instance_id)
    assert start is not None

    async def step(**fields: Any) -> tuple[list[str], tuple[str, int, int]]:
        assert (await repo.apply_step(Step(instance_id=instance_id, **fields))).applied
        async with repo.engine.begin() as conn:
            seen = (await conn.execute(text("DELETE FROM step_seen RETURNING col"))).scalars().all()
        record = await repo.get_workflow_instance(instance_id)
        assert record is not None
        return sorted(seen), (record.status, record.next_run_at, record.version)

    assert await step(inserts=(task("a"),)) == ([], ("init", start.next_run_at, 2))
    assert await step(instance_status="running") == (["status"], ("running", start.next_run_at, 3))
    assert await step(next_run_at=123) == (["next_run_at"], ("running", 123, 4))
    assert await step(instance_status="completed", next_run_at=456) == (
        ["next_run_at", "status"],
        ("completed", 456, 5),
    )
    # back to a runnable status from one that is not (a repo-level step): the due time is named too
    revive = await step(instance_status_in=("completed",), instance_status="running")
    assert revive == (["next_run_at", "status"], ("running", 456, 6))
    assert await step(instance_status_in=(), instance_status="init") == (
        ["next_run_at", "status"],
        ("init", 456, 7),
    )
    assert await step(instance_status="failed") == (["status"], ("failed", 456, 8))


_FORMS = {  # the four forms of the step function's UPDATE of the instance
    "neither": {"inserts": (task("n"),)},
    "status": {"instance_status": "completed"},
    "next_run_at": {"next_run_at": 5},
    "both": {"instance_status": "completed", "next_run_at": 5},
    "reviving": {"instance_status": "running", "instance_status_in": ("init", "completed")},
}


@pytest.mark.parametrize("form", sorted(_FORMS))
async def test_every_form_of_the_instance_update_is_refused_and_fenced_alike(
    repo: SQLAlchemyWorkflowRepo, form: str
) -> None:
    """Whichever columns a step names, an instance not in ``instance_status_in`` refuses it and a stale
    ``lease_epoch`` makes it stale; nothing is written either way."""
    instance_id, _ = await instance_with(repo)
    fields = dict(_FORMS[form])
    refused_in = ("canceled",) if form == "reviving" else ("running",)  # the instance is ``init``
    refused = await repo.apply_step(
        Step(instance_id=instance_id, **{**fields, "instance_status_in": refused_in})
    )
    assert (refused.applied, refused.stale) == (False, False)
    stale = await repo.apply_step(Step(instance_id=instance_id, lease_epoch=7, **fields))
    assert (stale.applied, stale.stale) == (False, True)
    record = await repo.get_workflow_instance(instance_id)
    assert record is not None and (record.status, record.version) == ("init", 1)
    assert await repo.load_task_instances(instance_id) == []
    applied = await repo.apply_step(Step(instance_id=instance_id, lease_epoch=0, **fields))
    assert applied.applied


async def test_an_idle_repo_holds_no_connection(repo: SQLAlchemyWorkflowRepo) -> None:
    made = await asyncio.gather(*(repo.create_workflow_instance(new(str(i))) for i in range(30)))
    await asyncio.gather(*(repo.get_workflow_instance(m.id) for m in made))
    pool = cast(QueuePool, repo.engine.pool)
    assert pool.checkedout() >= 2  # calls ran side by side; their connections wait for the next calls
    await repo.get_workflow_instance(made[0].id)  # a call soon after reuses one: nothing is opened
    assert pool.checkedout() >= 2
    start = time.monotonic()
    while pool.checkedout() > 0 and time.monotonic() - start < 5:
        await asyncio.sleep(0.01)
    assert pool.checkedout() == 0  # the idle repo gave them all back, without being closed
    assert pool.checkedin() >= 2


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


async def test_a_busy_repo_gives_kept_connections_back_when_the_pool_runs_out(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url, pool_size=4, max_overflow=0, pool_timeout=3) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        made = await asyncio.gather(*(repo.create_workflow_instance(new(str(i))) for i in range(8)))
        stop = asyncio.Event()

        async def keep_busy() -> None:
            while not stop.is_set():
                await asyncio.gather(*(repo.get_workflow_instance(m.id) for m in made))

        async def app_work() -> int:  # the application's own use of the engine: two at once
            for _ in range(10):
                async with engine.connect() as one, engine.connect() as two:
                    await one.execute(text("SELECT 1"))
                    await two.execute(text("SELECT 1"))
            return 10

        busy = [asyncio.create_task(keep_busy()) for _ in range(4)]
        try:
            assert await app_work() == 10  # no pool timeout: idle lanes went back while it waited
        finally:
            stop.set()
            await asyncio.gather(*busy)
        await repo.aclose()


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


async def test_the_engines_step_cancelled_while_waiting_on_a_row_lock_waits_and_reports_it(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    """With ``HOLD_STEPS`` set (the engine's pass, asyncflow._held) the cancellation waits for the
    statement: the step that landed is returned, and the cancellation raised at the next await."""
    made = await repo.create_workflow_instance(new())
    step = Step(instance_id=made.id, instance_status="running", inserts=(task("a"),))
    got: list[Any] = []

    async def engine_step() -> None:
        HOLD_STEPS.set(True)  # this task's own context
        got.append(await repo.apply_step(step))
        await asyncio.sleep(0)
        got.append("not cancelled")

    async with repo.engine.connect() as other, other.begin():
        await other.execute(
            text("UPDATE workflow_instance SET business_id = 'x' WHERE id = :i"), {"i": made.id}
        )
        pending = asyncio.create_task(engine_step())
        while not (await other.execute(BLOCKED_BY_ME)).scalars().all():
            await asyncio.sleep(0.01)
        pending.cancel()
        await asyncio.sleep(0.1)
        assert not pending.done()  # held: it waits for its statement, blocked by this transaction
        await other.rollback()
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert len(got) == 1 and got[0].applied  # it landed, and the caller learned so before the cancel
    assert [r.task_type for r in await repo.load_task_instances(made.id)] == ["a"]


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


async def test_disposing_the_engine_of_a_repo_never_closed_closes_its_kept_connections(
    postgres_url: str,
) -> None:
    name = f"asyncflow-test-{uuid.uuid4().hex[:12]}"  # this engine's sessions only, not other tests'
    async with isolated_pg_engine(postgres_url, application_name=name) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        other = SQLAlchemyWorkflowRepo(engine.execution_options())  # shares the pool and dispose()
        async with engine.connect() as conn:
            others = set((await conn.execute(text(CONNECTED_PIDS), {"name": name})).scalars().all())
        await repo.create_schema()
        made = await asyncio.gather(*(repo.create_workflow_instance(new(str(i))) for i in range(20)))
        await asyncio.gather(*(other.get_workflow_instance(m.id) for m in made))
        async with engine.connect() as conn:
            pids = set((await conn.execute(text(CONNECTED_PIDS), {"name": name})).scalars().all()) - others
        assert cast(QueuePool, engine.pool).checkedout() >= 2  # kept for the next calls
        await engine.dispose()  # neither repo was closed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
        assert [str(w.message) for w in caught] == []  # no connection left for the GC to clean up
        still = pids
        async with asyncio.timeout(10), engine.connect() as conn:
            while pids & still:  # the server sees every one of them close (backends exit in a moment)
                await asyncio.sleep(0.02)
                still = set((await conn.execute(text(CONNECTED_PIDS), {"name": name})).scalars().all())
                await conn.rollback()  # a transaction reads pg_stat_activity once: the next poll looks anew
        assert pids
        assert await repo.get_workflow_instance(made[0].id) == made[0]  # the repo goes on working


CONNECTED_PIDS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND application_name = :name"
)


async def test_an_aclose_cut_while_a_batch_runs_still_disposes_the_engine_the_repo_built(
    postgres_url: str,
) -> None:
    """``aclose()`` waits for the batches in flight before it disposes the engine the repo built. A
    cancellation or a timeout that cuts that wait used to skip the dispose, and a later ``aclose()``
    returned at once (the repo was marked closed): every pooled session stayed open until collected."""
    name = f"asyncflow-test-{uuid.uuid4().hex[:12]}"
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(postgres_url)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    settings = {"search_path": schema, "application_name": name}
    repo = SQLAlchemyWorkflowRepo(postgres_url, connect_args={"server_settings": settings})
    try:
        await repo.migrate()
        made = await repo.create_workflow_instance(new())
        async with repo.engine.connect() as one, repo.engine.connect() as two:  # two pooled sessions
            await one.execute(text("SELECT 1"))
            await two.execute(text("SELECT 1"))
        step = Step(instance_id=made.id, instance_status="running", inserts=(task("a"),))
        async with admin.connect() as other, other.begin():
            await other.execute(
                text(f"UPDATE \"{schema}\".workflow_instance SET business_id = 'x' WHERE id = :i"),
                {"i": made.id},
            )
            pending = asyncio.create_task(repo.apply_step(step))
            while not (await other.execute(BLOCKED_BY_ME)).scalars().all():
                await asyncio.sleep(0.01)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await repo.aclose()  # waits for the step's batch, blocked by this transaction
            await other.rollback()
        await asyncio.wait([pending])  # the batch has ended (a cut aclose() leaves it running)
        await repo.aclose()  # already closed: a no-op
        async with asyncio.timeout(10):
            while True:  # every session of the repo's engine ends (the server sees it in a moment)
                async with admin.connect() as conn:
                    if not (await conn.execute(text(CONNECTED_PIDS), {"name": name})).scalars().all():
                        break
                await asyncio.sleep(0.02)
    finally:
        await repo.aclose()
        await repo.engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()
