"""wait_for_workflow: at once for a terminal instance; woken in-process at once (no polling), across
processes on PostgreSQL through LISTEN/NOTIFY with one listener connection for 1,000 waiters, polled
elsewhere; TimeoutError, InstanceNotFoundError and bad arguments."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver
from asyncflow.engine import waiting
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import InstanceNotFoundError, InvalidStateError, ParamInvalidError
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.registry import Registry
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.postgres.finished import FINISHED_DDL, FINISHED_DDL_V10
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.store.tables import SCHEMA_VERSION
from asyncflow.worker import NormalTaskWorker, current_node
from tests.conftest import isolated_pg_engine
from tests.integration.stall_proxy import StallProxy
from tests.integration.start_helpers import fake_service, one_node_registry


@pytest.fixture
def no_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiters would poll once a minute: only a wake-up can end a wait within the tests' bounds."""
    monkeypatch.setattr(waiting, "POLL_INTERVAL", 60.0)
    monkeypatch.setattr(waiting, "LISTENING_POLL_INTERVAL", 60.0)


async def test_a_waiter_is_woken_in_process_when_a_driver_ends_the_instance(
    engine_repo: Any, no_polling: None
) -> None:
    service, _ = fake_service(engine_repo, one_node_registry("w"))
    inst = await service.create_workflow("w", "b")
    waiter = asyncio.create_task(service.wait_for_workflow(inst.id, timeout=20))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await WorkflowDriver(service, poll_interval=0.05).run_until_idle()
    done = await asyncio.wait_for(waiter, 5)
    assert (done.id, done.status) == (inst.id, "completed")
    again = await service.wait_for_workflow(inst.id, timeout=0)  # terminal: at once
    assert again.status == "completed"


async def test_a_cancel_wakes_the_waiter(engine_repo: Any, no_polling: None) -> None:
    service, _ = fake_service(engine_repo, one_node_registry("w"))
    inst = await service.create_workflow("w", "b")
    waiter = asyncio.create_task(service.wait_for_workflow(inst.id))
    await asyncio.sleep(0.02)
    await service.cancel_workflow_instance(inst.id)
    assert (await asyncio.wait_for(waiter, 5)).status == "canceled"


async def test_timeout_unknown_ids_and_bad_arguments(engine_repo: Any) -> None:
    service, _ = fake_service(engine_repo, one_node_registry("w"))
    inst = await service.create_workflow("w", "b")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await service.wait_for_workflow(inst.id, timeout=0.2)
    assert 0.15 < time.monotonic() - started < 2
    with pytest.raises(InstanceNotFoundError):
        await service.wait_for_workflow(inst.id + 1000, timeout=5)
    for bad in (-1, "1", True, float("nan"), 10**400):  # the last: no float (OverflowError before)
        with pytest.raises(ParamInvalidError, match="timeout"):
            await service.wait_for_workflow(inst.id, timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError, match="instance_id"):
        await service.wait_for_workflow(0)
    assert service._waiters.waiting == 0


