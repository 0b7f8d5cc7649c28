"""A process of the Redis-restart test (``test_redis_restart.py``):
``python -m tests.reliability._fence_worker '<json settings>'``.

Settings: ``url``, ``schema``, ``redis_url``, ``prefix``, ``lock_ttl``, ``fence`` (send the steps'
lease epochs), ``role``, ``out`` and ``go`` (a file the runner waits for before it starts). Role
``driver`` runs a ``WorkflowDriver``; role ``runner`` calls ``run_workflow`` on every unfinished
instance over and over (a second process running the same instances, taking each instance's lock
whenever it can). Both use ``RedisWorkflowLock`` on the test's private redis-server, journal their
leased reads and fenced steps (:class:`FenceJournal`), print ``READY`` once started, stop when no
instance is left to run, and write the journal to ``out``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver
from asyncflow.engine.rules import SchedulePolicy
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import AsyncflowError
from asyncflow.lock.redis import RedisWorkflowLock
from asyncflow.registry import Registry
from asyncflow.retry import RetryPolicy
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.worker import NormalTaskWorker, current_node
from tests.reliability.fencing import FenceJournal

WORKFLOW = "slow4"
NODES = ("a", "b", "c", "d")
NODE_SECONDS = 0.5
"""Each node's work: a pass of an instance takes about two seconds, so a restart lands inside passes."""


def registry() -> Registry:
    made = Registry()
    nodes = tuple(
        NodeConfig(id=n, name=n, next_nodes=(NODES[i + 1],) if i + 1 < len(NODES) else (), fail_max_count=20)
        for i, n in enumerate(NODES)
    )
    made.load_workflow_config(WorkflowConfig(id=WORKFLOW, name=WORKFLOW, nodes=nodes))

    async def work(ctx: JSONContext) -> None:
        await asyncio.sleep(NODE_SECONDS)
        ctx.set([f"by_{current_node().task_type}"], os.getpid())

    for node in NODES:
        made.register_workflow_task(WORKFLOW, node, NormalTaskWorker(run=work))
    return made


async def main(settings: dict[str, Any]) -> None:
    server = {"search_path": settings["schema"], "application_name": f"asyncflow-fence-{os.getpid()}"}
    engine = create_async_engine(
        settings["url"], connect_args={"server_settings": server}, pool_size=8, max_overflow=8
    )
    repo = SQLAlchemyWorkflowRepo(engine)
    journal = FenceJournal(repo, fence=settings["fence"])
    lock = RedisWorkflowLock(settings["redis_url"], prefix=settings["prefix"], op_timeout=0.5)
    schedule = SchedulePolicy(poll_interval=0.1)
    retry = RetryPolicy(initial_interval=0.1, max_interval=0.3)
    svc = WorkflowService(
        journal, lock, registry(), lock_ttl=settings["lock_ttl"], schedule=schedule, retry=retry
    )
    left = text("SELECT id FROM workflow_instance WHERE status IN ('init', 'running') ORDER BY id")
    try:
        if settings["role"] == "driver":
            async with WorkflowDriver(svc, concurrency=32, poll_interval=0.1):
                print("READY", flush=True)
                while await _pending(engine, left):
                    await asyncio.sleep(0.1)
        else:
            print("READY", flush=True)
            go = Path(settings["go"])
            while not go.exists():  # noqa: ASYNC240 - a file another process makes: poll it
                await asyncio.sleep(0.01)
            while ids := await _pending(engine, left):
                await asyncio.gather(*(_try_run(svc, i) for i in ids))
                await asyncio.sleep(0.05)
    finally:
        Path(settings["out"]).write_text(json.dumps(journal.dump()))  # noqa: ASYNC240 - at exit
        await lock.aclose()
        await repo.aclose()
        await engine.dispose()


async def _pending(engine: Any, query: Any) -> list[int]:
    async with engine.connect() as conn:
        return [row[0] for row in (await conn.execute(query)).all()]


async def _try_run(svc: WorkflowService, instance_id: int) -> None:
    with contextlib.suppress(AsyncflowError):  # the lock is held elsewhere, or Redis is down: next round
        await svc.run_workflow(instance_id)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
