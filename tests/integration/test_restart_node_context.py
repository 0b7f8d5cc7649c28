"""restart_workflow_node with a new workflow context, clear_event and timeout, on every backend."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver
from asyncflow.engine.service import WorkflowService, lock_key
from asyncflow.errors import LockFailedError, ParamInvalidError, TaskFailedTerminate, TaskNotReady
from asyncflow.records import NodeExternalEvent
from asyncflow.retry import RetryPolicy
from asyncflow.status import NODE_EVENT, WORKFLOW_CONTEXT

from .engine_helpers import Calls, config, recording_worker, registry_with, rows_of, statuses


class PausingRepo:
    """Delegates to ``repo``; pauses right after the instance update that writes a workflow context."""

    def __init__(self, repo: Any, pause: float) -> None:
        self._repo = repo
        self._pause = pause
        self.paused = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repo, name)

    async def update_workflow_instances(self, where: Any, fields: Any) -> int:
        changed = await self._repo.update_workflow_instances(where, fields)
        if fields.workflow_context is not None:
            self.paused.set()
            await asyncio.sleep(self._pause)  # a live driver gets every chance to run the instance here
        return int(changed)


async def test_context_change_and_restart_are_one_step_for_a_live_driver(
    engine_repo: Any, local_lock: Any
) -> None:
    seen: list[tuple[Any, int]] = []  # (workflow_context v, fail_count before the attempt) per run of A

    def a_run(ctx: JSONContext) -> None:
        version = ctx.get(WORKFLOW_CONTEXT, "v")[0]
        seen.append((version, len(seen)))
        if version != 2:
            raise RuntimeError("needs v=2")  # retryable: due again after 10 ms

    calls = Calls()
    cfg = config("race", {"A": ["B"], "B": []})
    registry = registry_with(cfg, calls, {"A": recording_worker(calls, a_run)})
    repo = PausingRepo(engine_repo, pause=0.3)
    svc = WorkflowService(repo, local_lock, registry, retry=RetryPolicy(initial_interval=0.01, jitter=0))  # type: ignore[arg-type]
    inst = await svc.create_workflow("race", "b", context={"v": 1})
    async with WorkflowDriver(svc, concurrency=4, poll_interval=0.01):
        for _ in range(500):
            if len(seen) >= 3:
                break
            await asyncio.sleep(0.01)
        restart = asyncio.create_task(  # a pass may hold the lock right now: wait for it
            svc.restart_workflow_node(inst.id, "A", workflow_context={"v": 2}, timeout=5)
        )
        await asyncio.wait_for(repo.paused.wait(), 10)
        runs_before_pause = len(seen)
        await asyncio.sleep(0.25)  # inside the restart's transaction, still holding the instance lock
        runs_during_pause = len(seen) - runs_before_pause
        await restart
        for _ in range(500):
            if (await svc.get_workflow_instance(inst.id)).status == "completed":
                break
            await asyncio.sleep(0.01)
    assert runs_during_pause == 0
    assert (await svc.get_workflow_instance(inst.id)).status == "completed"
    assert [v for v, _ in seen[:-1]] == [1] * (len(seen) - 1) and seen[-1][0] == 2
    rows = await rows_of(svc, inst.id)
    assert rows["A"].fail_count == 0  # reset by the restart, then completed at the first try
    assert rows["B"].node_context[WORKFLOW_CONTEXT] == {"v": 2}
    assert (await svc.repo.get_workflow_instance(inst.id)).workflow_context == {"v": 2}


def approval(calls: Calls) -> Any:
    def check(ctx: JSONContext) -> None:
        content, ok = ctx.get(NODE_EVENT, "event_content")
        if not ok:
            raise TaskNotReady("waiting for the approver")
        if not content.get("approved"):
            raise TaskFailedTerminate("rejected")
        ctx.set(["approved_by"], content["by"])

    return recording_worker(calls, None, check)


async def test_restart_of_a_rejected_approval_with_clear_event_waits_for_a_new_event(
    engine_repo: Any, local_lock: Any
) -> None:
    calls = Calls()
    cfg = config("appr", {"approve": ["ship"], "ship": []})
    svc = WorkflowService(engine_repo, local_lock, registry_with(cfg, calls, {"approve": approval(calls)}))
    inst = await svc.create_workflow("appr", "b", context={"amount": 5})
    await svc.run_workflow(inst.id)
    await svc.add_node_external_event(
        inst.id, "approve", NodeExternalEvent(1, {"approved": False, "by": "x"})
    )
    assert (await svc.run_workflow(inst.id)).status == "failed"

    after = await svc.restart_workflow_node(
        inst.id, "approve", force=True, clear_event=True, workflow_context={"amount": 7}
    )
    assert after.status == "running"
    assert NODE_EVENT not in (await rows_of(svc, inst.id))["approve"].node_context
    await svc.run_workflow(inst.id)
    await svc.run_workflow(inst.id)
    assert (await statuses(svc, inst.id))["approve"] == "pending"  # waits: the rejection is gone
    assert (await svc.get_workflow_instance(inst.id)).status == "running"
    await svc.add_node_external_event(inst.id, "approve", NodeExternalEvent(2, {"approved": True, "by": "y"}))
    assert (await svc.run_workflow(inst.id)).status == "completed"
    ctx = (await rows_of(svc, inst.id))["approve"].node_context
    assert ctx["approved_by"] == "y" and ctx[WORKFLOW_CONTEXT] == {"amount": 7}


async def test_restart_without_clear_event_keeps_the_rejection(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cfg = config("appr2", {"approve": []})
    svc = WorkflowService(engine_repo, local_lock, registry_with(cfg, calls, {"approve": approval(calls)}))
    inst = await svc.create_workflow("appr2", "b")
    await svc.run_workflow(inst.id)
    await svc.add_node_external_event(inst.id, "approve", NodeExternalEvent(1, {"approved": False}))
    assert (await svc.run_workflow(inst.id)).status == "failed"
    await svc.restart_workflow_node(inst.id, "approve", force=True)
    assert (await svc.run_workflow(inst.id)).status == "failed"  # the same stored event rejects again


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"x": value}
    return value


@pytest.mark.parametrize(
    ("bad", "match"), [([1, 2], "workflow_context must be a mapping"), (_deep(150), "deep")]
)
async def test_bad_context_writes_nothing(engine_repo: Any, local_lock: Any, bad: Any, match: str) -> None:
    calls = Calls()
    svc = WorkflowService(engine_repo, local_lock, registry_with(config("bad", {"A": []}), calls))
    inst = await svc.create_workflow("bad", "b", context={"v": 1}, run=True)
    before = await rows_of(svc, inst.id)
    with pytest.raises(ParamInvalidError, match=match):
        await svc.restart_workflow_node(inst.id, "A", force=True, workflow_context=bad)
    with pytest.raises(ParamInvalidError, match="timeout must be a number"):
        await svc.restart_workflow_node(inst.id, "A", force=True, timeout="1")  # type: ignore[arg-type]
    assert await rows_of(svc, inst.id) == before
    record = await svc.repo.get_workflow_instance(inst.id)
    assert record.workflow_context == {"v": 1} and record.status == "completed"


async def test_timeout_waits_for_a_busy_instance_lock(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = WorkflowService(engine_repo, local_lock, registry_with(config("tmo", {"A": []}), calls))
    inst = await svc.create_workflow("tmo", "b", run=True)
    held, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:  # another task: the local lock is re-entrant within one task
        async with local_lock.hold(lock_key(inst.id), 5.0):
            held.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await held.wait()
    with pytest.raises(LockFailedError):
        await svc.restart_workflow_node(inst.id, "A", force=True)
    waiting = asyncio.create_task(svc.restart_workflow_node(inst.id, "A", force=True, timeout=5))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    release.set()
    await holder
    assert (await waiting).status == "running"
    assert (await statuses(svc, inst.id))["A"] == "restarting"
