"""Issue 15: fenced passes. Two services whose locks do not exclude each other (each its own
``LocalWorkflowLock``, as two processes with a broken or lost lock would have) run passes of the same
instances at once: no pass writes anything once a newer pass of its instance has begun (0 stale
writes), each node is completed once, and every instance completes. Without the fence the same run
has stale writes (the check can fail). A stale pass stops at its next write, says so once, and its
worker calls in flight are cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from typing import Any

import pytest

from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import Pager, QueryWorkflowInstanceParams
from asyncflow.registry import Registry
from asyncflow.worker import NormalTaskWorker

from .fencing import FenceJournal, refused_as_stale, stale_writes
from .helpers import FAST, FAST_RETRY, MIXED, CompletionCounter, Journal, mixed_registry, rows_by_type

INSTANCES = 12


async def _race_two_services(repo: Any, *, fence: bool) -> tuple[FenceJournal, CompletionCounter]:
    rng = random.Random(15)

    async def jitter(node: str, phase: str, moment: str) -> None:
        await asyncio.sleep(rng.random() * 0.01)

    counter = CompletionCounter(repo)
    journal = FenceJournal(counter, fence=fence)
    services = [
        WorkflowService(
            journal,
            LocalWorkflowLock(),
            mixed_registry(Journal(), hook=jitter),
            schedule=FAST,
            retry=FAST_RETRY,
        )
        for _ in range(2)
    ]
    ids = [(await services[0].create_workflow(MIXED, f"b{i}")).id for i in range(INSTANCES)]
    for _ in range(60):
        states = [(await services[0].get_workflow_instance(i)).status for i in ids]
        pending = [i for i, status in zip(ids, states, strict=True) if status in ("init", "running")]
        if not pending:
            break
        await asyncio.gather(*(svc.run_workflow(i) for i in pending for svc in services))
        await asyncio.sleep(0.02)  # retries and not-ready checks come due
    return journal, counter


async def test_two_services_without_mutual_exclusion_make_no_stale_write(repo: Any) -> None:
    journal, counter = await _race_two_services(repo, fence=True)
    refused = refused_as_stale(journal.writes)
    passes, writes = len(journal.leases), len(journal.writes)
    print(f"two services: {passes} passes, {writes} writes, {refused} refused as stale")
    assert stale_writes(journal.leases, journal.writes) == []
    assert refused_as_stale(journal.writes) > 0  # the passes did overlap: the fence refused writes
    everything = QueryWorkflowInstanceParams(page=Pager(no_limit=True))
    assert [i.status for i in await repo.query_workflow_instances(everything)] == ["completed"] * INSTANCES
    assert set(counter.completions.values()) == {1}  # every node completed by exactly one write
    assert len(counter.completions) == INSTANCES * 8


async def test_without_the_fence_the_same_race_has_stale_writes(repo: Any) -> None:
    journal, _ = await _race_two_services(repo, fence=False)
    stale = stale_writes(journal.leases, journal.writes)
    print(f"two services, unfenced: {len(stale)} of {len(journal.writes)} writes stale")
    assert len(stale) > 0


# ------------------------------------------------------------------ one stale pass, step by step

_WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="")


async def test_a_stale_pass_stops_at_its_next_write_logs_once_and_cancels_its_workers(
    repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Pass 1 runs two branches; pass 2 (another lock) begins and fails both nodes once (retries).
    Then pass 1's first branch returns: its write is refused, the other branch's worker is cancelled,
    and the stored rows are those pass 2 wrote."""
    release = asyncio.Event()
    started = {"x": asyncio.Event(), "y": asyncio.Event()}
    cancelled: list[str] = []

    def worker(node: str) -> NormalTaskWorker:
        async def run(ctx: JSONContext) -> None:
            if _WHO.get() == "second":
                raise RuntimeError(f"{node}: not this time")
            started[node].set()
            try:
                if node == "x":
                    await release.wait()
                else:
                    await asyncio.Event().wait()  # until cancelled
            except asyncio.CancelledError:
                cancelled.append(node)
                raise
            ctx.set(["by"], "first")

        return NormalTaskWorker(run=run)

    registry = Registry()
    registry.load_workflow_config(
        WorkflowConfig(
            id="two",
            name="two",
            nodes=tuple(NodeConfig(id=node, name=node, fail_max_count=5) for node in ("x", "y")),
        )
    )
    for node in ("x", "y"):
        registry.register_workflow_task("two", node, worker(node))
    first = WorkflowService(repo, LocalWorkflowLock(), registry, schedule=FAST, retry=FAST_RETRY)
    second = WorkflowService(repo, LocalWorkflowLock(), registry, schedule=FAST, retry=FAST_RETRY)
    instance = await first.create_workflow("two", "b")

    pass1 = asyncio.create_task(first.run_workflow(instance.id))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 5)
    _WHO.set("second")
    await second.run_workflow(instance.id)  # the newer pass: both nodes fail once (retry)
    after_second = await rows_by_type(repo, instance.id)
    assert {t: r.fail_count for t, r in after_second.items() if t in "xy"} == {"x": 1, "y": 1}

    caplog.set_level(logging.INFO, logger="asyncflow.engine")
    release.set()
    result = await asyncio.wait_for(pass1, 5)
    assert result.status == "running"
    assert cancelled == ["y"]  # the worker call in flight was cancelled
    assert await rows_by_type(repo, instance.id) == after_second  # pass 1 wrote nothing more
    stale = [r for r in caplog.records if "newer pass" in r.getMessage()]
    assert len(stale) == 1 and stale[0].levelno == logging.WARNING
