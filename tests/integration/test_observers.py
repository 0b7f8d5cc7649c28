"""Observers (API.md "Observing"): what they are told, in which order, and that they never break a pass."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

import asyncflow as af
from asyncflow.engine.observers import OUTCOMES, ObserverSet
from asyncflow.errors import ParamInvalidError, TaskFailedContinue, TaskFailedTerminate, TaskNotReady
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.protocol import Step, StepResult
from asyncflow.worker import NodeInfo, NormalTaskWorker, current_node

from .engine_helpers import Calls, config, recording_worker, registry_with


class Recorder:
    """A plain observer that writes down every call."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def instance_created(self, instance: af.WorkflowInstance) -> None:
        self.events.append(("created", instance.id, instance.status))

    def node_started(self, node: NodeInfo) -> None:
        self.events.append(("started", node.task_type, node.fail_count))

    def node_finished(
        self, node: NodeInfo, outcome: str, error: BaseException | None, duration: float
    ) -> None:
        assert outcome in OUTCOMES
        assert duration >= 0
        self.events.append(("finished", node.task_type, outcome, type(error).__name__ if error else None))

    def instance_finished(self, instance: af.WorkflowInstance) -> None:
        self.events.append(("ended", instance.id, instance.status))

    def node_events(self) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] in ("started", "finished")]


def service(registry: af.Registry, *observers: Any) -> af.WorkflowService:
    return af.WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry, observers=observers)


async def test_a_linear_workflow_is_told_in_order() -> None:
    rec = Recorder()
    svc = service(registry_with(config("lin", {"A": ["B"], "B": []}), Calls()), rec)
    inst = await svc.create_workflow("lin", "b-1")
    await svc.run_workflow(inst.id)
    assert rec.events == [
        ("created", inst.id, "init"),
        ("started", "A", 0),
        ("finished", "A", "completed", None),
        ("started", "B", 0),
        ("finished", "B", "completed", None),
        ("ended", inst.id, "completed"),
    ]


async def test_every_outcome_is_reported_with_its_error() -> None:
    calls = Calls()

    def not_ready(ctx: Any) -> None:
        raise TaskNotReady("later")

    def flaky(ctx: Any) -> None:
        raise RuntimeError("boom")

    def go_on(ctx: Any) -> None:
        raise TaskFailedContinue("never mind")

    cfg = config(
        "all",
        {"W": ["E"], "P": ["E"], "R": ["E"], "C": ["E"], "E": []},
    )
    workers = {
        "W": recording_worker(calls, not_ready),
        "P": recording_worker(calls, check=not_ready),
        "R": recording_worker(calls, flaky),
        "C": recording_worker(calls, go_on),
    }
    rec = Recorder()
    svc = service(registry_with(cfg, calls, workers), rec)
    inst = await svc.create_workflow("all", "b")
    await svc.run_workflow(inst.id)
    finished = {e[1]: e[2:] for e in rec.events if e[0] == "finished"}
    assert finished == {
        "W": ("not_ready", "TaskNotReady"),
        "P": ("pending", "TaskNotReady"),
        "R": ("retry", "RuntimeError"),
        "C": ("failed_continue", "TaskFailedContinue"),
    }
    await svc.run_workflow(inst.id)  # R is retried: its fail count says so
    assert ("started", "R", 1) in rec.events

    def fatal(ctx: Any) -> None:
        raise TaskFailedTerminate("stop")

    rec2 = Recorder()
    svc2 = service(registry_with(config("f", {"X": []}), calls, {"X": recording_worker(calls, fatal)}), rec2)
    inst2 = await svc2.create_workflow("f", "b")
    await svc2.run_workflow(inst2.id)
    assert rec2.events[-2:] == [
        ("finished", "X", "failed", "TaskFailedTerminate"),
        ("ended", inst2.id, "failed"),
    ]