async def test_without_wake_ups_another_service_s_end_is_polled(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(waiting, "POLL_INTERVAL", 0.1)
    url = f"sqlite+aiosqlite:///{tmp_path}/w.db"
    async with SQLAlchemyWorkflowRepo(url) as repo_a, SQLAlchemyWorkflowRepo(url) as repo_b:
        await repo_a.migrate()
        registry = one_node_registry("w")
        waiter_side = WorkflowService(repo_a, LocalWorkflowLock(), registry)
        runner_side = WorkflowService(repo_b, LocalWorkflowLock(), registry)
        inst = await runner_side.create_workflow("w", "b")
        waiter = asyncio.create_task(waiter_side.wait_for_workflow(inst.id, timeout=10))
        await asyncio.sleep(0.05)
        await runner_side.run_workflow(inst.id)
        assert (await waiter).status == "completed"


async def _schema(engine: Any) -> str:
    async with engine.connect() as conn:
        schema: str = (await conn.exec_driver_sql("SELECT current_schema()")).scalar_one()
    return schema


async def _until(predicate: Any, bound: float = 10.0) -> None:
    deadline = time.monotonic() + bound
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.postgres
async def test_1000_waiters_share_one_listener_and_wake_on_an_end_in_another_process(
    postgres_url: str, no_polling: None
) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        runner_repo = SQLAlchemyWorkflowRepo(engine)
        await runner_repo.migrate()
        app = f"af-waiters-{uuid.uuid4().hex[:8]}"
        settings = {"server_settings": {"search_path": await _schema(engine), "application_name": app}}
        waiter_engine = create_async_engine(postgres_url, connect_args=settings, pool_size=8, max_overflow=0)
        waiter_repo = SQLAlchemyWorkflowRepo(waiter_engine)
        registry = one_node_registry("w")
        runner = WorkflowService(runner_repo, LocalWorkflowLock(), registry)
        waiters = WorkflowService(waiter_repo, LocalWorkflowLock(), registry)
        try:
            ids = [(await runner.create_workflow("w", f"b{i}")).id for i in range(10)]
            tasks = [
                asyncio.create_task(waiters.wait_for_workflow(ids[i % 10], timeout=30)) for i in range(1000)
            ]
            await _until(lambda: waiters._waiters.listening and waiters._waiters.waiting == 1000)
            await asyncio.sleep(0.2)  # every waiter has read its instance and sleeps
            async with engine.connect() as conn:
                rows = (
                    (
                        await conn.execute(
                            text("SELECT query FROM pg_stat_activity WHERE application_name = :app"),
                            {"app": app},
                        )
                    )
                    .scalars()
                    .all()
                )
            assert sum(1 for q in rows if q.upper().startswith("LISTEN")) == 1, rows
            assert len(rows) <= 1 + waiter_engine.pool.size(), rows  # the listener + the pool, not 1,000
            assert not any(task.done() for task in tasks)
            for instance_id in ids:
                await runner.run_workflow(instance_id)  # another service, engine and pool: "a process"
            finished = await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert {inst.status for inst in finished} == {"completed"}
            await _until(lambda: not waiters._waiters.listening)  # the last waiter stops the listener
        finally:
            await waiter_repo.aclose()
            await waiter_engine.dispose()
            await runner_repo.aclose()


async def test_a_memory_repo_waiter_needs_no_listener(no_polling: None) -> None:
    service, _ = fake_service(MemoryWorkflowRepo(), one_node_registry("w"))
    inst = await service.create_workflow("w", "b")
    waiter = asyncio.create_task(service.wait_for_workflow(inst.id))
    await asyncio.sleep(0)
    await service.run_workflow(inst.id)
    assert (await asyncio.wait_for(waiter, 5)).status == "completed"
    assert not service._waiters.listening


@pytest.mark.postgres
@pytest.mark.parametrize("after", [0.0, 0.5])
async def test_a_stopped_listener_returns_its_connection_even_while_connecting(
    postgres_url: str, after: float
) -> None:
    from asyncflow.store.postgres.finished import FinishedNotifier

    async with isolated_pg_engine(postgres_url) as engine:
        heard: list[int | None] = []
        notifier = FinishedNotifier(engine, heard.append)
        task = asyncio.create_task(notifier.run())
        await asyncio.sleep(after)  # 0: stopped while it opens its connection; 0.5: while it listens
        notifier.stop()
        await asyncio.wait_for(task, 10)
        assert not notifier.listening
        assert engine.sync_engine.pool.checkedout() == 0


async def _connect_like(engine: Any) -> Any:
    import asyncpg

    url = engine.url.set(drivername="postgresql")
    schema = await _schema(engine)
    return await asyncpg.connect(
        url.render_as_string(hide_password=False), server_settings={"search_path": schema}
    )


async def _flags(engine: Any) -> dict[int, bool]:
    async with engine.connect() as conn:
        rows = (await conn.exec_driver_sql("SELECT id, notify_finished FROM workflow_instance")).all()
    return {row[0]: row[1] for row in rows}


def _hear(heard: list[str], schema: str) -> Any:
    """A LISTEN callback keeping the payloads of ``schema`` (the channel is database-wide: tests running
    at the same time on other schemas NOTIFY on it too)."""

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload.startswith(f"{schema} "):
            heard.append(payload)

    return on_notify


@pytest.mark.postgres
async def test_only_watched_instances_notify_their_end(postgres_url: str) -> None:
    """Migration 10: an instance ending NOTIFYs only if a waiter watched it (``notify_finished``); the
    others end without a NOTIFY (which would hold the database-wide notify lock through the commit)."""
    async with isolated_pg_engine(postgres_url) as engine, SQLAlchemyWorkflowRepo(engine) as repo:
        await repo.migrate()
        schema = await _schema(engine)
        listener = await _connect_like(engine)
        heard: list[str] = []
        await listener.add_listener("asyncflow_finished", _hear(heard, schema))
        try:
            service = WorkflowService(repo, LocalWorkflowLock(), one_node_registry("w"))
            watched, unwatched, canceled = [
                (await service.create_workflow("w", f"b{i}")).id for i in range(3)
            ]
            await repo.watch_finished(watched)
            await repo.watch_finished(watched)  # again: nothing changes
            await repo.watch_finished(canceled)
            assert await _flags(engine) == {watched: True, unwatched: False, canceled: True}
            await service.run_workflow(watched)
            await service.run_workflow(unwatched)
            await service.cancel_workflow_instance(canceled)
            await _until(lambda: len(heard) >= 2)
            await asyncio.sleep(0.3)  # anything else would have arrived by now
            assert sorted(heard) == sorted([f"{schema} {watched}", f"{schema} {canceled}"])
            await repo.watch_finished(unwatched)  # ended already: nothing to flag
            assert (await _flags(engine))[unwatched] is False
        finally:
            await listener.close()


_TRIGGER_DEF = (
    "SELECT pg_get_triggerdef(oid) FROM pg_trigger "
    "WHERE tgname = 'asyncflow_finished_notify' AND tgrelid = 'workflow_instance'::regclass"
)


@pytest.mark.postgres
async def test_migration_12_moves_the_status_test_into_the_function_and_notifies_as_before(
    postgres_url: str,
) -> None:
    """A version 11 database (the status lists in the trigger's WHEN) gets migration 12's trigger,
    whose WHEN reads only ``notify_finished``; its function NOTIFYs only for a watched instance that
    goes from ``init``/``running`` to a terminal status, as version 10 did."""
    async with isolated_pg_engine(postgres_url) as engine, SQLAlchemyWorkflowRepo(engine) as repo:
        await repo.migrate()
        async with engine.begin() as conn:  # back to version 11
            for ddl in (*FINISHED_DDL[:1], *FINISHED_DDL_V10):
                await conn.exec_driver_sql(ddl)
            await conn.exec_driver_sql("DELETE FROM asyncflow_schema WHERE version >= 12")
            assert "old.status = ANY" in (await conn.exec_driver_sql(_TRIGGER_DEF)).scalar_one()
        await repo.migrate()
        async with engine.connect() as conn:
            definition = (await conn.exec_driver_sql(_TRIGGER_DEF)).scalar_one()
            versions = (await conn.exec_driver_sql("SELECT version FROM asyncflow_schema")).scalars().all()
            assert sorted(versions) == list(range(1, SCHEMA_VERSION + 1))  # 12 and later applied again
        assert definition.endswith("WHEN (new.notify_finished) EXECUTE FUNCTION asyncflow_notify_finished()")
        schema = await _schema(engine)
        service = WorkflowService(repo, LocalWorkflowLock(), one_node_registry("w"))
        watched, unwatched = [(await service.create_workflow("w", f"b{i}")).id for i in range(2)]
        await repo.watch_finished(watched)
        listener = await _connect_like(engine)
        heard: list[str] = []
        await listener.add_listener("asyncflow_finished", _hear(heard, schema))
        try:
            for instance_id, status in [
                (watched, "running"),  # init -> running: not an end
                (unwatched, "completed"),  # an end nobody watches
                (watched, "failed"),  # the end
                (watched, "canceled"),  # terminal -> terminal: not an end
            ]:
                await listener.execute(
                    "UPDATE workflow_instance SET status = $2 WHERE id = $1", instance_id, status
                )
            await _until(lambda: len(heard) >= 1)
            await asyncio.sleep(0.3)  # anything else would have arrived by now
            assert heard == [f"{schema} {watched}"]
        finally:
            await listener.close()


@pytest.mark.postgres
@pytest.mark.parametrize("ends", [True, False])
async def test_a_watch_waits_for_the_write_in_flight_on_the_instance(postgres_url: str, ends: bool) -> None:
    """The flag's UPDATE takes the row's lock: it waits for an uncommitted write of the instance, then
    flags the row if it is still running (its end will NOTIFY) and leaves an ended one alone (the
    waiter's read, after the watch, sees the end). So no end falls between watch and read unheard."""
    async with isolated_pg_engine(postgres_url) as engine, SQLAlchemyWorkflowRepo(engine) as repo:
        await repo.migrate()
        service = WorkflowService(repo, LocalWorkflowLock(), one_node_registry("w"))
        inst = await service.create_workflow("w", "b")
        writer = await _connect_like(engine)
        try:
            transaction = writer.transaction()
            await transaction.start()
            await writer.execute(
                "UPDATE workflow_instance SET status = $2, version = version + 1 WHERE id = $1",
                inst.id,
                "completed" if ends else "running",
            )
            watch = asyncio.create_task(repo.watch_finished(inst.id))
            await asyncio.sleep(0.3)
            assert not watch.done()  # waits for the row's lock
            await transaction.commit()
            await asyncio.wait_for(watch, 5)
        finally:
            await writer.close()
        assert (await _flags(engine))[inst.id] is (not ends)
        record = await repo.get_workflow_instance(inst.id)
        assert record is not None and record.status == ("completed" if ends else "running")
        assert record.version == 2  # the flag does not count as a write of the instance


async def test_watch_is_a_no_op_on_sqlite(tmp_path: Any) -> None:
    async with SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}") as repo:
        await repo.migrate()
        service = WorkflowService(repo, LocalWorkflowLock(), one_node_registry("w"))
        inst = await service.create_workflow("w", "b")
        await repo.watch_finished(inst.id)
        assert await _flags(repo.engine) == {inst.id: False}
        waiter = asyncio.create_task(service.wait_for_workflow(inst.id, timeout=10))
        await asyncio.sleep(0.05)
        await service.run_workflow(inst.id)
        assert (await asyncio.wait_for(waiter, 5)).status == "completed"


