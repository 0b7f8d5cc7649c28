"""Issue 8, item 2: the database goes away in the middle of a driver run; nothing is stuck or lost.

* PostgreSQL: the shared server is never restarted. Instead every backend of this test's engine (found by
  the ``application_name`` it sets) is killed with ``pg_terminate_backend`` again and again for two
  seconds, so every statement in that window fails. Passes fail with ``StoreError``, the driver backs
  off, and once the connections come back it finishes every instance.
* SQLite: another process holds ``BEGIN EXCLUSIVE`` on the database file for three seconds. With the
  default ``busy_timeout`` (30 s) writers simply wait it out; with ``busy_timeout`` lowered to 200 ms
  passes fail with ``StoreError`` ("database is locked"), the driver backs off and resumes.

Afterwards every instance is completed, every node row is completed, and a trigger that logs each
transition of a node row into ``completed`` logged each node exactly once. Phases re-executed because
their success could not be stored are counted and reported.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asyncflow.driver import WorkflowDriver
from asyncflow.engine.rules import SchedulePolicy
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import StoreError
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import NewWorkflowInstance
from asyncflow.retry import RetryPolicy
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo

from ._crash_worker import SIDE_TABLES
from .helpers import ALL_ROWS, MIXED, MIXED_EDGES, WITH_CHECK, Journal, mixed_registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

INSTANCES = 400
FAST = SchedulePolicy(poll_interval=0.05)
FAST_RETRY = RetryPolicy(initial_interval=0.05, max_interval=0.2)
SQLITE_SIDE_TABLES = (
    "CREATE TABLE completion_log (instance_id INTEGER NOT NULL, task_type TEXT NOT NULL)",
    "CREATE TRIGGER log_insert AFTER INSERT ON task_instance WHEN NEW.status = 'completed' BEGIN "
    "INSERT INTO completion_log VALUES (NEW.workflow_instance_id, NEW.task_type); END",
    "CREATE TRIGGER log_update AFTER UPDATE OF status ON task_instance "
    "WHEN NEW.status = 'completed' AND OLD.status <> 'completed' BEGIN "
    "INSERT INTO completion_log VALUES (NEW.workflow_instance_id, NEW.task_type); END",
)


class ErrorRecorder:
    """Wraps a repo; counts the ``StoreError``s its methods raise, by method."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.errors: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await attr(*args, **kwargs)
            except StoreError:
                self.errors[name] += 1
                raise

        return call


async def slow_worker(node: str, phase: str, moment: str) -> None:
    if moment == "start":
        await asyncio.sleep(random.uniform(0.001, 0.004))


async def run_through_outage(
    repo: Any, count: Callable[[str], Awaitable[int]], outage: Callable[[], Awaitable[str]]
) -> dict[str, Any]:
    """Run INSTANCES mixed instances with a driver; once a quarter of the nodes are done, run
    ``outage()``; then wait until every instance is terminal. Returns the figures."""
    journal = Journal()
    recorder = ErrorRecorder(repo)
    svc = WorkflowService(
        recorder,  # type: ignore[arg-type]
        LocalWorkflowLock(),
        mixed_registry(journal, hook=slow_worker),
        lock_ttl=3.0,
        schedule=FAST,
        retry=FAST_RETRY,
    )
    await repo.create_workflow_instances(
        [
            NewWorkflowInstance(workflow_type=MIXED, business_id=f"o{i}", workflow_context={})
            for i in range(INSTANCES)
        ]
    )
    driver = WorkflowDriver(
        svc,
        concurrency=32,
        poll_interval=0.05,
        error_backoff_base=0.1,
        error_backoff_max=1.0,
        listen=False,
    )
    figures: dict[str, Any] = {}
    async with driver:
        async with asyncio.timeout(60):
            while await count("SELECT count(*) FROM task_instance WHERE status = 'completed'") < (
                INSTANCES * len(ALL_ROWS) // 4
            ):
                await asyncio.sleep(0.02)
        started = time.monotonic()
        before = await count("SELECT count(*) FROM task_instance WHERE status = 'completed'")
        figures["outage"] = await outage()
        figures["outage seconds"] = round(time.monotonic() - started, 2)
        figures["node rows completed before"] = before
        async with asyncio.timeout(90):  # nothing stuck: everything finishes within a bound
            while await count("SELECT count(*) FROM workflow_instance WHERE status IN ('init', 'running')"):
                await asyncio.sleep(0.05)
        figures["recovery seconds"] = round(time.monotonic() - started, 2)
    figures["store errors"] = dict(recorder.errors)
    figures["driver errors"] = driver.stats.errors
    figures["re-executed phases"] = _reexecuted(journal)
    await _check_everything_completed_once(count)
    return figures


