"""Child workflows (0.2) on every repo: ``af.start_child_workflow``, the parent node waiting for its
children, their results, failure and cancel propagation, idempotency across retries, crashes and
concurrent starts, and the parent's wake-up when its last child ends."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import asyncflow as af
from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import InvalidStateError, ParamInvalidError, TaskFailedContinue, TaskFailedTerminate
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import NewWorkflowInstance
from asyncflow.registry import Registry
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine

from .engine_helpers import Calls, config, recording_worker, registry_with, rows_of, statuses

PARENT = {"fan": ["after"], "after": []}


def family(
    calls: Calls,
    fan: Any,
    child_work: Any = None,
    *,
    fan_check: Any = None,
) -> Registry:
    """``parent``: fan -> after; ``child``: work (doubles ``workflow_context.n`` by default)."""

    def double(ctx: JSONContext) -> None:
        n = ctx.get("workflow_context", "n")[0]
        ctx.set(["double"], (n or 0) * 2)

    registry = registry_with(
        config("parent", PARENT), calls, {"fan": recording_worker(calls, fan, fan_check)}
    )
    registry.load_workflow_config(config("child", {"work": []}))
    registry.register_workflow_task("child", "work", recording_worker(calls, child_work or double))
    return registry


def fan_beside(
    calls: Calls, edges: dict[str, list[str]], sibling: str, then: Any, **options: dict[str, Any]
) -> Registry:
    """``parent`` with ``edges``: its node ``fan`` starts children ``a`` and ``b``; node ``sibling``
    waits until they are started, then runs ``then``; ``child``: work (does nothing)."""
    started = asyncio.Event()

    async def fan(ctx: JSONContext) -> None:
        await fan_out(["a", "b"])(ctx)
        started.set()

    async def after_fan(ctx: JSONContext) -> None:
        await started.wait()
        await then(ctx)

    registry = registry_with(
        config("parent", edges, **options),
        calls,
        {"fan": recording_worker(calls, fan), sibling: recording_worker(calls, after_fan)},
    )
    registry.load_workflow_config(config("child", {"work": []}))
    registry.register_workflow_task("child", "work", recording_worker(calls, None))
    return registry


def fan_out(keys: list[str]) -> Any:
    async def fan(ctx: JSONContext) -> None:
        for i, key in enumerate(keys):
            await af.start_child_workflow("child", key, context={"n": i + 1})

    return fan


async def test_the_parent_node_waits_for_its_children_then_completes_with_their_results(
    engine_repo: Any, local_lock: Any
) -> None:
    calls = Calls()
    svc = WorkflowService(engine_repo, local_lock, family(calls, fan_out(["a", "b", "c"])))
    parent = await svc.create_workflow("parent", "order-7", run=True)
    assert parent.status == "running" and parent.parent_id is None
    assert (await statuses(svc, parent.id))["fan"] == "pending"
    children = await svc.get_child_workflows(parent.id)
    assert [c.business_id for c in children] == ["order-7/fan/a", "order-7/fan/b", "order-7/fan/c"]
    assert {c.parent_id for c in children} == {parent.id}
    records = await engine_repo.query_child_instances(parent.id)
    assert [(r.parent_node, r.child_key) for r in records] == [("fan", "a"), ("fan", "b"), ("fan", "c")]
    assert (await engine_repo.get_workflow_instance(parent.id)).parent_id is None

    await svc.run_workflow(children[0].id)
    await svc.run_workflow(children[1].id)
    assert (await svc.run_workflow(parent.id)).status == "running"  # c is not done: still pending
    assert calls.runs("fan") == 1 and calls.runs("after") == 0
    await svc.run_workflow(children[2].id)
    done = await svc.run_workflow(parent.id)
    assert done.status == "completed"
    assert calls.runs("fan") == 1  # run() is not called again: the node only waited
    rows = await rows_of(svc, parent.id)
    assert rows["fan"].node_context["children"] == {
        key: {"instance_id": child.id, "status": "completed", "output": {"work": {"double": 2 * (i + 1)}}}
        for i, (key, child) in enumerate(zip("abc", children, strict=True))
    }
    # the results flow on like any node output
    assert rows["after"].node_context["pre_node_context"]["fan"]["children"]["b"]["output"] == {
        "work": {"double": 4}
    }


async def test_the_last_child_to_end_wakes_its_parent_at_once_in_process(
    engine_repo: Any, local_lock: Any
) -> None:
    calls = Calls()
    svc = WorkflowService(engine_repo, local_lock, family(calls, fan_out(["a", "b"])))
    woken: list[int] = []
    svc.add_due_listener(woken.append)
    parent = await svc.create_workflow("parent", "w-1", run=True)
    a, b = await svc.get_child_workflows(parent.id)
    waiting = await engine_repo.get_workflow_instance(parent.id)
    assert waiting.next_run_at > svc._now_ms()  # asleep until its poll...
    woken.clear()
    await svc.run_workflow(a.id)
    assert parent.id not in woken  # b is still running: no pass of the parent for nothing
    await svc.run_workflow(b.id)
    assert woken.count(parent.id) == 1  # ... but woken when the last child ends
    assert (await engine_repo.get_workflow_instance(parent.id)).next_run_at <= svc._now_ms()


class RacingRepo(MemoryWorkflowRepo):
    """The memory repo, with a hook run once after a children query read its rows (before it returns)."""

    def __init__(self) -> None:
        super().__init__()
        self.after_read: Any = None

    async def query_child_instances(self, parent_id: int) -> list[Any]:
        found = await super().query_child_instances(parent_id)
        hook, self.after_read = self.after_read, None
        if hook is not None:
            await hook()
        return found


async def test_a_child_ending_between_the_parents_look_and_its_write_still_wakes_it() -> None:
    """The parent's pass sees its child running; the child ends (and wakes the parent) before the
    pass writes its next due time an interval away: the pass looks again and the parent is due now."""
    repo = RacingRepo()
    calls = Calls()
    svc = WorkflowService(repo, LocalWorkflowLock(), family(calls, fan_out(["a"])))
    woken: list[int] = []
    svc.add_due_listener(woken.append)
    parent = await svc.create_workflow("parent", "race-1")

    async def end_the_child() -> None:
        [child] = await MemoryWorkflowRepo.query_child_instances(repo, parent.id)
        assert (await svc.run_workflow(child.id)).status == "completed"

    repo.after_read = end_the_child
    assert (await svc.run_workflow(parent.id)).status == "running"  # it saw the child running
    assert repo.after_read is None  # the race happened
    assert (await repo.get_workflow_instance(parent.id)).next_run_at <= svc._now_ms()
    assert woken[-1] == parent.id
    assert (await svc.run_workflow(parent.id)).status == "completed"


async def test_a_driver_runs_the_whole_family(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = WorkflowService(engine_repo, local_lock, family(calls, fan_out([f"k{i}" for i in range(5)])))
    parent = await svc.create_workflow("parent", "d-1")
    # an hour between polls: only wake-ups can finish the family in time
    async with WorkflowDriver(svc, concurrency=8, poll_interval=3600.0):
        done = await svc.wait_for_workflow(parent.id, timeout=20)
    assert done.status == "completed"
    rows = await rows_of(svc, parent.id)
    assert sorted(rows["fan"].node_context["children"]) == [f"k{i}" for i in range(5)]


async def test_a_failed_child_fails_the_parent_node_and_workflow(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()

    def work(ctx: JSONContext) -> None:
        if ctx.get("workflow_context", "n")[0] == 2:
            raise TaskFailedTerminate("no stock")

    svc = WorkflowService(engine_repo, local_lock, family(calls, fan_out(["a", "b", "c"]), work))
    woken: list[int] = []
    svc.add_due_listener(woken.append)
    parent = await svc.create_workflow("parent", "f-1", run=True)
    a, b, c = await svc.get_child_workflows(parent.id)
    assert (await svc.run_workflow(b.id)).status == "failed"
    assert parent.id in woken  # a failure wakes the parent at once, c still running or not
    failed = await svc.run_workflow(parent.id)
    assert failed.status == "failed"
    # the failed parent's other children, which no longer matter, are canceled
    assert [(await svc.get_workflow_instance(x.id)).status for x in (a, b, c)] == [
        "canceled",
        "failed",
        "canceled",
    ]
    fan = (await rows_of(svc, parent.id))["fan"]
    assert fan.status == "failed"
    assert (
        "'b'" in fan.node_context["system"]["last_error"]
        and str(b.id) in fan.node_context["system"]["last_error"]
    )
    assert calls.runs("after") == 0


async def test_a_parent_failing_for_another_reason_cancels_its_running_children(
    engine_repo: Any, local_lock: Any
) -> None:
    """``fan`` starts two children; ``pay``, beside it, then fails the workflow."""
    calls = Calls()

    async def boom(ctx: JSONContext) -> None:
        raise TaskFailedTerminate("card declined")

    registry = fan_beside(calls, {"fan": [], "pay": []}, "pay", boom)
    finished: list[tuple[int, str]] = []

    class Watch:
        def instance_finished(self, instance: af.WorkflowInstance) -> None:
            finished.append((instance.id, instance.status))

    svc = WorkflowService(engine_repo, local_lock, registry, observers=[Watch()])
    parent = await svc.create_workflow("parent", "p-1", run=True)
    assert parent.status == "failed"
    a, b = await svc.get_child_workflows(parent.id)
    assert [(await svc.get_workflow_instance(x.id)).status for x in (a, b)] == ["canceled", "canceled"]
    assert sorted(finished) == sorted([(parent.id, "failed"), (a.id, "canceled"), (b.id, "canceled")])
    assert (await svc.run_workflow(a.id)).status == "canceled"
    assert calls.runs("work") == 0


async def test_a_node_a_first_join_drops_cancels_its_running_children(
    engine_repo: Any, local_lock: Any
) -> None:
    """``fan`` starts two children and waits for them; ``quick`` completes first and wins the ``first``
    join: ``fan`` is canceled, and so are its children, while the parent goes on to complete."""
    calls = Calls()

    async def quick(ctx: JSONContext) -> None:
        pass

    edges = {"start": ["fan", "quick"], "fan": ["join"], "quick": ["join"], "join": []}
    registry = fan_beside(calls, edges, "quick", quick, join={"join": "first"})
    svc = WorkflowService(engine_repo, local_lock, registry)
    parent = await svc.create_workflow("parent", "j-1", run=True)
    # one pass: fan's pending write, which the first join's cancel interrupted, still landed and the
    # cancel was written on top of it (before, the pass stopped on its own stale version, and a second
    # pass ran quick again)
    assert parent.status == "completed" and calls.runs("quick") == 1
    assert (await statuses(svc, parent.id))["fan"] == "canceled"
    a, b = await svc.get_child_workflows(parent.id)
    assert [(await svc.get_workflow_instance(x.id)).status for x in (a, b)] == ["canceled", "canceled"]
    assert calls.runs("work") == 0


async def test_canceling_the_parent_cancels_its_running_children(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = WorkflowService(engine_repo, local_lock, family(calls, fan_out(["a", "b"])))
    parent = await svc.create_workflow("parent", "c-1", run=True)
    a, b = await svc.get_child_workflows(parent.id)
    await svc.run_workflow(a.id)
    await svc.cancel_workflow_instance(parent.id)
    assert (await svc.get_workflow_instance(parent.id)).status == "canceled"
    assert (await svc.get_workflow_instance(a.id)).status == "completed"  # terminal: left as it was
    assert (await svc.get_workflow_instance(b.id)).status == "canceled"
    assert (await svc.run_workflow(b.id)).status == "canceled"  # nothing of it runs any more


async def test_a_child_started_after_its_parent_was_canceled_is_canceled(
    engine_repo: Any, local_lock: Any
) -> None:
    """The parent is canceled while its node's run() is between two starts: the child it starts after
    the cancel is committed is canceled at once (before, it was created ``init`` under a canceled parent
    and ran to its end, work nobody would use), and the pass stops as before."""
    calls = Calls()
    started, gate = asyncio.Event(), asyncio.Event()

    async def fan(ctx: JSONContext) -> None:
        await af.start_child_workflow("child", "a")
        started.set()
        await gate.wait()
        await af.start_child_workflow("child", "b")

    svc = WorkflowService(engine_repo, local_lock, family(calls, fan))
    parent = await svc.create_workflow("parent", "late-1")
    pass_ = asyncio.create_task(svc.run_workflow(parent.id))
    await started.wait()
    await svc.cancel_workflow_instance(parent.id)
    gate.set()
    assert (await pass_).status == "canceled"
    children = await svc.get_child_workflows(parent.id)
    assert [(c.child_key, c.status) for c in children] == [("a", "canceled"), ("b", "canceled")]
    assert (await svc.run_workflow(children[1].id)).status == "canceled"
    assert calls.runs("work") == 0


async def test_purge_keeps_a_finished_child_whose_parent_still_waits(
    engine_repo: Any, local_lock: Any
) -> None:
    """Retention runs while a parent's node waits for its slow child: the fast sibling that completed
    long ago is kept (before, it was purged, and when the slow one ended the parent's node failed with
    "child workflow 'a' ... no longer exists": the family's work lost); once the parent is finished,
    its children go like any finished instance."""
    calls = Calls()
    clock = af.FakeClock(time.time() + 3600)  # everything stored is an hour old to this service
    svc = WorkflowService(engine_repo, local_lock, family(calls, fan_out(["a", "b"])), clock=clock)
    parent = await svc.create_workflow("parent", "keep-1", run=True)
    a, b = await svc.get_child_workflows(parent.id)
    assert (await svc.run_workflow(a.id)).status == "completed"
    assert await svc.purge_workflow_instances(older_than=60) == 0
    assert (await svc.get_workflow_instance(a.id)).status == "completed"
    await svc.run_workflow(b.id)
    assert (await svc.run_workflow(parent.id)).status == "completed"
    fan = (await rows_of(svc, parent.id))["fan"]
    assert fan.node_context["children"]["a"]["output"] == {"work": {"double": 2}}
    clock.advance(3600)
    assert await svc.purge_workflow_instances(older_than=60) == 3  # the parent and both children
    assert await svc.count_workflow_instances() == 0


async def test_a_node_that_fails_and_continues_cancels_the_children_it_started(
    engine_repo: Any, local_lock: Any
) -> None:
    """``run()`` starts a child, then raises ``TaskFailedContinue``: the node counts as done at once,
    so nothing will wait for the child or read it; it is canceled after the pass (before, it stayed
    ``init`` and ran after its parent had completed, unattached). A retry of such a node gets it
    again, as any re-run does."""
    calls = Calls()

    async def fan(ctx: JSONContext) -> None:
        await af.start_child_workflow("child", "a")
        raise TaskFailedContinue("half done")

    svc = WorkflowService(engine_repo, local_lock, family(calls, fan))
    parent = await svc.create_workflow("parent", "cont-1", run=True)
    assert parent.status == "completed"
    assert (await statuses(svc, parent.id))["fan"] == "completed"
    [child] = await svc.get_child_workflows(parent.id)
    assert child.status == "canceled"
    assert (await svc.run_workflow(child.id)).status == "canceled"
    assert calls.runs("work") == 0


async def test_a_failed_parent_node_reruns_once_every_child_its_failure_ended_is_restarted(
    engine_repo: Any, local_lock: Any
) -> None:
    """Child ``a`` fails, so the parent fails and cancels ``b``. Restarting ``a`` alone, as the README
    said, is not enough: the restarted node gets ``b`` back canceled and fails again. Restarting every
    child that is failed or canceled, then the node, completes the family with the same children."""
    calls = Calls()
    broken = [True]

    def work(ctx: JSONContext) -> None:
        if broken[0] and ctx.get("workflow_context", "n")[0] == 1:
            raise TaskFailedTerminate("no stock")

    svc = WorkflowService(engine_repo, local_lock, family(calls, fan_out(["a", "b"]), work))
    parent = await svc.create_workflow("parent", "again-1", run=True)
    a, b = await svc.get_child_workflows(parent.id)
    assert (await svc.run_workflow(a.id)).status == "failed"
    assert (await svc.run_workflow(parent.id)).status == "failed"
    assert (await svc.get_workflow_instance(b.id)).status == "canceled"
    broken[0] = False
    assert (await svc.restart_workflow_instance(a.id, run=True)).status == "completed"
    again = await svc.restart_workflow_node(parent.id, "fan", force=True, run=True)
    assert again.status == "failed"  # b, canceled by the parent's failure, fails it again
    assert "'b'" in (await rows_of(svc, parent.id))["fan"].node_context["system"]["last_error"]
    for child in await svc.get_child_workflows(parent.id):
        if child.status in ("failed", "canceled"):
            await svc.restart_workflow_instance(child.id, run=True)
    done = await svc.restart_workflow_node(parent.id, "fan", force=True, run=True)
    assert done.status == "completed"
    assert [c.id for c in await svc.get_child_workflows(parent.id)] == [a.id, b.id]


async def test_a_canceled_parent_restarts_once_its_canceled_children_are_restarted(
    engine_repo: Any, local_lock: Any
) -> None:
    """The README's procedure for a parent restarted after a cancel: its cancel canceled the children,
    so a restart alone fails at once on them; restarting them first completes the family with the
    same children."""
    calls = Calls()
    svc = WorkflowService(engine_repo, local_lock, family(calls, fan_out(["a", "b"])))
    parent = await svc.create_workflow("parent", "canceled-1", run=True)
    a, b = await svc.get_child_workflows(parent.id)
    await svc.cancel_workflow_instance(parent.id)
    assert {c.status for c in await svc.get_child_workflows(parent.id)} == {"canceled"}
    assert (await svc.restart_workflow_instance(parent.id, run=True)).status == "failed"
    for child in await svc.get_child_workflows(parent.id):
        await svc.restart_workflow_instance(child.id, run=True)
    done = await svc.restart_workflow_instance(parent.id, run=True)
    assert done.status == "completed"
    assert [c.id for c in await svc.get_child_workflows(parent.id)] == [a.id, b.id]


async def test_a_canceled_child_fails_its_parent(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = WorkflowService(engine_repo, local_lock, family(calls, fan_out(["a", "b"])))
    woken: list[int] = []
    svc.add_due_listener(woken.append)
    parent = await svc.create_workflow("parent", "c-2", run=True)
    a, _ = await svc.get_child_workflows(parent.id)
    await svc.cancel_workflow_instance(a.id)
    assert parent.id in woken
    assert (await svc.run_workflow(parent.id)).status == "failed"
    assert "canceled" in (await rows_of(svc, parent.id))["fan"].node_context["system"]["last_error"]


async def test_a_crash_after_starting_children_leaves_no_duplicate(engine_repo: Any, local_lock: Any) -> None:
    """The first pass starts the children and is abandoned before the parent's write (its worker is
    still in run()); the next pass runs the node again and gets the same children."""
    calls = Calls()
    started = asyncio.Event()
    attempts: list[list[int]] = []

    async def fan(ctx: JSONContext) -> None:
        ids = [(await af.start_child_workflow("child", key)).id for key in ("a", "b")]
        attempts.append(ids)
        if len(attempts) == 1:
            started.set()
            await asyncio.Event().wait()  # the process dies here: nothing of the node is written

    svc = WorkflowService(engine_repo, local_lock, family(calls, fan))
    parent = await svc.create_workflow("parent", "crash-1")
    crashed = asyncio.create_task(svc.run_workflow(parent.id))
    await started.wait()
    crashed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await crashed
    assert "fan" not in await statuses(svc, parent.id)  # the parent's write never happened
    assert len(await svc.get_child_workflows(parent.id)) == 2

    assert (await svc.run_workflow(parent.id)).status == "running"  # recovery: run() again
    assert attempts[1] == attempts[0]  # the same children
    children = await svc.get_child_workflows(parent.id)
    assert [c.id for c in children] == attempts[0]  # and no other
    for child in children:
        await svc.run_workflow(child.id)
    assert (await svc.run_workflow(parent.id)).status == "completed"


async def test_a_retried_run_gets_the_children_of_its_first_attempt(
    engine_repo: Any, local_lock: Any
) -> None:
    calls = Calls()
    seen: list[int] = []

    async def fan(ctx: JSONContext) -> None:
        seen.append((await af.start_child_workflow("child", "only", context={"n": len(seen)})).id)
        if len(seen) == 1:
            raise RuntimeError("flaky after starting the child")

    registry = family(calls, fan)
    svc = WorkflowService(engine_repo, local_lock, registry)
    parent = await svc.create_workflow("parent", "retry-1", run=True)
    assert (await rows_of(svc, parent.id))["fan"].fail_count == 1
    await svc.run_workflow(parent.id)  # the retry (run_workflow ignores the back-off)
    assert len(seen) == 2 and seen[0] == seen[1]
    [child] = await svc.get_child_workflows(parent.id)
    assert child.workflow_context == {"n": 0}  # the first start's context: a later one changes nothing


async def test_concurrent_starts_of_one_key_make_one_child(engine_repo: Any) -> None:
    parent = await engine_repo.create_workflow_instance(
        NewWorkflowInstance(workflow_type="parent", business_id="p", workflow_context={})
    )
    new = NewWorkflowInstance(workflow_type="child", business_id="p/fan/k", workflow_context={})
    results = await asyncio.gather(
        *(
            engine_repo.create_child_instance(new, parent_id=parent.id, parent_node="fan", child_key="k")
            for _ in range(8)
        )
    )
    assert len({record.id for record, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    other = await engine_repo.create_child_instance(
        new, parent_id=parent.id, parent_node="other", child_key="k"
    )
    assert other[1] and other[0].id != results[0][0].id  # the key is per node
    [(record, _)] = {r.id: (r, c) for r, c in results}.values()
    assert (record.parent_id, record.parent_node, record.child_key) == (parent.id, "fan", "k")
    with pytest.raises(ParamInvalidError):
        await engine_repo.create_child_instance(
            new, parent_id=parent.id, parent_node="fan", child_key="a\x00"
        )


async def test_start_child_workflow_outside_run_and_bad_arguments(engine_repo: Any, local_lock: Any) -> None:
    with pytest.raises(InvalidStateError, match="inside a worker's run"):
        await af.start_child_workflow("child", "k")
    calls = Calls()
    errors: list[BaseException] = []

    async def fan(ctx: JSONContext) -> None:
        await af.start_child_workflow("child", "k")
        for args in (("child", ""), ("", "x"), ("parent", "k"), ("nope", "z")):
            try:
                await af.start_child_workflow(*args)
            except af.AsyncflowError as exc:
                errors.append(exc)

    async def check(ctx: JSONContext) -> None:
        try:
            await af.start_child_workflow("child", "late")
        except InvalidStateError as exc:
            errors.append(exc)

    svc = WorkflowService(engine_repo, local_lock, family(calls, fan, fan_check=check))
    parent = await svc.create_workflow("parent", "bad-1", run=True)
    kinds = [type(e).__name__ for e in errors[:4]]
    assert kinds == ["ParamInvalidError", "ParamInvalidError", "ParamInvalidError", "ConfigNotFoundError"]
    assert "already names a child of type 'child'" in str(errors[2])
    [child] = await svc.get_child_workflows(parent.id)
    await svc.run_workflow(child.id)
    await svc.run_workflow(parent.id)
    assert isinstance(errors[-1], InvalidStateError)  # wait_check cannot start children
    assert len(await svc.get_child_workflows(parent.id)) == 1


async def test_a_node_with_a_wait_check_runs_it_after_its_children(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    seen: list[Any] = []

    def check(ctx: JSONContext) -> None:
        seen.append(ctx.get("children")[0])

    svc = WorkflowService(engine_repo, local_lock, family(calls, fan_out(["a"]), fan_check=check))
    parent = await svc.create_workflow("parent", "wc-1", run=True)
    assert calls.checks("fan") == 0  # not before the children are done
    [child] = await svc.get_child_workflows(parent.id)
    await svc.run_workflow(child.id)
    assert (await svc.run_workflow(parent.id)).status == "completed"
    assert seen == [
        {"a": {"instance_id": child.id, "status": "completed", "output": {"work": {"double": 2}}}}
    ]


async def test_a_node_without_children_is_unchanged(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = WorkflowService(engine_repo, local_lock, family(calls, None))
    parent = await svc.create_workflow("parent", "none-1", run=True)
    assert parent.status == "completed"
    fan = (await rows_of(svc, parent.id))["fan"]
    assert "children" not in fan.node_context and "child_keys" not in fan.node_context.get("system", {})


async def test_without_wake_ups_another_process_s_parent_is_polled(tmp_path: Any) -> None:
    """SQLite has no NOTIFY: "process A"'s driver runs the parent and finds it due again by polling
    after "process B" (its own engine and service on the same file) ended the children."""
    url = f"sqlite+aiosqlite:///{tmp_path}/polled.db"
    repo_a, repo_b = SQLAlchemyWorkflowRepo(url), SQLAlchemyWorkflowRepo(url)
    await repo_a.migrate()
    calls = Calls()
    registry = family(calls, fan_out(["a", "b"]))
    svc_a = WorkflowService(repo_a, LocalWorkflowLock(), registry)
    svc_b = WorkflowService(repo_b, LocalWorkflowLock(), registry)
    try:
        async with WorkflowDriver(svc_a, poll_interval=0.1, workflow_types=["parent"]):
            parent = await svc_a.create_workflow("parent", "polled-1")
            for _ in range(500):
                if (await statuses(svc_a, parent.id)).get("fan") == "pending":
                    break
                await asyncio.sleep(0.01)
            for child in await svc_b.get_child_workflows(parent.id):
                await svc_b.run_workflow(child.id)
            done = await svc_a.wait_for_workflow(parent.id, timeout=10)
        assert done.status == "completed"
        assert calls.runs("fan") == 1
    finally:
        await repo_b.aclose()
        await repo_a.aclose()


# ------------------------------------------------------------------------------------ PostgreSQL


async def _schema(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        schema: str = (await conn.exec_driver_sql("SELECT current_schema()")).scalar_one()
    return schema


@contextlib.asynccontextmanager
async def _two_processes(
    postgres_url: str,
) -> AsyncIterator[tuple[SQLAlchemyWorkflowRepo, SQLAlchemyWorkflowRepo]]:
    """Two repos on one scratch schema, as two processes have them: A's on the isolated engine, B's on
    an engine, pool and connections of its own."""
    async with isolated_pg_engine(postgres_url) as engine:
        repo_a = SQLAlchemyWorkflowRepo(engine)
        await repo_a.migrate()
        settings = {"server_settings": {"search_path": await _schema(engine)}}
        engine_b = create_async_engine(postgres_url, connect_args=settings, pool_size=4, max_overflow=0)
        repo_b = SQLAlchemyWorkflowRepo(engine_b)
        try:
            yield repo_a, repo_b
        finally:
            await repo_b.aclose()
            await engine_b.dispose()
            await repo_a.aclose()


@pytest.mark.postgres
async def test_a_child_ending_in_another_process_wakes_the_parent_through_notify(postgres_url: str) -> None:
    """The driver of "process A" runs only parents and polls once an hour; "process B" (its own engine,
    pool and service) runs the children: the end of the last one wakes A's driver through NOTIFY."""
    async with _two_processes(postgres_url) as (repo_a, repo_b):
        calls = Calls()
        registry = family(calls, fan_out(["a", "b", "c"]))
        svc_a = WorkflowService(repo_a, LocalWorkflowLock(), registry)
        svc_b = WorkflowService(repo_b, LocalWorkflowLock(), registry)
        async with WorkflowDriver(svc_a, poll_interval=3600.0, workflow_types=["parent"]) as driver:
            parent = await svc_a.create_workflow("parent", f"x-{uuid.uuid4().hex[:6]}")
            for _ in range(500):
                if (await statuses(svc_a, parent.id)).get("fan") == "pending" and driver.listening:
                    break
                await asyncio.sleep(0.01)
            children = await svc_b.get_child_workflows(parent.id)
            assert len(children) == 3
            for child in children:
                await svc_b.run_workflow(child.id)
            done = await svc_a.wait_for_workflow(parent.id, timeout=15)
        assert done.status == "completed"