async def test_a_cancel_that_meets_a_wake_up_still_ends_the_waiter(no_polling: None) -> None:
    """A waiter woken (here: a LISTEN that starts again wakes every waiter to re-read) and cancelled (a
    timeout, or its caller) in the same step of the loop ends cancelled; the wake-up does not swallow
    the cancel (it did on Python 3.11, whose ``asyncio.wait_for`` returns an inner result that is ready
    instead of raising the cancel), which left the waiter running past its timeout."""
    service, _ = fake_service(MemoryWorkflowRepo(), one_node_registry("w"))
    inst = await service.create_workflow("w", "b")
    waiter = asyncio.create_task(service.wait_for_workflow(inst.id))
    await asyncio.sleep(0.05)  # the waiter has read its instance and sleeps
    assert not waiter.done()
    service._waiters.finished(None)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, 5)
    assert service._waiters.waiting == 0


@asynccontextmanager
async def _behind_a_stall_proxy(postgres_url: str) -> AsyncIterator[tuple[int, StallProxy, WorkflowService]]:
    """An instance of a one-node workflow, the proxy, and a service that reaches the instance's
    schema through that proxy (its replies can be held)."""
    async with isolated_pg_engine(postgres_url) as engine, SQLAlchemyWorkflowRepo(engine) as repo:
        await repo.migrate()
        registry = one_node_registry("w")
        inst = await WorkflowService(repo, LocalWorkflowLock(), registry).create_workflow("w", "b")
        async with StallProxy(postgres_url) as proxy:
            settings = {"server_settings": {"search_path": await _schema(engine)}}
            slow_engine = create_async_engine(proxy.url, connect_args=settings)
            try:
                async with SQLAlchemyWorkflowRepo(slow_engine) as slow_repo:
                    yield inst.id, proxy, WorkflowService(slow_repo, LocalWorkflowLock(), registry)
            finally:
                await slow_engine.dispose()


