"""Issue 15, item 3: the review's Redis-restart scenario, with the fence.

A private ``redis-server`` holds the ``RedisWorkflowLock`` keys (TTL 9 s, renewed every 3 s) of two
processes on one PostgreSQL schema: a driver, and a second process that keeps calling
``run_workflow`` on the same unfinished instances. While the driver's passes are in flight the test
kills Redis (SIGKILL) and starts it again, empty: every key is gone, so the second process takes the
locks of instances whose passes are still running in the driver, and begins newer passes of them.

Both processes journal each pass's leased read and each fenced step (:mod:`.fencing`). With the fence,
no step of an older pass applies once a newer pass of its instance began: 0 stale writes, although
the store refused some (the passes did overlap), and every instance completes with each node
completed once. Without the fence (the steps sent without their epoch) the same run has stale writes:
the check can fail.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from asyncflow.records import NewWorkflowInstance
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine

from ._fence_worker import NODES, WORKFLOW
from .conftest import PrivateRedis
from .fencing import refused_as_stale, stale_writes

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
INSTANCES = 24
LOCK_TTL = 9.0


async def _start(settings: dict[str, Any], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tests.reliability._fence_worker", json.dumps(settings)),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        line = (await proc.stdout.readline()).decode()
    assert line.startswith("READY"), f"{settings['role']} did not start: {line!r}\n{_tail(log)}"
    return proc


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def _in_flight(engine: Any) -> int:
    """Instances whose pass has written its first node (a pass is running in them right now)."""
    async with engine.connect() as conn:
        query = text("SELECT count(DISTINCT workflow_instance_id) FROM task_instance WHERE task_type = 'a'")
        return int((await conn.execute(query)).scalar_one())


async def _run(pg_url: str, redis: PrivateRedis, tmp_path: Path, *, fence: bool) -> dict[str, Any]:
    log = tmp_path / "processes.log"
    async with isolated_pg_engine(pg_url) as engine:
        async with engine.connect() as conn:
            schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.migrate()
        news = [
            NewWorkflowInstance(workflow_type=WORKFLOW, business_id=f"r{i}", workflow_context={})
            for i in range(INSTANCES)
        ]
        await repo.create_workflow_instances(news)
        base = {
            "url": pg_url,
            "schema": schema,
            "redis_url": redis.url,
            "prefix": f"asyncflow-restart:{uuid.uuid4().hex[:8]}:",
            "lock_ttl": LOCK_TTL,
            "fence": fence,
        }
        outs = [tmp_path / f"{role}.json" for role in ("driver", "runner")]
        go = tmp_path / "go"
        base["go"] = str(go)
        runner = await _start({**base, "role": "runner", "out": str(outs[1])}, log)
        driver = await _start({**base, "role": "driver", "out": str(outs[0])}, log)
        async with asyncio.timeout(30):  # the driver's passes are in flight ...
            while await _in_flight(engine) < INSTANCES // 2:
                await asyncio.sleep(0.02)
        go.touch()
        await asyncio.sleep(0.3)  # ... and the second process's attempts fail on the held keys
        await redis.stop()  # SIGKILL: every key is lost
        await redis.start()  # empty
        async with asyncio.timeout(120):
            for proc in (driver, runner):
                assert await proc.wait() == 0, _tail(log)
        journals = [json.loads(out.read_text()) for out in outs]
        async with engine.connect() as conn:
            statuses = (
                await conn.execute(text("SELECT status, count(*) FROM workflow_instance GROUP BY 1"))
            ).all()
            nodes = (
                await conn.execute(text("SELECT count(*) FROM task_instance WHERE status = 'completed'"))
            ).scalar_one()
        await repo.aclose()
    leases = [tuple(lease) for journal in journals for lease in journal["leases"]]
    writes = [tuple(write) for journal in journals for write in journal["writes"]]
    return {
        "statuses": dict(statuses),
        "completed_nodes": nodes,
        "stale": stale_writes(leases, writes),  # type: ignore[arg-type]
        "refused": refused_as_stale(writes),  # type: ignore[arg-type]
        "runner_passes": len(journals[1]["leases"]),
    }


async def test_a_redis_restart_mid_pass_makes_no_stale_write(
    pg_url: str, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    result = await _run(pg_url, private_redis, tmp_path, fence=True)
    print(f"redis restart, fenced: {result['refused']} writes refused as stale, 0 applied")
    assert result["statuses"] == {"completed": INSTANCES}
    assert result["completed_nodes"] == INSTANCES * (len(NODES) + 2)  # one row per node, root and end
    assert result["runner_passes"] > 0  # the second process did begin passes
    assert result["refused"] > 0  # older passes tried to write after newer ones began: refused
    assert result["stale"] == []


async def test_without_the_fence_the_restart_lets_older_passes_write(
    pg_url: str, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    result = await _run(pg_url, private_redis, tmp_path, fence=False)
    print(f"redis restart, unfenced: {len(result['stale'])} stale writes applied")
    assert len(result["stale"]) > 0
