"""Work in flight on every backend: ``visible_after`` stores a slow node as ``running`` while it runs
(one extra step, fenced, never overtaking the final write), ``af.heartbeat`` stores throttled progress,
``started_at`` in the detail query, the overdue warning, and a retryable failure's due time counted
from the end of its own attempt."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

import asyncflow as af
from asyncflow.clock import FakeClock
from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import InvalidStateError, ParamInvalidError
from asyncflow.retry import RetryPolicy
from asyncflow.status import SYSTEM
from asyncflow.worker import NormalTaskWorker

from .engine_helpers import Calls, config, detail_of, recording_worker, registry_with, rows_of, statuses


class StepCounter:
    """Delegates to ``repo``; counts the pass steps it applies (what the engine writes)."""

    def __init__(self, repo: Any) -> None:
        self._repo = repo
        self.steps = 0
        self.applied = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repo, name)

    async def apply_step(self, step: Any) -> Any:
        self.steps += 1
        result = await self._repo.apply_step(step)
        self.applied += int(result.applied)
        return result


async def until(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait for a state only the store shows (polled), failing the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def service(repo: Any, lock: Any, registry: Any, **kwargs: Any) -> WorkflowService:
    return WorkflowService(repo, lock, registry, **kwargs)


def gated(
    calls: Calls, gate: asyncio.Event, before: Callable[[JSONContext], Any] | None = None
) -> NormalTaskWorker:
    async def run(ctx: JSONContext) -> None:
        if before is not None:
            await before(ctx)
        ctx.set(["done"], True)
        await gate.wait()

    return recording_worker(calls, run)


async def test_a_slow_node_is_stored_running_while_it_runs_with_one_extra_step(
    engine_repo: Any, local_lock: Any
) -> None:
    calls, gate = Calls(), asyncio.Event()
    cfg = config("slow", {"A": ["B"], "B": []})
    registry = registry_with(cfg, calls, {"A": gated(calls, gate)})
    repo = StepCounter(engine_repo)
    svc = service(repo, local_lock, registry, visible_after=0.05)
    inst = await svc.create_workflow("slow", "b1")
    passing = asyncio.create_task(svc.run_workflow(inst.id))

    async def a_running() -> bool:
        return (await statuses(svc, inst.id)).get("A") == "running"

    await until(a_running)
    detail = await detail_of(svc, inst.id)
    a = detail.node("A")
    assert detail.status == "running" and a.status == "running" and a.fail_count == 0
    assert a.started_at is not None and abs(a.started_at - svc.clock.time()) <= 5
    assert detail.node("B").status == "uncreated" and detail.node("B").started_at is None
    assert repo.steps == 1  # the running write (the root and the instance's `running` ride along)
    gate.set()
    after = await passing
    assert after.status == "completed"
    rows = await rows_of(svc, inst.id)
    assert rows["A"].status == "completed" and rows["A"].node_context["done"] is True
    assert rows["A"].started_at == a.started_at
    # without visible_after: A, then B with end = 2 steps; the slow A cost exactly one more
    assert repo.steps == 3 and repo.applied == 3
    await svc.aclose()  # stops the service's visible_after watchtower
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "asyncflow-visible-after"]


async def test_quick_nodes_pay_no_extra_step(engine_repo: Any, local_lock: Any) -> None:
    cfg = config("quick", {"A": ["B", "C"], "B": ["D"], "C": ["D"], "D": []})
    counts = []
    for visible_after in (None, 5.0):
        calls = Calls()
        repo = StepCounter(engine_repo)
        svc = service(repo, local_lock, registry_with(cfg, calls), visible_after=visible_after)
        inst = await svc.create_workflow("quick", f"q{visible_after}")
        assert (await svc.run_workflow(inst.id)).status == "completed"
        counts.append(repo.steps)
    assert counts[0] == counts[1] == 4


async def test_a_node_ending_as_its_timer_fires_is_written_completed_last(
    engine_repo: Any, local_lock: Any
) -> None:
    """visible_after=0: the running write is in flight when the node ends; the final write follows it."""
    for yields in (0, 1, 3):
        calls = Calls()

        async def run(ctx: JSONContext, yields: int = yields) -> None:
            for _ in range(yields):
                await asyncio.sleep(0)
            ctx.set(["v"], yields)

        cfg = config("edge", {"A": []})
        repo = StepCounter(engine_repo)
        svc = service(
            repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, run)}), visible_after=0
        )
        inst = await svc.create_workflow("edge", f"e{yields}")
        assert (await svc.run_workflow(inst.id)).status == "completed"
        rows = await rows_of(svc, inst.id)
        assert rows["A"].status == "completed" and rows["A"].node_context["v"] == yields
        assert repo.applied == repo.steps  # every step applied: none raced another


async def test_heartbeat_stores_throttled_progress(engine_repo: Any, local_lock: Any) -> None:
    calls, gate, beaten = Calls(), asyncio.Event(), asyncio.Event()

    async def beats(ctx: JSONContext) -> None:
        await af.heartbeat({"done": 0})
        for i in range(1, 101):  # a hundred heartbeats in a burst: at most a couple of writes
            await af.heartbeat({"done": i})
        beaten.set()

    cfg = config("beat", {"A": []})
    registry = registry_with(cfg, calls, {"A": gated(calls, gate, beats)})
    repo = StepCounter(engine_repo)
    svc = service(repo, local_lock, registry, visible_after=0.05)
    inst = await svc.create_workflow("beat", "h1")
    passing = asyncio.create_task(svc.run_workflow(inst.id))

    async def progress_100() -> bool:
        row = (await rows_of(svc, inst.id)).get("A")
        return row is not None and row.node_context.get(SYSTEM, {}).get("progress") == {"done": 100}

    await until(progress_100)
    row = (await rows_of(svc, inst.id))["A"]
    assert row.status == "running" and "done" not in row.node_context  # the worker's own keys: at its end
    assert beaten.is_set() and repo.steps <= 2
    gate.set()
    await passing
    final = (await rows_of(svc, inst.id))["A"]
    assert final.status == "completed" and final.node_context[SYSTEM]["progress"] == {"done": 100}
    assert final.node_context["done"] is True


async def test_heartbeat_without_visible_after_makes_the_node_visible(
    engine_repo: Any, local_lock: Any
) -> None:
    calls, gate = Calls(), asyncio.Event()

    async def beat(ctx: JSONContext) -> None:
        await af.heartbeat("step 1")

    cfg = config("beat2", {"A": []})
    svc = service(engine_repo, local_lock, registry_with(cfg, calls, {"A": gated(calls, gate, beat)}))
    svc_clock_start = svc.clock.time()
    inst = await svc.create_workflow("beat2", "h2")
    passing = asyncio.create_task(svc.run_workflow(inst.id))

    async def visible() -> bool:
        row = (await rows_of(svc, inst.id)).get("A")
        return row is not None and row.status == "running"

    await until(visible)  # one throttle interval (1 s) after the start
    row = (await rows_of(svc, inst.id))["A"]
    assert row.node_context[SYSTEM]["progress"] == "step 1" and row.started_at >= int(svc_clock_start)
    gate.set()
    assert (await passing).status == "completed"


async def test_heartbeat_in_wait_check_keeps_the_node_pending(engine_repo: Any, local_lock: Any) -> None:
    calls, gate = Calls(), asyncio.Event()

    async def check(ctx: JSONContext) -> None:
        await af.heartbeat(42)
        await gate.wait()

    cfg = config("wc", {"A": []})
    registry = registry_with(cfg, calls, {"A": recording_worker(calls, check=check)})
    svc = service(engine_repo, local_lock, registry, visible_after=0.05)
    inst = await svc.create_workflow("wc", "p1")
    passing = asyncio.create_task(svc.run_workflow(inst.id))

    async def has_progress() -> bool:
        row = (await rows_of(svc, inst.id)).get("A")
        return row is not None and row.node_context.get(SYSTEM, {}).get("progress") == 42

    await until(has_progress)
    assert (await statuses(svc, inst.id))["A"] == "pending"
    gate.set()
    assert (await passing).status == "completed"


async def test_heartbeat_outside_a_worker_and_bad_progress_are_refused(
    engine_repo: Any, local_lock: Any
) -> None:
    with pytest.raises(InvalidStateError, match="only available inside a worker"):
        await af.heartbeat(1)
    seen: list[BaseException] = []

    async def bad(ctx: JSONContext) -> None:
        for progress in (object(), float("nan"), {"a": {1, 2}}):
            try:
                await af.heartbeat(progress)
            except ParamInvalidError as exc:
                seen.append(exc)

    calls = Calls()
    cfg = config("bad", {"A": []})
    svc = service(engine_repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, bad)}))
    inst = await svc.create_workflow("bad", "x")
    assert (await svc.run_workflow(inst.id)).status == "completed"
    assert len(seen) == 3 and all("progress must be JSON" in str(e) for e in seen)
    assert SYSTEM not in (await rows_of(svc, inst.id))["A"].node_context


async def test_a_running_write_after_a_cancel_is_not_applied_and_stops_the_worker(
    engine_repo: Any, local_lock: Any
) -> None:
    calls, started, cut = Calls(), asyncio.Event(), asyncio.Event()

    async def run(ctx: JSONContext) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cut.set()
            raise

    cfg = config("cut", {"A": []})
    svc = service(
        engine_repo,
        local_lock,
        registry_with(cfg, calls, {"A": recording_worker(calls, run)}),
        visible_after=0.2,
    )
    inst = await svc.create_workflow("cut", "c1")
    passing = asyncio.create_task(svc.run_workflow(inst.id))
    await started.wait()
    await svc.cancel_workflow_instance(inst.id)  # before the node's timer fires
    await asyncio.wait_for(cut.wait(), 5)  # the running write did not apply: the call is cut
    after = await passing
    assert after.status == "canceled"
    assert "A" not in await statuses(svc, inst.id)  # never stored as running over the cancel


async def test_a_running_write_of_a_stale_pass_is_fenced(engine_repo: Any, local_lock: Any) -> None:
    calls, started, cut = Calls(), asyncio.Event(), asyncio.Event()

    async def run(ctx: JSONContext) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cut.set()
            raise

    cfg = config("stale", {"A": []})
    repo = StepCounter(engine_repo)
    svc = service(
        repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, run)}), visible_after=0.2
    )
    inst = await svc.create_workflow("stale", "s1")
    passing = asyncio.create_task(svc.run_workflow(inst.id))
    await started.wait()
    assert await engine_repo.load_instance_state(inst.id, lease=True) is not None  # a newer pass began
    await asyncio.wait_for(cut.wait(), 5)
    await passing
    assert repo.steps == 1 and repo.applied == 0
    assert "A" not in await statuses(svc, inst.id)


async def test_a_node_running_past_its_max_wait_time_is_warned_about(
    engine_repo: Any, local_lock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    attempts: list[int] = []

    async def run(ctx: JSONContext) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("flaky")  # retryable: the node keeps its started_at
        await asyncio.sleep(0.05)  # the second attempt's work (its timer fires at once)

    calls = Calls()
    cfg = config("late", {"A": []}, A={"max_wait_time_ts": 5})
    svc = service(
        engine_repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, run)}), clock=clock
    )
    inst = await svc.create_workflow("late", "l1")
    assert (await svc.run_workflow(inst.id)).status == "running"
    clock.advance(10)
    with caplog.at_level(logging.WARNING, logger="asyncflow.engine"):
        await svc.run_workflow(inst.id)
    warnings = [
        r.getMessage() for r in caplog.records if "longer than its max_wait_time_ts" in r.getMessage()
    ]
    assert len(warnings) == 1 and "node A of instance" in warnings[0] and "(5 s)" in warnings[0]


async def test_a_retry_is_due_from_the_end_of_its_own_attempt_not_the_pass(
    engine_repo: Any, local_lock: Any
) -> None:
    clock = FakeClock()
    failed_at: list[float] = []
    a_failed = asyncio.Event()

    async def fails(ctx: JSONContext) -> None:
        failed_at.append(clock.time())
        a_failed.set()
        raise RuntimeError("flaky")

    async def slow(ctx: JSONContext) -> None:
        await a_failed.wait()
        await clock.sleep(30)  # a sibling branch working for 30 s after A's failure

    calls = Calls()
    cfg = config("sib", {"A": ["E"], "B": ["E"], "E": []})
    registry = registry_with(
        cfg, calls, {"A": recording_worker(calls, fails), "B": recording_worker(calls, slow)}
    )
    repo = StepCounter(engine_repo)
    svc = service(repo, local_lock, registry, clock=clock, retry=RetryPolicy(initial_interval=2, jitter=0))
    inst = await svc.create_workflow("sib", "r1")
    after = await svc.run_workflow(inst.id)
    assert after.status == "running" and clock.time() == failed_at[0] + 30
    record = await svc.repo.get_workflow_instance(inst.id)
    assert record is not None and record.next_run_at == int((failed_at[0] + 2) * 1000)  # not pass end + 2
    assert repo.steps == 2  # B's completion, then the pass's last write with A's retry: no extra commit


class HeldRunningWrites(StepCounter):
    """Holds every step that stores a node as ``running`` until ``release`` is set."""

    def __init__(self, repo: Any) -> None:
        super().__init__(repo)
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def apply_step(self, step: Any) -> Any:
        rows = [*step.inserts, *step.updates]
        if any(row.status == "running" for row in rows):
            self.holding.set()
            await self.release.wait()
        return await super().apply_step(step)


async def test_a_heartbeat_write_of_a_lone_branch_is_waited_for_when_the_pass_is_cancelled(
    engine_repo: Any, local_lock: Any
) -> None:
    """A linear pass has no task group until a second branch starts: a heartbeat's write it started
    meanwhile is still no orphan: cancelling the pass cancels it (held by the repo, it lands first)
    and the pass ends only after it."""
    calls, started = Calls(), asyncio.Event()

    async def run(ctx: JSONContext) -> None:
        await af.heartbeat("going")
        started.set()
        await asyncio.Event().wait()

    cfg = config("lone", {"A": ["B"], "B": []})
    repo = HeldRunningWrites(engine_repo)
    svc = service(repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, run)}))
    inst = await svc.create_workflow("lone", "l1")
    passing = asyncio.create_task(svc.run_workflow(inst.id))
    await started.wait()
    await asyncio.wait_for(repo.holding.wait(), 5)  # the heartbeat's write (after 1 s) is in flight
    writes = [t for t in asyncio.all_tasks() if t.get_name().endswith("-A-running")]
    assert len(writes) == 1
    passing.cancel()
    await asyncio.sleep(0.05)
    assert not passing.done()  # the pass waits for the write, which the repo holds
    repo.release.set()
    with pytest.raises(asyncio.CancelledError):
        await passing
    assert writes[0].done()
    assert (await statuses(svc, inst.id)).get("A") == "running"  # the held write landed, as a group's would
    assert "B" not in await statuses(svc, inst.id)