def _reexecuted(journal: Journal) -> int:
    runs, checks = journal.count("done", "run"), journal.count("done", "check")
    phases = [runs[(i, n)] for i, n in runs if n in MIXED_EDGES] + [
        checks[(i, n)] for i, n in checks if n in WITH_CHECK
    ]
    assert len(phases) == INSTANCES * (len(MIXED_EDGES) + len(WITH_CHECK)), "a phase never finished"
    return sum(n - 1 for n in phases)


async def _check_everything_completed_once(count: Callable[[str], Awaitable[int]]) -> None:
    assert await count("SELECT count(*) FROM workflow_instance WHERE status = 'completed'") == INSTANCES
    rows = INSTANCES * len(ALL_ROWS)
    assert await count("SELECT count(*) FROM task_instance") == rows
    assert await count("SELECT count(*) FROM task_instance WHERE status = 'completed'") == rows
    assert await count("SELECT count(*) FROM completion_log") == rows, "a node completed twice"
    distinct = "SELECT count(*) FROM (SELECT DISTINCT instance_id, task_type FROM completion_log) AS d"
    assert await count(distinct) == rows


# ------------------------------------------------------------------------------------ PostgreSQL


def test_asyncpg_internal_client_errors_are_store_errors() -> None:
    """Seen under connection kills: asyncpg raises ``InternalClientError`` ("cannot switch to state 12;
    another operation (2) is in progress") for a query on a connection the server just dropped. It is a
    database failure like any other: the repo raises ``StoreError`` (a raw one killed the driver)."""
    asyncpg = pytest.importorskip("asyncpg")
    from asyncflow.store._errors import StoreErrors

    cause = asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
    with pytest.raises(StoreError) as info, StoreErrors("get_workflow_instance"):
        raise cause
    assert info.value.__cause__ is cause
    assert "another operation" in str(info.value)


@contextlib.asynccontextmanager
async def named_pg_engine(
    url: str, name: str, *, engine_url: str | None = None
) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """(an engine on a private schema whose connections say ``application_name = name``, through
    ``engine_url`` if given, and an admin engine on the same schema); the schema is dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(url, connect_args={"server_settings": {"search_path": schema}})
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    settings = {"search_path": schema, "application_name": name}
    engine = create_async_engine(
        engine_url or url, connect_args={"server_settings": settings}, pool_size=10, max_overflow=10
    )
    try:
        yield engine, admin
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


class TcpProxy:
    """A loopback TCP proxy to PostgreSQL that a test can cut: ``cut()`` aborts every proxied
    connection and refuses new ones until ``restore()`` (a full outage of this engine only)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.down = False
        self.port = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._transports.update((writer.transport, up_writer.transport))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst), name="asyncflow-test-proxy-pipe")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            self._transports.discard(dst.transport)
            dst.transport.abort()

    def cut(self) -> None:
        self.down = True
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    def restore(self) -> None:
        self.down = False

    async def aclose(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)


