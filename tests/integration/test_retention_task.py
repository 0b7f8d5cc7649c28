"""The worker's background retention (``asyncflow worker --retain``): a named task that purges and
stops with its block."""

from __future__ import annotations

import asyncio
import time

from asyncflow.cli.purge import duration, retaining
from asyncflow.clock import FakeClock
from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import QueryWorkflowInstanceParams
from asyncflow.registry import Registry
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.worker import NormalTaskWorker


async def _ok(ctx: JSONContext) -> None:
    return None


def test_duration_units() -> None:
    assert [duration(t) for t in ("30d", "12h", "90m", "45s", "2w", "7", "1.5h")] == [
        30 * 86400,
        12 * 3600,
        5400,
        45,
        2 * 604800,
        7,
        5400,
    ]


async def test_retaining_purges_in_a_named_task_that_stops_with_the_block() -> None:
    registry = Registry()
    registry.load_workflow_config(WorkflowConfig(id="a", nodes=(NodeConfig("A"),)))
    registry.register_workflow_task("a", "A", NormalTaskWorker(run=_ok))
    svc = WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry)
    for i in range(3):
        await svc.create_workflow("a", f"a{i}", run=True)
    running = await svc.create_workflow("a", "later")  # init: never purged
    svc.clock = FakeClock(time.time() + 7200)
    async with retaining(svc, retain=3600, interval=0.01) as task:
        assert task is not None and task.get_name() == "asyncflow-worker-purge"
        for _ in range(500):
            if await svc.count_workflow_instances(QueryWorkflowInstanceParams()) == 1:
                break
            await asyncio.sleep(0.01)
    assert task.done()
    assert not any(t.get_name() == "asyncflow-worker-purge" for t in asyncio.all_tasks())
    left = await svc.query_workflow_instances(QueryWorkflowInstanceParams())
    assert [i.id for i in left] == [running.id]
    async with retaining(svc, retain=None) as none:
        assert none is None
