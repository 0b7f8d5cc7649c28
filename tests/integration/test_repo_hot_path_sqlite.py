"""The SQLite backend: one trip to its own connection's thread per call, atomic steps, the in-memory path."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

from asyncflow.errors import StoreError
from asyncflow.records import (
    InstanceFields,
    InstanceWhere,
    NewWorkflowInstance,
    QueryWorkflowInstanceParams,
    Step,
    TaskInsert,
    TaskInstanceRecord,
    TaskUpdate,
)
from asyncflow.store._lanes import IDLE_RELEASE_S
from asyncflow.store.commit_counter import CommitCounter
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.store.sqlite.lane import ThreadConnection

from .sqlite_helpers import db_path, write_elsewhere


def new(business_id: str = "b") -> NewWorkflowInstance:
    return NewWorkflowInstance(workflow_type="wf", business_id=business_id, workflow_context={})


def task(task_type: str, status: str = "running") -> TaskInsert:
    return TaskInsert(task_type=task_type, status=status, node_context={"n": task_type})


@pytest.fixture
async def repo(sqlite_url: str) -> AsyncIterator[SQLAlchemyWorkflowRepo]:
    made = SQLAlchemyWorkflowRepo(sqlite_url)
    await made.create_schema()
    yield made
    await made.aclose()


async def instance_with(
    repo: SQLAlchemyWorkflowRepo, *types: str
) -> tuple[int, dict[str, TaskInstanceRecord]]:
    made = await repo.create_workflow_instance(new())
    return made.id, {t: await repo.create_task_instance(made.id, task(t)) for t in types}


@contextmanager
def hops_and_statements(engine: AsyncEngine) -> Iterator[tuple[list[int], list[str]]]:
    """Trips to the backend's own thread, and statements SQLAlchemy runs, meanwhile."""
    hops = [0]
    seen: list[str] = []
    original: Any = ThreadConnection.run

    async def counted(self: Any, fn: Any, *args: Any) -> Any:
        hops[0] += 1
        return await original(self, fn, *args)

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    ThreadConnection.run = counted  # type: ignore[method-assign]
    try:
        yield hops, seen
    finally:
        ThreadConnection.run = original  # type: ignore[method-assign]
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def test_a_file_gets_a_connection_of_its_own_and_an_in_memory_database_none(sqlite_url: str) -> None:
    async with (
        SQLAlchemyWorkflowRepo(sqlite_url) as on_file,
        SQLAlchemyWorkflowRepo("sqlite://") as in_memory,
    ):
        assert on_file._backend._lane.own and not in_memory._backend._lane.own


async def test_every_hot_call_is_one_trip_to_the_database_thread(repo: SQLAlchemyWorkflowRepo) -> None:
    made = await asyncio.gather(*(instance_with(repo, "a") for _ in range(10)))
    with hops_and_statements(repo.engine) as (hops, seen), CommitCounter(repo.engine) as counter:
        steps = [
            Step(
                instance_id=instance_id,
                instance_status="running",
                updates=(TaskUpdate(id=rows["a"].id, expected_version=1, status="completed"),),
                inserts=(task("b"), task("c")),
            )
            for instance_id, rows in made
        ]
        results = await asyncio.gather(*(repo.apply_step(step) for step in steps))
        step_hops = hops[0]
        loaded = await asyncio.gather(*(repo.load_task_instances(i) for i, _ in made))
        got = await asyncio.gather(*(repo.get_workflow_instance(i) for i, _ in made))
        claimed = await repo.claim_due_instances(now_ms=10**12, limit=100, lease_ms=1000)
        created = await repo.create_workflow_instance(new("one more"))
    assert all(r.applied for r in results) and len(claimed) == 10
    assert [[r.task_type for r in rows] for rows in loaded] == [["a", "b", "c"]] * 10
    assert all(g is not None and g.status == "running" for g in got) and created.id > 0
    assert seen == []  # nothing went through SQLAlchemy's statements
    assert 1 <= step_hops <= 2 + 1  # the ten steps waited together: one or two transactions
    calls = 10 + 10 + 1 + 1
    bursts = 0  # idle gaps close the own connection in the thread itself, not through run()
    assert calls <= hops[0] - step_hops <= calls + bursts
    assert counter.commits == 10 + 1 + 1  # steps (each counts as a write), claim, create


