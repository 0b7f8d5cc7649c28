"""Found by the Redis outage test (issue 8, item 3): a driver at its concurrency cap with a lock conflict
waiting to be re-tried must still let its running passes finish.

Before the fix the driver's loop computed a zero timeout for the due re-try, could not start it (no free
slot) and went round again without ever yielding to the event loop: the passes holding the slots could
never finish, and the whole process hung at 100 % CPU (during a Redis outage every pass is a lock
failure, so this happened at once).
"""

from __future__ import annotations

import asyncio

import pytest

from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver
from asyncflow.engine.service import WorkflowService, lock_key
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.registry import Registry
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.worker import NormalTaskWorker


@pytest.mark.timeout(30)  # the bug hangs the event loop: only the signal-based timeout can end it
async def test_a_due_retry_at_the_concurrency_cap_does_not_starve_running_passes() -> None:
    registry = Registry()
    registry.load_workflow_config(WorkflowConfig(id="slow", nodes=(NodeConfig(id="A"),)))

    async def work(ctx: JSONContext) -> None:
        await asyncio.sleep(0.3)  # needs the event loop to come back to it

    registry.register_workflow_task("slow", "A", NormalTaskWorker(run=work))
    repo, lock = MemoryWorkflowRepo(), LocalWorkflowLock()
    svc = WorkflowService(repo, lock, registry, lock_ttl=5.0)
    held = await svc.create_workflow("slow", "held")  # claimed first (oldest): its lock is taken
    free = await svc.create_workflow("slow", "free")
    driver = WorkflowDriver(svc, concurrency=1, poll_interval=5.0)
    async with lock.hold(lock_key(held.id), 5.0):
        # the pass of `held` fails on the lock and is re-tried 10 ms later, while `free` fills the one
        # slot for 300 ms
        async with asyncio.timeout(10):
            async with driver:
                while (await svc.get_workflow_instance(free.id)).status != "completed":
                    await asyncio.sleep(0.01)
    assert driver.stats.lock_skips >= 1
    assert (await svc.get_workflow_instance(free.id)).status == "completed"