async def test_cancel_is_an_instance_end_and_cuts_the_running_attempt() -> None:
    rec = Recorder()
    holder: dict[str, af.WorkflowService] = {}

    async def cancel_self(ctx: Any) -> None:
        await holder["svc"].cancel_workflow_instance(current_node().instance_id)

    cfg = config("c", {"X": ["Y"], "Y": []})
    svc = service(registry_with(cfg, Calls(), {"X": NormalTaskWorker(run=cancel_self)}), rec)
    holder["svc"] = svc
    inst = await svc.create_workflow("c", "b")
    await svc.run_workflow(inst.id)
    assert ("ended", inst.id, "canceled") in rec.events
    assert ("finished", "X", "interrupted", None) in rec.events
    assert ("started", "Y", 0) not in rec.events


class Broken:
    def instance_created(self, instance: Any) -> None:
        raise RuntimeError("observer bug")

    def node_started(self, node: Any) -> None:
        raise RuntimeError("observer bug")

    async def node_finished(self, *args: Any) -> None:
        raise RuntimeError("async observer bug")

    def instance_finished(self, instance: Any) -> None:
        raise ValueError("observer bug")


async def test_an_observer_that_raises_is_logged_once_and_never_breaks_a_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = Recorder()
    svc = service(registry_with(config("lin", {"A": ["B"], "B": []}), Calls()), Broken(), rec)
    caplog.set_level(logging.DEBUG, logger="asyncflow.observers")
    for n in range(3):
        inst = await svc.create_workflow("lin", f"b-{n}")
        assert (await svc.run_workflow(inst.id)).status == "completed"
    await svc.aclose()
    assert rec.events.count(("finished", "B", "completed", None)) == 3  # the others were still told
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    hooks = sorted(r.args[1] for r in errors)  # type: ignore[index]
    assert hooks == ["instance_created", "instance_finished", "node_finished", "node_started"]
    assert all(r.exc_info for r in errors)


class Slow:
    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def node_finished(self, *args: Any) -> None:
        self.started += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def test_a_slow_async_observer_never_stalls_a_pass_and_is_cancelled_at_close() -> None:
    slow = Slow()
    svc = service(registry_with(config("lin", {"A": ["B"], "B": []}), Calls()), slow)
    started = time.perf_counter()
    inst = await svc.create_workflow("lin", "b", run=True)
    assert inst.status == "completed"
    assert time.perf_counter() - started < 2.0
    await asyncio.sleep(0)
    assert slow.started == 2
    await svc.aclose()
    assert slow.cancelled == 2
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("asyncflow-observer")] == []


async def test_slow_async_calls_time_out_and_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    slow = Slow()
    observers = ObserverSet([slow], timeout=0.05, max_pending=2)
    info = NodeInfo(instance_id=1, workflow_type="t", business_id="b", task_type="X", fail_count=0)
    for _ in range(5):
        observers.node_finished(info, "completed", None, 0.0)
    assert observers.pending == 2
    assert observers.dropped == 3
    await asyncio.sleep(0.2)
    assert observers.pending == 0
    assert slow.cancelled == 2
    assert any("was cancelled" in r.getMessage() for r in caplog.records)


async def test_a_slow_plain_observer_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    class Sleepy:
        def node_started(self, node: Any) -> None:
            time.sleep(0.06)

    svc = service(registry_with(config("one", {"A": []}), Calls()), Sleepy())
    await svc.create_workflow("one", "b", run=True)
    assert any("called inline" in r.getMessage() for r in caplog.records)


async def test_trace_context_is_stored_and_handed_to_nodes_and_workers() -> None:
    seen: list[str | None] = []

    class Tracer(Recorder):
        def trace_context(self) -> str:
            return "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

        def node_started(self, node: NodeInfo) -> None:
            seen.append(node.trace_context)

    async def run(ctx: Any) -> None:
        seen.append(current_node().trace_context)

    registry = registry_with(config("one", {"A": []}), Calls(), {"A": NormalTaskWorker(run=run)})
    svc = service(registry, Tracer())
    inst = await svc.create_workflow("one", "b")
    record = await svc.repo.get_workflow_instance(inst.id)
    assert record is not None
    assert record.trace_context == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await svc.run_workflow(inst.id)
    assert seen == [record.trace_context, record.trace_context]