async def test_a_failure_mid_step_rolls_back_the_whole_step(
    repo: SQLAlchemyWorkflowRepo, sqlite_url: str
) -> None:
    async with repo.engine.begin() as conn:
        await conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE INSERT ON task_instance WHEN NEW.task_type = 'refused' "
            "BEGIN SELECT RAISE(ABORT, 'refused node'); END"
        )
    instance_id, rows = await instance_with(repo, "a", "b")
    step = Step(
        instance_id=instance_id,
        instance_status="running",
        next_run_at=5,
        updates=(TaskUpdate(id=rows["a"].id, expected_version=1, status="completed"),),
        inserts=(task("fine"), task("refused")),
        cancel_other_tasks=True,
    )
    with pytest.raises(StoreError, match="refused node") as caught:
        await repo.apply_step(step)
    assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
    assert await repo.load_task_instances(instance_id) == [rows["a"], rows["b"]]
    instance = await repo.get_workflow_instance(instance_id)
    assert instance is not None and (instance.status, instance.version, instance.next_run_at) == (
        "init",
        1,
        0,
    )
    assert await asyncio.to_thread(write_elsewhere, db_path(sqlite_url)) == "written"
    fine = Step(instance_id=instance_id, inserts=(task("fine"),))
    assert (await repo.apply_step(fine)).applied


async def test_a_conflict_writes_nothing_and_leaves_no_transaction_open(
    repo: SQLAlchemyWorkflowRepo, sqlite_url: str
) -> None:
    instance_id, rows = await instance_with(repo, "a", "b")
    step = Step(
        instance_id=instance_id,
        instance_status="running",
        updates=(
            TaskUpdate(id=rows["a"].id, expected_version=1, status="completed"),
            TaskUpdate(id=rows["b"].id, expected_version=3, status="completed"),
        ),
        inserts=(task("c"),),
    )
    assert not (await repo.apply_step(step)).applied
    assert await repo.load_task_instances(instance_id) == [rows["a"], rows["b"]]
    assert await asyncio.to_thread(write_elsewhere, db_path(sqlite_url)) == "written"
    duplicate = Step(instance_id=instance_id, inserts=(task("c"), task("a")))
    assert not (await repo.apply_step(duplicate)).applied
    assert [r.task_type for r in await repo.load_task_instances(instance_id)] == ["a", "b"]


async def test_an_in_memory_database_runs_the_same_calls_on_sqlalchemys_connection() -> None:
    async with SQLAlchemyWorkflowRepo("sqlite+aiosqlite://") as repo:
        await repo.create_schema()
        with hops_and_statements(repo.engine) as (hops, seen):
            instance_id, rows = await instance_with(repo, "a")
            ok = Step(
                instance_id=instance_id,
                updates=(TaskUpdate(id=rows["a"].id, expected_version=1, status="x"),),
            )
            assert (await repo.apply_step(ok)).applied
            assert not (await repo.apply_step(ok)).applied  # the version moved on
            assert await repo.claim_due_instances(now_ms=1, limit=5, lease_ms=10) == [instance_id]
            loaded = await repo.load_task_instances(instance_id)
        assert [(r.status, r.version) for r in loaded] == [("x", 2)]
        assert hops == [0] and any(s.startswith("UPDATE task_instance") for s in seen)  # through SQLAlchemy


async def test_cancelled_calls_neither_tear_a_step_nor_lose_an_in_memory_database() -> None:
    async with SQLAlchemyWorkflowRepo("sqlite+aiosqlite://") as repo:
        await repo.create_schema()
        made = [await instance_with(repo, "a") for _ in range(20)]
        steps = [
            Step(
                instance_id=instance_id,
                instance_status="running",
                updates=(TaskUpdate(id=rows["a"].id, expected_version=1, status="completed"),),
                inserts=(task("b"),),
            )
            for instance_id, rows in made
        ]
        calls = [asyncio.create_task(repo.apply_step(step)) for step in steps]
        await asyncio.sleep(0)
        for call in calls[::2]:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        for instance_id, _ in made:
            rows = await repo.load_task_instances(instance_id)
            instance = await repo.get_workflow_instance(instance_id)
            assert instance is not None
            shape = ([(r.task_type, r.status) for r in rows], instance.status)
            assert shape in (
                ([("a", "running")], "init"),
                ([("a", "completed"), ("b", "running")], "running"),
            )
        assert not any(c.cancelled() for c in calls[1::2])


