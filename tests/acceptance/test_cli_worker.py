"""``asyncflow worker APP`` as a real process: it drives the app's instances to the end, stops cleanly on
SIGTERM/SIGINT with a summary, and refuses a bad APP with a clear message."""

from __future__ import annotations

import asyncio
import pathlib
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import QueryWorkflowInstanceParams
from asyncflow.registry import Registry
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.store.tables import SCHEMA_VERSION
from asyncflow.worker import NormalTaskWorker

from .cli_helpers import assert_clean_error, call_cli, cli_env, run_cli, scratch_database

APP = """
import gc

import asyncflow as af

CONFIG = {"id": "ticket", "nodes": [{"id": "triage", "next_nodes": ["answer"]}, {"id": "answer"}]}
registry = af.Registry()
registry.load_workflow_config(CONFIG)


@registry.task("ticket", "triage")
async def triage(ctx):
    ctx.set(["queue"], "support")


@registry.task("ticket", "answer")
async def answer(ctx):
    queue, _ = ctx.get_string(af.PRE_NODE_CONTEXT, "triage", "queue")
    ctx.set(["answered_by"], queue)
    ctx.set(["frozen_objects"], gc.get_freeze_count())  # the worker froze what start-up made
    ctx.set(["gc_threshold"], gc.get_threshold()[0])


def broken():
    other = af.Registry()
    other.load_workflow_config({"id": "half", "nodes": [{"id": "has_no_worker"}]})
    return other
"""

CONFIG = {"id": "ticket", "nodes": [{"id": "triage", "next_nodes": ["answer"]}, {"id": "answer"}]}


async def _create(url: str, count: int) -> None:
    registry = Registry()
    registry.load_workflow_config(CONFIG)
    for key in ("triage", "answer"):  # create_workflow checks the definition builds
        registry.register_workflow_task("ticket", key, NormalTaskWorker(run=lambda ctx: None))
    repo = SQLAlchemyWorkflowRepo(url)
    try:
        svc = WorkflowService(repo, LocalWorkflowLock(), registry)
        for number in range(count):
            await svc.create_workflow("ticket", f"T-{number}")
    finally:
        await repo.aclose()


async def _execute(url: str, statements: tuple[str, ...]) -> None:
    repo = SQLAlchemyWorkflowRepo(url)
    try:
        async with repo.engine.begin() as conn:
            for statement in statements:
                await conn.exec_driver_sql(statement)
    finally:
        await repo.aclose()


async def _completed(url: str) -> int:
    repo = SQLAlchemyWorkflowRepo(url)
    try:
        return await repo.count_workflow_instances(QueryWorkflowInstanceParams(status_in=("completed",)))
    finally:
        await repo.aclose()