async def test_without_observers_nothing_is_stored_and_bad_observers_are_refused() -> None:
    svc = service(registry_with(config("one", {"A": []}), Calls()))
    inst = await svc.create_workflow("one", "b", run=True)
    record = await svc.repo.get_workflow_instance(inst.id)
    assert record is not None and record.trace_context is None
    with pytest.raises(ParamInvalidError, match="none of the WorkflowObserver methods"):
        service(registry_with(config("one", {"A": []}), Calls()), object())
    rec = Recorder()
    svc.add_observer(rec)
    await svc.run_workflow((await svc.create_workflow("one", "c")).id)
    assert rec.events[0][0] == "created"
    assert rec.events[-1][2] == "completed"


# check picks one of approve / reject; both feed notify (join all: a skip propagates to it)
BRANCH = {"check": ["approve", "reject"], "approve": ["notify"], "reject": ["notify"], "notify": []}


def branch_service(repo: Any, lock: Any, rec: Recorder, pick: str, join: str = "all") -> af.WorkflowService:
    def check(ctx: Any) -> None:
        af.choose(pick)

    calls = Calls()
    registry = registry_with(
        config("branch", BRANCH, notify={"join": join}), calls, {"check": recording_worker(calls, check)}
    )
    return af.WorkflowService(repo, lock, registry, observers=[rec])


async def test_a_skipped_node_is_reported_with_outcome_skipped(engine_repo: Any, local_lock: Any) -> None:
    rec = Recorder()
    svc = branch_service(engine_repo, local_lock, rec, "reject")
    inst = await svc.create_workflow("branch", "s-1", run=True)
    assert inst.status == "completed"
    finished = [e[1:] for e in rec.events if e[0] == "finished"]
    # approve was not chosen, notify (join all) skipped with it: both reported once, without an error
    assert sorted(finished) == [
        ("approve", "skipped", None),
        ("check", "completed", None),
        ("notify", "skipped", None),
        ("reject", "completed", None),
    ]
    nodes = rec.node_events()
    for task_type in ("approve", "notify"):  # node_started right before node_finished, as for attempts
        at = nodes.index(("finished", task_type, "skipped", None))
        assert nodes[at - 1] == ("started", task_type, 0)
    assert rec.events[-1] == ("ended", inst.id, "completed")


async def test_a_restarted_node_skipped_again_is_reported_again(engine_repo: Any, local_lock: Any) -> None:
    rec = Recorder()
    svc = branch_service(engine_repo, local_lock, rec, "approve", join="any")
    inst = await svc.create_workflow("branch", "s-2", run=True)
    assert ("finished", "reject", "skipped", None) in rec.events
    rec.events.clear()
    await svc.restart_workflow_node(inst.id, "reject", force=True, run=True)  # skipped at the pass's end
    assert rec.node_events()[:2] == [("started", "reject", 0), ("finished", "reject", "skipped", None)]


async def test_a_skip_not_written_is_not_reported() -> None:
    """A pass that stops before its skips are stored (the instance was canceled under it) tells nothing."""
    rec = Recorder()
    holder: dict[str, af.WorkflowService] = {}

    async def cancel_then_choose(ctx: Any) -> None:
        await holder["svc"].cancel_workflow_instance(current_node().instance_id)
        af.choose("reject")

    registry = registry_with(
        config("branch", BRANCH), Calls(), {"check": NormalTaskWorker(run=cancel_then_choose)}
    )
    svc = holder["svc"] = service(registry, rec)
    inst = await svc.create_workflow("branch", "s-3")
    await svc.run_workflow(inst.id)
    assert not [e for e in rec.events if e[0] == "finished" and e[2] == "skipped"]
    assert ("finished", "check", "interrupted", None) in rec.events


class HeldBackRepo:
    """The real repo; the first step that writes a row with status ``status`` waits for ``release``
    (``reached`` set) before it goes to the store, so a test can cancel the pass while it is in flight."""

    def __init__(self, inner: Any, status: str) -> None:
        self._inner = inner
        self._status = status
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def apply_step(self, step: Step) -> StepResult:
        writes = (*step.inserts, *step.updates)
        if not self.reached.is_set() and any(w.status == self._status for w in writes):
            self.reached.set()
            await self.release.wait()
        result: StepResult = await self._inner.apply_step(step)
        return result