@pytest.mark.postgres
async def test_the_timeout_bounds_the_first_read_too(postgres_url: str) -> None:
    """``timeout`` bounds the whole call: a database slow to answer the waiter's first read (here a
    proxy holds its reply) ends the call with ``TimeoutError`` once ``timeout`` is up, not once the
    read comes back (the call waited for the read, then began its timeout). The read it cuts leaves
    its connection mid-statement: SQLAlchemy closes it gracefully, for 2 s at most."""
    async with _behind_a_stall_proxy(postgres_url) as (instance_id, proxy, service):
        proxy.hold_replies_after(b"FROM workflow_instance WHERE id")
        started = time.monotonic()
        waiter = asyncio.create_task(service.wait_for_workflow(instance_id, timeout=0.3))
        done, _ = await asyncio.wait([waiter], timeout=6)
        elapsed = time.monotonic() - started
        assert proxy.held.is_set()
        proxy.resume()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(waiter, 10)
        assert done, "the call outlived its timeout while the first read was held"
        assert elapsed < 0.3 + 2 + 1.5, elapsed
        assert service._waiters.waiting == 0


async def test_a_node_waiting_for_its_own_instance_gets_an_error_not_a_hang() -> None:
    """A worker's ``run()`` that waits for its own instance would wait forever (the instance cannot end
    while its node waits): ``InvalidStateError`` at once instead, and the node goes on."""
    caught: list[BaseException] = []
    registry = Registry()
    node = NodeConfig(id="A", name="A", next_nodes=())
    registry.load_workflow_config(WorkflowConfig(id="w", name="w", nodes=(node,)))
    service, _ = fake_service(MemoryWorkflowRepo(), registry)

    async def run(ctx: JSONContext) -> None:
        try:
            await service.wait_for_workflow(current_node().instance_id, timeout=2)
        except Exception as exc:
            caught.append(exc)

    registry.register_workflow_task("w", "A", NormalTaskWorker(run=run))
    inst = await service.create_workflow("w", "b")
    started = time.monotonic()
    done = await asyncio.wait_for(service.run_workflow(inst.id), 10)
    assert done.status == "completed"
    assert len(caught) == 1
    assert isinstance(caught[0], InvalidStateError), repr(caught[0])
    assert "its own" in str(caught[0])
    assert time.monotonic() - started < 1
    assert service._waiters.waiting == 0