def _drive_with_worker(
    tmp_path: pathlib.Path,
    url: str,
    stop_signal: signal.Signals,
    extra: tuple[str, ...] = (),
    *,
    before: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``before``: SQL run on the database after the instances are created, before the worker starts."""
    (tmp_path / "helpdesk.py").write_text(APP)
    assert call_cli("init-db", "--db", url, cwd=tmp_path).returncode == 0
    asyncio.run(_create(url, 5))
    if before:
        asyncio.run(_execute(url, before))
    args = ["worker", "helpdesk:registry", "--db", url, "--poll-interval", "0.2", "--grace", "5", *extra]
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncflow", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while asyncio.run(_completed(url)) < 5:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the worker did not complete the instances"
            time.sleep(0.2)
        proc.send_signal(stop_signal)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_worker_on_sqlite_stops_on_sigterm(tmp_path: pathlib.Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/worker.db"
    result = _drive_with_worker(tmp_path, url, signal.SIGTERM)
    assert result.returncode == 0, result.stderr
    assert "asyncflow worker started" in result.stderr
    assert "received SIGTERM: stopping" in result.stderr
    assert "asyncflow worker stopped:" in result.stderr and "5 completed" in result.stderr
    assert "Traceback" not in result.stderr
    shown = run_cli("show", "1", "--app", "helpdesk:registry", "--json", "--db", url, cwd=tmp_path)
    assert '"answered_by": "support"' in shown.stdout
    frozen = re.search(r'"frozen_objects": (\d+)', shown.stdout)
    assert frozen is not None and int(frozen.group(1)) > 10_000, shown.stdout  # modules, engine, pool
    assert '"gc_threshold": 10000' in shown.stdout  # young collections a tenth as often


@pytest.mark.postgres
@pytest.mark.redis
def test_worker_on_postgres_and_redis_stops_on_sigint(
    tmp_path: pathlib.Path, postgres_url: str, redis_url: str
) -> None:
    with scratch_database(postgres_url, f"worker_{uuid.uuid4().hex[:12]}") as url:
        result = _drive_with_worker(tmp_path, url, signal.SIGINT, ("--redis", redis_url))
    assert result.returncode == 0, result.stderr
    assert "lock RedisWorkflowLock" in result.stderr
    assert "received SIGINT: stopping" in result.stderr
    assert "5 completed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.postgres
def test_worker_on_postgres_alone_keeps_the_lock_in_the_database(
    tmp_path: pathlib.Path, postgres_url: str
) -> None:
    with scratch_database(postgres_url, f"worker_{uuid.uuid4().hex[:12]}") as url:
        result = _drive_with_worker(tmp_path, url, signal.SIGINT)
    assert result.returncode == 0, result.stderr
    assert "lock DatabaseWorkflowLock" in result.stderr
    assert "5 completed" in result.stderr
    assert "Traceback" not in result.stderr and "WARNING" not in result.stderr


@pytest.mark.postgres
def test_worker_on_a_database_not_migrated_yet_says_so_and_still_claims(
    tmp_path: pathlib.Path, postgres_url: str
) -> None:
    """This version deployed before `asyncflow migrate`, on a database of the version before (schema 12:
    no claim function): the worker warns, and its driver claims through the older statement."""
    previous = SCHEMA_VERSION - 1
    before = (f"DELETE FROM asyncflow_schema WHERE version > {previous}", "DROP FUNCTION asyncflow_claim_v1")
    with scratch_database(postgres_url, f"worker_{uuid.uuid4().hex[:12]}") as url:
        result = _drive_with_worker(tmp_path, url, signal.SIGINT, before=before)
    assert result.returncode == 0, result.stderr
    assert "5 completed" in result.stderr and "Traceback" not in result.stderr
    assert (
        f"the database has asyncflow schema version {previous}, older than this asyncflow's "
        f"{SCHEMA_VERSION}: run `asyncflow migrate`"
    ) in result.stderr
    assert result.stderr.count("no asyncflow_claim_v1() function") == 1  # once, not per claim


@pytest.mark.postgres
async def test_a_role_that_may_not_read_the_schema_version_gets_a_warning_not_a_refusal(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Least privilege: the worker's role may use the work tables but not read ``asyncflow_schema``."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    from asyncflow.cli.worker import _check_schema_version
    from tests.conftest import isolated_pg_engine

    role = f"worker_{uuid.uuid4().hex[:12]}"
    async with isolated_pg_engine(postgres_url) as owner:
        async with SQLAlchemyWorkflowRepo(owner) as repo:
            await repo.migrate()
        async with owner.begin() as conn:
            schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
            await conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
            await conn.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'))
            await conn.execute(text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON workflow_instance TO "{role}"'))
        url = make_url(postgres_url).set(username=role, password=None)
        worker = create_async_engine(url, connect_args={"server_settings": {"search_path": schema}})
        try:
            async with SQLAlchemyWorkflowRepo(worker) as repo:
                assert await repo.count_workflow_instances(QueryWorkflowInstanceParams()) == 0  # it may work
                with caplog.at_level("WARNING", logger="asyncflow.cli.worker"):
                    await _check_schema_version(repo)  # does not raise
            assert "could not read the database's asyncflow schema version" in caplog.text
            assert "permission denied" in caplog.text
        finally:
            await worker.dispose()
            async with owner.begin() as conn:
                await conn.execute(text(f'DROP OWNED BY "{role}"'))
                await conn.execute(text(f'DROP ROLE "{role}"'))


def test_worker_refuses_a_bad_app(tmp_path: pathlib.Path) -> None:
    (tmp_path / "helpdesk.py").write_text(APP)
    url = f"sqlite+aiosqlite:///{tmp_path}/w.db"
    assert call_cli("init-db", "--db", url, cwd=tmp_path).returncode == 0
    assert_clean_error(run_cli("worker", "helpdesk:missing", "--db", url, cwd=tmp_path), 2, "no attribute")
    broken = run_cli("worker", "helpdesk:broken", "--db", url, cwd=tmp_path)
    assert_clean_error(broken, 2, "has_no_worker")
    no_tables = run_cli(
        "worker", "helpdesk:registry", "--db", f"sqlite+aiosqlite:///{tmp_path}/w2.db", cwd=tmp_path
    )
    assert_clean_error(no_tables, 1, "does not exist")


SLOW_APP = """
import asyncio, pathlib
import asyncflow as af

registry = af.Registry()
registry.load_workflow_config(
    {"id": "ticket", "nodes": [{"id": "triage", "next_nodes": ["answer"]}, {"id": "answer"}]}
)


@registry.task("ticket", "triage")
async def triage(ctx):
    pathlib.Path("triage-started").touch()
    await asyncio.Event().wait()  # until cancelled


@registry.task("ticket", "answer")
async def answer(ctx):
    pass
"""


def test_a_second_sigint_stops_the_worker_at_once(tmp_path: pathlib.Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/slow.db"
    (tmp_path / "slowdesk.py").write_text(SLOW_APP)
    assert call_cli("init-db", "--db", url, cwd=tmp_path).returncode == 0
    asyncio.run(_create(url, 1))
    args = ["worker", "slowdesk:registry", "--db", url, "--poll-interval", "0.2", "--grace", "120"]
    with subprocess.Popen(
        [sys.executable, "-m", "asyncflow", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            deadline = time.monotonic() + 60
            while not (tmp_path / "triage-started").exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the worker did not start the node"
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)  # the first stop waits out its 120 s grace ...
            assert proc.poll() is None
            began = time.monotonic()
            proc.send_signal(signal.SIGINT)  # ... the second one does not
            _, stderr = proc.communicate(timeout=30)
            took = time.monotonic() - began
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stderr
    assert took < 15, took
    assert "received SIGINT again: stopping now" in stderr and "Traceback" not in stderr
    assert "cancelling 1 passes" in stderr
    shown = run_cli("show", "1", "--app", "slowdesk:registry", "--json", "--db", url, cwd=tmp_path)
    assert '"status": "failed"' not in shown.stdout  # resumable: nothing failed, the node runs again


async def test_a_cancelled_stop_leaves_no_task_of_its_own_running() -> None:
    """``_stop`` runs ``driver.stop(grace)`` and a wait for the second signal as two tasks: cancelled
    itself (the worker's own task cancelled during a graceful stop), it cancelled them but returned
    before they ended, leaving them running on (orphans) after the worker had stopped. The real
    driver's ``stop`` ends one loop turn after its cancellation, before the caller resumes: this one
    takes a few more turns to wind down, as winding down may."""
    from asyncflow.cli.worker import _stop
    from asyncflow.driver import WorkflowDriver
    from asyncflow.store.memory import MemoryWorkflowRepo
    from asyncflow.worker import current_node

    class SlowToStop(WorkflowDriver):
        async def stop(self, grace: float = 10.0) -> None:
            try:
                await super().stop(grace)
            finally:
                for _ in range(3):
                    await asyncio.sleep(0)

    started = asyncio.Event()

    async def hang(ctx: object) -> None:
        if current_node().task_type == "triage":
            started.set()
            await asyncio.Event().wait()  # runs until cancelled

    registry = Registry()
    registry.load_workflow_config(CONFIG)
    registry.register_workflow_task("ticket", "triage", NormalTaskWorker(run=hang))
    registry.register_workflow_task("ticket", "answer", NormalTaskWorker(run=hang))
    service = WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry)
    await service.create_workflow("ticket", "t-1")
    driver = SlowToStop(service, concurrency=1, poll_interval=0.05)

    def stop_tasks() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if t.get_name().startswith("asyncflow-worker-stop")]

    async with driver:
        async with asyncio.timeout(10):
            await started.wait()
        stopping = asyncio.create_task(_stop(driver, 60.0, asyncio.Event()))
        async with asyncio.timeout(10):
            while len(stop_tasks()) < 2:  # both of its tasks exist: it waits out the grace
                await asyncio.sleep(0.01)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        assert [t for t in stop_tasks() if not t.done()] == []
        await driver.stop(grace=0)