async def _pg_outage_run(url: str, name: str, outage_kind: str) -> dict[str, Any]:
    proxy = None
    engine_url = url
    if outage_kind == "refused":
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
        await proxy.start()
        engine_url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        async with named_pg_engine(url, name, engine_url=engine_url) as (engine, admin):
            repo = SQLAlchemyWorkflowRepo(engine)
            await repo.create_schema()
            async with admin.begin() as conn:
                for statement in SIDE_TABLES:
                    await conn.exec_driver_sql(statement)

            async def count(query: str) -> int:
                async with admin.connect() as conn:
                    return int((await conn.execute(text(query))).scalar_one())

            async def terminate() -> str:
                kill = text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :name AND pid <> pg_backend_pid()"
                )
                killed = rounds = 0
                deadline = time.monotonic() + 2.0
                async with admin.connect() as conn:
                    while time.monotonic() < deadline:
                        killed += (await conn.execute(kill, {"name": name})).scalar_one()
                        rounds += 1
                        await asyncio.sleep(0.01)
                return (
                    f"pg_terminate_backend: {killed} backends of the test terminated in {rounds} rounds, 2 s"
                )

            async def refuse() -> str:
                assert proxy is not None
                proxy.cut()
                await asyncio.sleep(3.0)
                proxy.restore()
                return f"every connection cut and {proxy.refused} new ones refused for 3 s"

            return await run_through_outage(repo, count, terminate if outage_kind == "terminate" else refuse)
    finally:
        if proxy is not None:
            await proxy.aclose()


@pytest.mark.postgres
@pytest.mark.parametrize("outage_kind", ["terminate", "refused"])
async def test_postgres_outage_mid_run(
    pg_url: str, outage_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``terminate``: the test's own backends killed with pg_terminate_backend every 10 ms for 2 s;
    ``refused``: through a loopback proxy, every connection cut and new ones refused for 3 s."""
    name = f"asyncflow-outage-{uuid.uuid4().hex[:8]}"
    with caplog.at_level(logging.WARNING, logger="asyncflow.driver"):
        figures = await _pg_outage_run(pg_url, name, outage_kind)
    print(f"PostgreSQL outage ({outage_kind}): {figures}")
    assert sum(figures["store errors"].values()) > 0, "no call failed: the outage did not bite"
    assert figures["driver errors"] > 0
    failures = [r.getMessage() for r in caplog.records if r.name == "asyncflow.driver"]
    assert any("StoreError" in m or "failed" in m for m in failures), failures[:5]


# ---------------------------------------------------------------------------------------- SQLite

HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("LOCKED", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
print("RELEASED", flush=True)
"""


async def hold_exclusive(path: str, seconds: float) -> str:
    """Hold ``BEGIN EXCLUSIVE`` on the file from another process for ``seconds``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, path, str(seconds), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        locked = (await proc.stdout.readline()).decode().strip()
        assert locked == "LOCKED", locked
        output = (await proc.stdout.read()).decode().strip()
        assert await proc.wait() == 0
    assert output == "RELEASED", output
    return f"another process held BEGIN EXCLUSIVE for {seconds} s"


@pytest.mark.parametrize("busy_timeout_ms", [None, 200], ids=["default-busy-timeout", "busy-timeout-200ms"])
async def test_sqlite_file_locked_by_another_process(busy_timeout_ms: int | None, tmp_path: Any) -> None:
    path = str(tmp_path / "outage.db")
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    reader = create_async_engine(f"sqlite+aiosqlite:///{path}")  # WAL: reads never wait for writers
    repo = SQLAlchemyWorkflowRepo(engine)  # installs its own connection settings first
    if busy_timeout_ms is not None:

        @event.listens_for(engine.sync_engine, "connect")
        def shorter_busy_timeout(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            cursor.close()

    try:
        await repo.create_schema()
        async with engine.begin() as conn:
            for statement in SQLITE_SIDE_TABLES:
                await conn.exec_driver_sql(statement)

        async def count(query: str) -> int:  # a plain reader: the repo's engine begins IMMEDIATE
            async with reader.connect() as conn:
                return int((await conn.execute(text(query))).scalar_one())

        figures = await run_through_outage(repo, count, lambda: hold_exclusive(path, 3.0))
    finally:
        await repo.aclose()
        await engine.dispose()
        await reader.dispose()
    print(f"SQLite lock (busy_timeout {busy_timeout_ms or 30000} ms): {figures}")
    if busy_timeout_ms is None:  # writers wait the lock out: no error at all
        assert figures["store errors"] == {} and figures["driver errors"] == 0
        assert figures["re-executed phases"] == 0
    else:
        assert sum(figures["store errors"].values()) > 0, "no call failed: the lock did not bite"
        assert figures["driver errors"] > 0