async def cancel_in_step(svc: af.WorkflowService, repo: HeldBackRepo, instance_id: int) -> None:
    """Run a pass; cancel it while its held-back step is in flight (the step is still written)."""
    run = asyncio.create_task(svc.run_workflow(instance_id))
    await repo.reached.wait()
    run.cancel()
    repo.release.set()
    with pytest.raises(asyncio.CancelledError):
        await run


async def test_a_step_written_under_a_cancellation_is_reported_as_written(
    engine_repo: Any, local_lock: Any
) -> None:
    """The repo holds a cancellation back until the step is written: the pass is cancelled after its
    step landed. What the step wrote is what observers are told: the node completed, the branch it did
    not choose skipped (the next pass finds that row terminal and never reports it)."""
    repo = HeldBackRepo(engine_repo, "skipped")
    rec = Recorder()
    svc = branch_service(repo, local_lock, rec, "reject")
    inst = await svc.create_workflow("branch", "w-1")
    await cancel_in_step(svc, repo, inst.id)
    rows = {r.task_type: r.status for r in await engine_repo.load_task_instances(inst.id)}
    assert (rows["check"], rows["approve"]) == ("completed", "skipped")
    assert rec.node_events() == [
        ("started", "check", 0),
        ("started", "approve", 0),
        ("finished", "approve", "skipped", None),
        ("finished", "check", "completed", None),
    ]
    await svc.run_workflow(inst.id)
    assert rec.events[-1] == ("ended", inst.id, "completed")
    finished = sorted(e[1:3] for e in rec.events if e[0] == "finished")
    assert finished == [
        ("approve", "skipped"),
        ("check", "completed"),
        ("notify", "skipped"),
        ("reject", "completed"),
    ]


async def test_a_failure_written_under_a_cancellation_is_reported_failed(
    engine_repo: Any, local_lock: Any
) -> None:
    def fatal(ctx: Any) -> None:
        raise TaskFailedTerminate("stop")

    repo = HeldBackRepo(engine_repo, "failed")
    rec = Recorder()
    calls = Calls()
    registry = registry_with(config("f", {"X": []}), calls, {"X": recording_worker(calls, fatal)})
    svc = af.WorkflowService(repo, local_lock, registry, observers=[rec])
    inst = await svc.create_workflow("f", "w-2")
    await cancel_in_step(svc, repo, inst.id)
    stored = await engine_repo.get_workflow_instance(inst.id)
    assert stored is not None and stored.status == "failed"
    # the node's failure failed the instance: not "interrupted"
    assert rec.events[1:] == [
        ("started", "X", 0),
        ("finished", "X", "failed", "TaskFailedTerminate"),
        ("ended", inst.id, "failed"),
    ]


async def test_a_child_started_after_its_parent_was_canceled_is_created_then_canceled(
    engine_repo: Any, local_lock: Any
) -> None:
    """The child's row is inserted, then canceled at once (its parent is no longer active): observers
    are told both, so created and finished counts agree."""
    rec = Recorder()
    holder: dict[str, af.WorkflowService] = {}

    async def cancel_then_start(ctx: Any) -> None:
        await holder["svc"].cancel_workflow_instance(current_node().instance_id)
        await af.start_child_workflow("kid", "k")

    calls = Calls()
    registry = registry_with(
        config("parent", {"X": []}), calls, {"X": NormalTaskWorker(run=cancel_then_start)}
    )
    kid = config("kid", {"Y": []})
    registry.load_workflow_config(kid)
    registry.register_workflow_task("kid", "Y", recording_worker(calls))
    svc = holder["svc"] = af.WorkflowService(engine_repo, local_lock, registry, observers=[rec])
    inst = await svc.create_workflow("parent", "p-1")
    await svc.run_workflow(inst.id)
    kids = await engine_repo.query_child_instances(inst.id)
    assert [k.status for k in kids] == ["canceled"]
    created = [e[1] for e in rec.events if e[0] == "created"]
    ended = [e[1:] for e in rec.events if e[0] == "ended"]
    assert created == [inst.id, kids[0].id]
    assert sorted(ended) == sorted([(inst.id, "canceled"), (kids[0].id, "canceled")])