@pytest.mark.postgres
async def test_concurrent_starts_on_separate_connections_make_one_child(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.migrate()
        try:
            parent = await repo.create_workflow_instance(
                NewWorkflowInstance(workflow_type="parent", business_id="p", workflow_context={})
            )
            new = NewWorkflowInstance(workflow_type="child", business_id="p/n/k", workflow_context={})
            for round_ in range(5):
                key = f"k{round_}"
                results = await asyncio.gather(
                    *(
                        repo.create_child_instance(new, parent_id=parent.id, parent_node="n", child_key=key)
                        for _ in range(12)
                    )
                )
                assert len({r.id for r, _ in results}) == 1 and sum(c for _, c in results) == 1
            async with engine.connect() as conn:
                count = (
                    await conn.execute(
                        text("SELECT count(*) FROM workflow_instance WHERE parent_id = :p"), {"p": parent.id}
                    )
                ).scalar_one()
            assert count == 5
        finally:
            await repo.aclose()


@pytest.mark.postgres
async def test_a_child_inserted_while_the_parents_cancel_commits_is_canceled(postgres_url: str) -> None:
    """Process B's pass of the parent starts a child after the cancel of process A read the
    parent's children but before it committed: the insert is not among what the cancel read, and B's
    look at its parent still sees it running. The cancel looks at the children again once committed,
    so the child is canceled (before, it stayed ``init`` under the canceled parent and ran)."""
    async with _two_processes(postgres_url) as (repo_a, repo_b):
        calls = Calls()
        running, go, late = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def fan(ctx: JSONContext) -> None:
            await af.start_child_workflow("child", "a")
            running.set()
            await go.wait()
            await af.start_child_workflow("child", "late")
            late.set()

        registry = family(calls, fan)
        svc_a = WorkflowService(repo_a, LocalWorkflowLock(), registry)
        svc_b = WorkflowService(repo_b, LocalWorkflowLock(), registry)
        read = repo_a.query_child_instances
        raced: list[int] = []

        async def children_then_race(parent_id: int) -> list[Any]:
            found = await read(parent_id)
            if not raced:  # the cancel's own read, inside its transaction
                raced.append(parent_id)
                go.set()
                await late.wait()  # B's insert is committed; A's transaction is not
            return found

        repo_a.query_child_instances = children_then_race  # type: ignore[method-assign]
        parent = await svc_a.create_workflow("parent", "race-cancel")
        pass_b = asyncio.create_task(svc_b.run_workflow(parent.id))
        await running.wait()
        await svc_a.cancel_workflow_instance(parent.id)
        assert raced == [parent.id]
        assert (await pass_b).status == "canceled"
        children = await svc_b.get_child_workflows(parent.id)
        assert [(c.child_key, c.status) for c in children] == [("a", "canceled"), ("late", "canceled")]
        assert calls.runs("work") == 0


# ------------------------------------------------------------------------------------ migration 8


async def _version_7(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("DROP INDEX uq_workflow_instance_child"))
        for column in ("parent_id", "parent_node", "child_key"):
            await conn.execute(text(f"ALTER TABLE workflow_instance DROP COLUMN {column}"))
        await conn.execute(text("DELETE FROM asyncflow_schema WHERE version >= 8"))
        await conn.execute(
            text(
                "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, "
                "task_id, created_at, updated_at, next_run_at, version) "
                "VALUES ('t', 'old', 'init', '{}', 0, 1, 1, 0, 1)"
            )
        )


async def _migration_8(engine: AsyncEngine) -> None:
    repo = SQLAlchemyWorkflowRepo(engine)
    try:
        await repo.migrate()
        await _version_7(engine)
        await repo.migrate()
        await repo.migrate()
        [old] = await repo.query_workflow_instances(af.QueryWorkflowInstanceParams(business_id="old"))
        assert (old.parent_id, old.parent_node, old.child_key) == (None, None, None)
        new = NewWorkflowInstance(workflow_type="c", business_id="old/n/k", workflow_context={})
        first = await repo.create_child_instance(new, parent_id=old.id, parent_node="n", child_key="k")
        again = await repo.create_child_instance(new, parent_id=old.id, parent_node="n", child_key="k")
        assert first[1] and not again[1] and first[0].id == again[0].id  # the index is back
        async with engine.connect() as conn:
            versions = (
                await conn.execute(text("SELECT version FROM asyncflow_schema ORDER BY version"))
            ).all()
        assert [v[0] for v in versions] == list(range(1, af.SCHEMA_VERSION + 1))
    finally:
        await repo.aclose()


async def test_migration_8_on_sqlite(tmp_path: Any) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/m9.db")
    try:
        await _migration_8(engine)
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_migration_8_on_postgres(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        await _migration_8(engine)
