"""Issue 8, item 1: driver processes SIGKILLed at random moments lose nothing and double nothing.

1,000 instances of the mixed workflow (fan-out, join, a wait check, a retry) on PostgreSQL (a private
schema) with the Redis lock (a private key prefix) or with ``DatabaseWorkflowLock`` (no Redis). A
driver process (``_crash_worker.py``) is started and killed with SIGKILL at a random moment (seeded
RNG, printed) five times; a sixth process finishes.
Then:

* every instance is ``completed``, with exactly one row per node, all ``completed``;
* a trigger that logs every transition of a node row into ``completed`` logged each node exactly once;
* a worker phase (``run``/``wait_check``) that finished more than once did so only because a process
  was killed after it finished and before its success was stored: its earlier successes all come from
  killed processes, and no surviving process ran a phase twice. The count is reported against the
  number of kills.

Override the seed with ``ASYNCFLOW_CRASH_SEED`` and the size with ``ASYNCFLOW_CRASH_INSTANCES``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from asyncflow.records import NewWorkflowInstance
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine

from ._crash_worker import SIDE_TABLES
from .helpers import ALL_ROWS, MIXED, MIXED_EDGES, WITH_CHECK

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
KILLS = 5
INSTANCES = int(os.environ.get("ASYNCFLOW_CRASH_INSTANCES", "1000"))
SEED = int(os.environ.get("ASYNCFLOW_CRASH_SEED", "20241127"))


async def start_worker(settings: dict[str, Any], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as stderr:  # the child keeps its own copy of the descriptor
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.reliability._crash_worker",
            json.dumps(settings),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        line = (await proc.stdout.readline()).decode()
    assert line.startswith("READY"), f"the driver process did not start: {line!r}\n{_tail(log)}"
    return proc


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def progress(engine: Any) -> tuple[int, int]:
    """(instances completed, node rows completed) right now."""
    async with engine.connect() as conn:
        done = text("SELECT count(*) FROM workflow_instance WHERE status = 'completed'")
        nodes = text("SELECT count(*) FROM task_instance WHERE status = 'completed'")
        return int((await conn.execute(done)).scalar_one()), int((await conn.execute(nodes)).scalar_one())


@pytest.mark.parametrize("lock_kind", [pytest.param("redis", marks=pytest.mark.redis), "database"])
async def test_sigkilled_drivers_lose_nothing_and_complete_each_node_once(
    pg_url: str, lock_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """With the Redis lock, or with ``DatabaseWorkflowLock`` (PostgreSQL alone: no Redis URL at all)."""
    redis_url = request.getfixturevalue("redis_url") if lock_kind == "redis" else None
    log = tmp_path / "drivers.log"
    rng = random.Random(SEED)
    print(f"crash test: seed {SEED}, {INSTANCES} instances, {KILLS} kills")
    async with isolated_pg_engine(pg_url) as engine:
        async with engine.connect() as conn:
            schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        async with engine.begin() as conn:
            for statement in SIDE_TABLES:
                await conn.exec_driver_sql(statement)
        await repo.create_workflow_instances(
            [
                NewWorkflowInstance(workflow_type=MIXED, business_id=f"crash-{i}", workflow_context={"i": i})
                for i in range(INSTANCES)
            ]
        )
        settings = {
            "url": pg_url,
            "schema": schema,
            "redis_url": redis_url,
            "prefix": f"asyncflow-crash:{uuid.uuid4().hex[:8]}:",
            "concurrency": 64,
            "lock_ttl": 2.0,
        }
        killed: list[int] = []
        for kill in range(KILLS):
            proc = await start_worker(settings, log)
            delay = rng.uniform(0.5, 2.5)
            await asyncio.sleep(delay)
            assert proc.returncode is None, f"the driver ended before its kill:\n{_tail(log)}"
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            killed.append(proc.pid)
            instances, nodes = await progress(engine)
            print(
                f"kill {kill + 1}: pid {proc.pid} after {delay:.3f} s; by then {instances} instances and "
                f"{nodes}/{INSTANCES * len(ALL_ROWS)} node rows completed"
            )
            assert instances < INSTANCES, "nothing left to run: raise INSTANCES"
        last = await start_worker(settings, log)
        assert last.stdout is not None
        async with asyncio.timeout(240):  # a loaded CI machine (4 test processes on 2 cores) took 100+ s
            output = (await last.stdout.read()).decode()
            assert await last.wait() == 0, f"{output}\n{_tail(log)}"
        print(f"last driver pid {last.pid}: {output.strip()}")
        await check(engine, killed, last.pid)


async def check(engine: Any, killed: list[int], survivor: int) -> None:
    async with engine.connect() as conn:
        statuses = dict(
            (await conn.execute(text("SELECT status, count(*) FROM workflow_instance GROUP BY 1"))).all()
        )
        rows = (
            await conn.execute(
                text(
                    "SELECT workflow_instance_id, count(*), count(*) FILTER (WHERE status = 'completed'), "
                    "array_agg(task_type ORDER BY task_type) FROM task_instance GROUP BY 1"
                )
            )
        ).all()
        logged = (
            await conn.execute(
                text("SELECT instance_id, task_type, count(*) FROM completion_log GROUP BY 1, 2")
            )
        ).all()
        done = (
            await conn.execute(
                text(
                    "SELECT instance_id, node, phase, array_agg(pid ORDER BY id) FROM calls "
                    "WHERE event = 'done' GROUP BY 1, 2, 3"
                )
            )
        ).all()
        starts = (await conn.execute(text("SELECT count(*) FROM calls WHERE event = 'start'"))).scalar_one()
    assert statuses == {"completed": INSTANCES}, statuses
    assert len(rows) == INSTANCES
    expected = sorted(ALL_ROWS)
    for instance_id, count, completed, types in rows:
        assert (count, completed, sorted(types)) == (len(ALL_ROWS), len(ALL_ROWS), expected), instance_id
    assert len(logged) == INSTANCES * len(ALL_ROWS)
    assert {n for _, _, n in logged} == {1}, "a node completion was recorded more than once"
    phases = {(node, "run") for node in MIXED_EDGES} | {(node, "check") for node in WITH_CHECK}
    seen = {(i, n, p) for i, n, p, _ in done}
    assert seen == {(i, n, p) for i in {r[0] for r in rows} for n, p in phases}, "a phase never finished"
    reexecuted: collections.Counter[int] = collections.Counter()
    for instance_id, node, phase, pids in done:
        *earlier, final = pids
        for pid in earlier:  # an earlier success that did not count: only a killed process leaves one
            assert pid in killed, (instance_id, node, phase, pids, killed)
            reexecuted[pid] += 1
        assert pids.count(survivor) <= 1 and all(pids.count(p) == 1 for p in set(pids) - set(killed))
        assert final in (*killed, survivor)
    total = sum(reexecuted.values())
    per_kill = [reexecuted[pid] for pid in killed]
    print(
        f"crash test: {KILLS} kills, {INSTANCES} instances, {INSTANCES * len(ALL_ROWS)} node completions "
        f"each logged once, {starts} worker calls, {total} phases re-executed after a kill "
        f"(per kill: {per_kill}), 0 nodes lost, 0 nodes doubled"
    )