async def test_a_call_cancelled_mid_statement_keeps_an_in_memory_database() -> None:
    """A cancellation that landed while a statement of an in-memory database ran (here an
    ``UPDATE`` whose trigger waits) made SQLAlchemy invalidate the connection, and the database, the
    connection's own, went with it: every later call raised "no such table"."""
    started, release = threading.Event(), threading.Event()

    def held() -> int:
        started.set()
        release.wait(10)
        return 1

    async with SQLAlchemyWorkflowRepo("sqlite+aiosqlite://") as repo:
        register = lambda dbapi_connection, record: dbapi_connection.create_function("held", 0, held)  # noqa: E731
        event.listen(repo.engine.sync_engine, "connect", register)
        await repo.create_schema()
        made = await repo.create_workflow_instance(new())
        async with repo.engine.begin() as conn:  # the pool's one connection: the database's
            trigger = "CREATE TEMP TRIGGER slow AFTER UPDATE ON workflow_instance BEGIN SELECT held(); END"
            await conn.exec_driver_sql(trigger)
        try:
            where, fields = InstanceWhere(ids=(made.id,)), InstanceFields(status="x")
            cut = asyncio.create_task(repo.update_workflow_instances(where, fields))
            async with asyncio.timeout(10):
                while not started.is_set():
                    await asyncio.sleep(0.005)
            cut.cancel()
            await asyncio.sleep(0.05)  # the cancellation reaches SQLAlchemy while the statement runs
        finally:
            release.set()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await asyncio.shield(cut)
        found = await repo.get_workflow_instance(made.id)
        assert found is not None and found.status == "x"  # the statement ran to its end


async def test_core_units_and_the_hot_path_share_a_one_connection_pool() -> None:
    async with SQLAlchemyWorkflowRepo("sqlite+aiosqlite://") as repo:  # pool_size=1, max_overflow=0
        await repo.create_schema()
        made = [await repo.create_workflow_instance(new(str(i))) for i in range(10)]

        async def in_transaction(i: int) -> None:
            async with repo.transaction():
                await repo.update_workflow_instances(
                    InstanceWhere(ids=(made[i].id,)), InstanceFields(next_run_at=i)
                )
                await repo.get_workflow_instance(made[i].id)

        async with asyncio.timeout(20):
            await asyncio.gather(
                *(repo.get_workflow_instance(m.id) for m in made),
                *(in_transaction(i) for i in range(10)),
                *(repo.query_workflow_instances(QueryWorkflowInstanceParams()) for _ in range(5)),
                *(repo.apply_step(Step(instance_id=m.id, inserts=(task("a"),))) for m in made),
            )
        pool = cast(QueuePool, repo.engine.pool)
        async with asyncio.timeout(5):
            while pool.checkedout() > 0:  # idle: the kept connection goes back soon
                await asyncio.sleep(0.01)
        assert [(await repo.get_workflow_instance(m.id)) is not None for m in made] == [True] * 10


async def test_concurrent_steps_share_a_transaction_but_fail_and_conflict_alone(
    repo: SQLAlchemyWorkflowRepo, sqlite_url: str
) -> None:
    async with repo.engine.begin() as conn:
        await conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE INSERT ON task_instance WHEN NEW.task_type = 'refused' "
            "BEGIN SELECT RAISE(ABORT, 'refused node'); END"
        )
    made = [await instance_with(repo, "a") for _ in range(6)]

    def step(i: int, *, version: int = 1, insert: str = "b") -> Step:
        instance_id, rows = made[i]
        update = TaskUpdate(id=rows["a"].id, expected_version=version, status="completed")
        return Step(
            instance_id=instance_id, instance_status="running", updates=(update,), inserts=(task(insert),)
        )

    steps = [step(0), step(1, version=9), step(2, insert="refused"), step(3), step(4, insert="a"), step(5)]
    with hops_and_statements(repo.engine) as (hops, _):
        results = await asyncio.gather(*(repo.apply_step(s) for s in steps), return_exceptions=True)
    assert hops[0] <= 3  # one transaction for the six (plus the kept connection's reset)
    assert [getattr(r, "applied", None) for r in results] == [True, False, None, True, False, True]
    failure = results[2]
    assert isinstance(failure, StoreError) and "refused node" in str(failure)
    assert isinstance(failure.__cause__, sqlite3.IntegrityError)  # the step's own driver error
    for i, (instance_id, rows) in enumerate(made):
        loaded = await repo.load_task_instances(instance_id)
        instance = await repo.get_workflow_instance(instance_id)
        assert instance is not None
        if i in (0, 3, 5):
            assert [(r.task_type, r.status) for r in loaded] == [("a", "completed"), ("b", "running")]
            assert instance.version == 2
        else:  # rolled back alone: untouched
            assert loaded == [rows["a"]] and instance.version == 1
    assert await asyncio.to_thread(write_elsewhere, db_path(sqlite_url)) == "written"