@pytest.mark.postgres
async def test_a_waiter_works_with_a_pool_of_one_connection(postgres_url: str, no_polling: None) -> None:
    """The LISTEN connection is not one of the pool's: with ``pool_size=1, max_overflow=0`` it took the
    only connection, and the waiter's own read failed once the pool's timeout was up. It is taken from
    the pool once and detached from it (the pool opens another), and closed when listening ends."""
    async with isolated_pg_engine(postgres_url) as engine, SQLAlchemyWorkflowRepo(engine) as runner_repo:
        await runner_repo.migrate()
        settings = {"server_settings": {"search_path": await _schema(engine)}}
        small = create_async_engine(
            postgres_url, connect_args=settings, pool_size=1, max_overflow=0, pool_timeout=2
        )
        registry = one_node_registry("w")
        runner = WorkflowService(runner_repo, LocalWorkflowLock(), registry)
        try:
            async with SQLAlchemyWorkflowRepo(small) as small_repo:
                waiters = WorkflowService(small_repo, LocalWorkflowLock(), registry)
                ids = [(await runner.create_workflow("w", f"b{i}")).id for i in range(2)]
                tasks = [asyncio.create_task(waiters.wait_for_workflow(i, timeout=20)) for i in ids]
                await _until(lambda: waiters._waiters.listening and waiters._waiters.waiting == 2)
                await asyncio.sleep(0.3)  # both have read their instances and sleep
                assert not any(task.done() for task in tasks)
                assert waiters._waiters.listening
                listener: Any = waiters._waiters._listener
                pid = listener.server_pid
                assert (await small_repo.get_workflow_instance(ids[0])) is not None  # the pool serves
                for instance_id in ids:
                    await runner.run_workflow(instance_id)  # another engine: woken through NOTIFY
                finished = await asyncio.wait_for(asyncio.gather(*tasks), 10)
                assert {inst.status for inst in finished} == {"completed"}
                await _until(lambda: not waiters._waiters.listening)
            assert small.sync_engine.pool.checkedout() == 0
            for _ in range(200):  # the detached LISTEN connection was closed, not left open
                async with engine.connect() as conn:
                    found = await conn.scalar(
                        text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
                    )
                if not found:
                    break
                await asyncio.sleep(0.05)
            assert not found, "the LISTEN connection is still open"
        finally:
            await small.dispose()


def _listen_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "asyncflow-wait-listen" and not t.done()]


@pytest.mark.postgres
async def test_a_listen_still_being_opened_holds_up_no_waiter_and_ends_at_aclose(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last waiter to leave asks the LISTEN task to stop and goes: a LISTEN connection still being
    opened (here its LISTEN's reply is held by a proxy: a database slow to accept) kept a
    ``timeout=0.5`` waiter until it was open. The service's ``aclose()`` ends that task: it waits
    :data:`~asyncflow.engine.waiting.LISTENER_STOP_GRACE` for it to stop, then cancels it."""
    monkeypatch.setattr(waiting, "LISTENER_STOP_GRACE", 0.3)
    async with _behind_a_stall_proxy(postgres_url) as (instance_id, proxy, service):
        proxy.hold_replies_after(b"LISTEN")
        started = time.monotonic()
        waiter = asyncio.create_task(service.wait_for_workflow(instance_id, timeout=0.5))
        done, _ = await asyncio.wait([waiter], timeout=6)
        elapsed = time.monotonic() - started
        assert proxy.held.is_set()
        if not done:
            proxy.resume()
            await asyncio.wait([waiter], timeout=10)
        assert done, "the waiter waited for the LISTEN connection"
        with pytest.raises(TimeoutError):
            await waiter
        assert elapsed < 0.5 + 1.5, elapsed
        assert len(_listen_tasks()) == 1  # still held: stopping
        closing = asyncio.create_task(service.aclose())
        done, _ = await asyncio.wait([closing], timeout=8)
        proxy.resume()
        assert done, "aclose() did not end the LISTEN task"
        await closing
        assert _listen_tasks() == []
        assert service._waiters.waiting == 0
