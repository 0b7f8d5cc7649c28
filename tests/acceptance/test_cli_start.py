"""``asyncflow start`` (delayed, unique, --wait with a real worker process) and ``asyncflow schedules``;
bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import asyncio
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from asyncflow.records import NewWorkflowInstance, QueryWorkflowInstanceParams
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.acceptance.cli_helpers import assert_clean_error, call_cli, cli_env

APP = """
import asyncflow as af

registry = af.Registry()
registry.load_workflow_config({"id": "report", "nodes": [{"id": "A"}]})


@registry.task("report", "A")
async def a(ctx):
    ctx.set(["done"], True)


registry.add_schedule(af.Schedule(id="nightly", workflow_type="report", cron="0 2 * * *",
                                  timezone="Europe/Paris"))
registry.add_schedule(af.Schedule(id="hourly", workflow_type="report", cron="0 * * * *"))
"""


@pytest.fixture
def app_db(tmp_path: pathlib.Path) -> str:
    (tmp_path / "reports.py").write_text(APP)
    url = f"sqlite+aiosqlite:///{tmp_path}/app.db"
    assert call_cli("init-db", "--db", url, cwd=tmp_path).returncode == 0
    return url


async def _instances(url: str) -> list[tuple[str, str, int]]:
    async with SQLAlchemyWorkflowRepo(url) as repo:
        found = await repo.query_workflow_instances(QueryWorkflowInstanceParams())
    return [(i.business_id, i.status, i.next_run_at) for i in found]


async def _fire(url: str, schedule_id: str, tick: str) -> None:
    async with SQLAlchemyWorkflowRepo(url) as repo:
        await repo.register_schedules({schedule_id: "[]"}, 0, 0)
        new = NewWorkflowInstance(
            workflow_type="report", business_id=f"{schedule_id}@{tick}", workflow_context={}
        )
        assert await repo.fire_schedule_tick(schedule_id, tick, new, now_ms=1, prune_before="") is not None


def test_start_creates_delays_and_keeps_unique_keys_unique(tmp_path: pathlib.Path, app_db: str) -> None:
    made = call_cli("start", "report", "r-1", "--app", "reports:registry", "--db", app_db, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "created workflow instance 1 (report, r-1)" in made.stdout
    again = call_cli(
        "start",
        "report",
        "r-1",
        "--app",
        "reports:registry",
        "--db",
        app_db,
        "--unique",
        "active",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert "created workflow instance 2" in again.stdout  # the first one was not created unique
    third = call_cli(
        "start",
        "report",
        "r-1",
        "--app",
        "reports:registry",
        "--db",
        app_db,
        "--unique",
        "always",
        cwd=tmp_path,
    )
    assert (third.returncode, third.stdout.strip()) == (0, "workflow instance 2 already exists (report, r-1)")
    before = time.time()
    later = call_cli(
        "start",
        "report",
        "r-2",
        "--app",
        "reports:registry",
        "--db",
        app_db,
        "--start-in",
        "10m",
        "--context",
        '{"k": 1}',
        cwd=tmp_path,
    )
    assert later.returncode == 0 and "(delayed)" in later.stdout, later.stderr
    at = call_cli(
        "start",
        "report",
        "r-3",
        "--app",
        "reports:registry",
        "--db",
        app_db,
        "--start-at",
        "2099-01-01T00:00:00Z",
        cwd=tmp_path,
    )
    assert at.returncode == 0, at.stderr
    rows = asyncio.run(_instances(app_db))
    assert [r[0] for r in rows] == ["r-1", "r-1", "r-2", "r-3"]
    assert before * 1000 + 590_000 < rows[2][2] < time.time() * 1000 + 610_000
    assert rows[3][2] == 4_070_908_800_000


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--start-at", "2030-01-01T09:00:00"), "no time zone"),
        (("--start-at", "tomorrow"), "ISO 8601"),
        (("--start-in", "10 minutes"), "duration"),
        (("--start-in", "10m", "--start-at", "2030-01-01T09:00:00Z"), "not allowed with"),
        (("--unique", "sometimes"), "invalid choice"),
        (("--context", "[1]"), "JSON object"),
        (("--context", "{"), "not valid JSON"),
        (("--context", '{"a":' + "[" * 5000 + "]" * 5000 + "}"), "nested more than 100 levels"),
        (("--timeout", "5"), "--timeout needs --wait"),
    ],
)
def test_bad_start_input_exits_2_and_writes_nothing(
    tmp_path: pathlib.Path, app_db: str, extra: tuple[str, ...], words: str
) -> None:
    result = call_cli(
        "start", "report", "x", "--app", "reports:registry", "--db", app_db, *extra, cwd=tmp_path
    )
    assert_clean_error(result, 2, words)
    assert asyncio.run(_instances(app_db)) == []


def test_an_unknown_workflow_type_exits_1(tmp_path: pathlib.Path, app_db: str) -> None:
    result = call_cli("start", "nope", "x", "--app", "reports:registry", "--db", app_db, cwd=tmp_path)
    assert_clean_error(result, 1, "nope")


def test_wait_returns_when_a_worker_process_completes_it(tmp_path: pathlib.Path, app_db: str) -> None:
    timed_out = call_cli(
        "start",
        "report",
        "w-0",
        "--app",
        "reports:registry",
        "--db",
        app_db,
        "--wait",
        "--timeout",
        "0.5",
        cwd=tmp_path,
    )
    assert_clean_error(timed_out, 1, "did not end within 0.5 s")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asyncflow",
            "worker",
            "reports:registry",
            "--db",
            app_db,
            "--poll-interval",
            "0.2",
        ],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        done = call_cli(
            "start",
            "report",
            "w-1",
            "--app",
            "reports:registry",
            "--db",
            app_db,
            "--wait",
            "--timeout",
            "60",
            cwd=tmp_path,
        )
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert done.stdout.splitlines()[-1] == "workflow instance 2 completed"
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.communicate()


def test_schedules_lists_next_and_last_fired_ticks(tmp_path: pathlib.Path, app_db: str) -> None:
    result = call_cli("schedules", "--app", "reports:registry", "--db", app_db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, _, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "WORKFLOW", "CRON", "TIME", "ZONE", "NEXT", "TICK", "LAST", "FIRED"]
    assert rows[0].split()[:2] == ["nightly", "report"]
    assert "Europe/Paris" in rows[0] and rows[0].rstrip().endswith("-")
    assert rows[1].split()[-2].endswith(":00:00Z")  # the next hourly tick, in UTC
    asyncio.run(_fire(app_db, "hourly", "2026-01-01T05:00:00Z"))
    fired = call_cli("schedules", "--app", "reports:registry", "--db", app_db, cwd=tmp_path)
    assert fired.stdout.splitlines()[3].split()[-1] == "2026-01-01T05:00:00Z"
    bare = tmp_path / "bare.py"
    bare.write_text("import asyncflow as af\nregistry = af.Registry()\n")
    none = call_cli("schedules", "--app", "bare:registry", "--db", app_db, cwd=tmp_path)
    assert (none.returncode, none.stdout.strip()) == (0, "no schedules in this app")


async def _to_version_13(url: str) -> None:
    """The database as asyncflow left it before schema version 14 (no schedule fingerprint)."""
    async with SQLAlchemyWorkflowRepo(url) as repo, repo.engine.begin() as conn:
        await conn.exec_driver_sql("ALTER TABLE asyncflow_schedule DROP COLUMN fingerprint")
        await conn.exec_driver_sql("DELETE FROM asyncflow_schema WHERE version >= 14")


def test_schedules_on_a_database_not_yet_migrated_names_migrate(tmp_path: pathlib.Path, app_db: str) -> None:
    # It ended with the raw store error ("no such column: fingerprint") and no word of what to do.
    asyncio.run(_to_version_13(app_db))
    result = call_cli("schedules", "--app", "reports:registry", "--db", app_db, cwd=tmp_path)
    assert_clean_error(result, 1, "schema version 13", "run `asyncflow migrate`")
    assert "no such column" not in result.stderr
    assert call_cli("migrate", "--db", app_db, cwd=tmp_path).returncode == 0
    listed = call_cli("schedules", "--app", "reports:registry", "--db", app_db, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr


def test_a_business_id_over_the_limit_exits_2_and_writes_nothing(tmp_path: pathlib.Path, app_db: str) -> None:
    """1,024 bytes of UTF-8 at most, on every backend (PostgreSQL alone refused longer ones, exit 1)."""
    too_long = "é" * 513  # 1,026 bytes
    result = call_cli("start", "report", too_long, "--app", "reports:registry", "--db", app_db, cwd=tmp_path)
    assert_clean_error(result, 2, "business_id must be at most 1024 bytes of UTF-8")
    assert asyncio.run(_instances(app_db)) == []