async def test_an_idle_repo_closes_its_own_connection_and_opens_it_again(sqlite_url: str) -> None:
    async with SQLAlchemyWorkflowRepo(sqlite_url) as repo:
        await repo.create_schema()
        made = await repo.create_workflow_instance(new("a"))
        thread = repo._backend._lane._thread
        assert thread is not None and thread.is_open  # kept for the next call
        async with asyncio.timeout(5):
            while thread.is_open:
                await asyncio.sleep(IDLE_RELEASE_S)
        assert await repo.get_workflow_instance(made.id) == made  # reopened
    assert not thread.is_open  # closed with the repo


def test_a_repo_used_by_a_second_event_loop_still_gives_its_connection_back(sqlite_url: str) -> None:
    repo = SQLAlchemyWorkflowRepo(sqlite_url)

    async def first() -> int:
        await repo.create_schema()
        return (await repo.create_workflow_instance(new("a"))).id  # the loop ends at once after it

    async def second(instance_id: int) -> int:
        assert await repo.get_workflow_instance(instance_id) is not None
        await asyncio.sleep(0.3)  # idle for longer than IDLE_RELEASE_S
        out = cast(QueuePool, repo.engine.pool).checkedout()
        await repo.aclose()
        return out

    instance_id = asyncio.run(first())
    assert asyncio.run(second(instance_id)) == 0


async def test_calls_racing_an_engine_dispose_get_a_working_connection(sqlite_url: str) -> None:
    engine = create_async_engine(sqlite_url)
    repo = SQLAlchemyWorkflowRepo(engine)
    await repo.create_schema()
    made = await repo.create_workflow_instance(new("a"))
    for _ in range(20):
        await repo.get_workflow_instance(made.id)  # a kept connection again
        results = await asyncio.gather(
            engine.dispose(), *(repo.get_workflow_instance(made.id) for _ in range(3))
        )
        assert results[1:] == [made] * 3
    await repo.aclose()
    await engine.dispose()


def hold_write_lock(path: str) -> sqlite3.Connection:
    """Another connection in ``BEGIN IMMEDIATE``: every writer of the file waits until it ends."""
    other = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    return other


@contextmanager
def write_lock_held(path: str) -> Iterator[None]:
    """:func:`hold_write_lock` for the block: rolled back and closed at its end."""
    other = hold_write_lock(path)
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


async def test_an_aclose_cut_while_a_batch_waits_leaves_the_step_to_its_caller(sqlite_url: str) -> None:
    """A cut ``aclose()`` (a timeout) does not cancel the batch it waits for: the thread runs the
    step anyway, so a caller told ``CancelledError`` (nobody cancelled it) would see its step land."""
    repo = SQLAlchemyWorkflowRepo(sqlite_url)
    try:
        await repo.create_schema()
        instance_id, _ = await instance_with(repo, "a")
        step = Step(instance_id=instance_id, inserts=(task("b"),))
        with write_lock_held(db_path(sqlite_url)):
            pending = asyncio.create_task(repo.apply_step(step))
            await asyncio.sleep(0.2)  # the step's batch waits for the write lock in the thread
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await repo.aclose()
        async with asyncio.timeout(10):
            result = await pending
        assert result.applied
    finally:
        await repo.aclose()
    async with SQLAlchemyWorkflowRepo(sqlite_url) as check:
        assert [r.task_type for r in await check.load_task_instances(instance_id)] == ["a", "b"]


def sqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "asyncflow-sqlite"}


async def test_an_aclose_cut_still_ends_the_thread_and_closes_its_connection(sqlite_url: str) -> None:
    """``aclose()`` cut while it waits for the batch in flight used to skip the end of the backend's
    thread: the thread stayed alive (waiting on its queue) with its ``sqlite3`` connection open, and a
    later ``aclose()`` returned at once. A batch that starts after the cut gets no new thread."""
    before = sqlite_threads()
    repo = SQLAlchemyWorkflowRepo(sqlite_url)
    await repo.create_schema()
    (first, _), (second, _) = await instance_with(repo, "a"), await instance_with(repo, "a")
    thread = repo._backend._lane._thread
    assert thread is not None and thread.is_open
    with write_lock_held(db_path(sqlite_url)):
        pending = asyncio.create_task(repo.apply_step(Step(instance_id=first, inserts=(task("b"),))))
        await asyncio.sleep(0.2)  # its batch waits for the write lock in the thread
        queued = asyncio.create_task(repo.apply_step(Step(instance_id=second, inserts=(task("b"),))))
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await repo.aclose()
    async with asyncio.timeout(10):
        assert (await pending).applied
        await asyncio.wait([queued])
    await repo.aclose()  # already closed: a no-op
    async with asyncio.timeout(5):
        while sqlite_threads() - before:
            await asyncio.sleep(0.01)
    assert not thread.is_open
    with pytest.raises(StoreError, match="closed"):  # its batch started after the close: refused
        await queued


def test_a_call_that_ends_after_its_event_loop_leaves_the_thread_serving(sqlite_url: str) -> None:
    """A call cut while the thread runs it (a timeout; here one waiting for another writer) may end
    after its event loop has closed. Handing its outcome to that loop used to raise in the thread and
    kill it (an unhandled exception in the thread), and every later call, in another loop, hung."""
    repo = SQLAlchemyWorkflowRepo(sqlite_url)
    other: list[sqlite3.Connection] = []

    async def first() -> int:
        await repo.create_schema()
        made = await repo.create_workflow_instance(new("a"))
        other.append(hold_write_lock(db_path(sqlite_url)))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # the claim waits for the write lock in the thread
                await repo.claim_due_instances(now_ms=10**12, limit=5, lease_ms=1000)
        return made.id  # the loop closes while the thread still waits

    async def second(instance_id: int) -> bool:
        try:
            async with asyncio.timeout(5):
                return await repo.get_workflow_instance(instance_id) is not None
        finally:
            await repo.aclose()

    instance_id = asyncio.run(first())
    other[0].execute("ROLLBACK")
    other[0].close()
    assert asyncio.run(second(instance_id))


def aiosqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


async def test_an_aclose_cut_while_it_disposes_the_engine_still_closes_every_connection(
    sqlite_url: str,
) -> None:
    """``aclose()`` disposes the engine it built; a cancellation that lands while the pool closes its
    connections (here: as the first one closes) used to stop the dispose there, leaving the other
    aiosqlite connections open in the pool, each with its worker thread (not a daemon) alive."""
    before = aiosqlite_threads()
    repo = SQLAlchemyWorkflowRepo(sqlite_url)
    await repo.create_schema()
    async with repo.engine.connect(), repo.engine.connect():  # two connections, back in the pool after
        pass
    pool = cast(QueuePool, repo.engine.pool)
    assert pool.checkedin() == 2

    closes: list[object] = []

    def cancel_closer(dbapi_connection: Any, connection_record: Any) -> None:
        closes.append(dbapi_connection)
        if len(closes) == 1:
            outer[0].cancel()  # lands in the close of this connection, as a timeout firing then would

    outer: list[asyncio.Task[Any]] = []

    async def close() -> None:
        task = asyncio.current_task()
        assert task is not None
        outer.append(task)  # first: under an eager task factory the pool may close before create_task returns
        await repo.aclose()

    event.listen(pool, "close", cancel_closer)
    closing = asyncio.create_task(close())
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert pool.checkedin() == 0
    async with asyncio.timeout(5):
        while aiosqlite_threads() - before:
            await asyncio.sleep(0.01)
