"""The pass (``run_workflow``) on every backend: phases, contexts, outcomes, readiness, ordering."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from asyncflow.clock import FakeClock
from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import (
    BusinessCriticalError,
    ConfigNotFoundError,
    InstanceNotFoundError,
    LockFailedError,
    ParamInvalidError,
    TaskFailedContinue,
    TaskFailedTerminate,
    TaskNotReady,
)
from asyncflow.records import QueryWorkflowInstanceParams
from asyncflow.status import TIMEOUT_REASON
from asyncflow.worker import NormalTaskWorker

from .engine_helpers import Calls, config, recording_worker, registry_with, rows_of, statuses

pytestmark = pytest.mark.usefixtures("engine_repo")


def make(engine_repo: Any, local_lock: Any, registry: Any, **kwargs: Any) -> WorkflowService:
    return WorkflowService(engine_repo, local_lock, registry, **kwargs)


async def test_single_sync_node_completes_in_one_pass(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = make(engine_repo, local_lock, registry_with(config("one", {"X": []}), calls))
    inst = await svc.create_workflow("one", "b-1", context={"k": 1})
    assert inst.status == "init"
    after = await svc.run_workflow(inst.id)
    assert after.status == "completed"
    assert await statuses(svc, inst.id) == {"root": "completed", "X": "completed", "end": "completed"}
    assert calls.runs("X") == 1
    stored = await svc.get_workflow_instance(inst.id)
    assert stored.status == "completed"


async def test_create_with_run_returns_the_instance_after_its_pass(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = make(
        engine_repo, local_lock, registry_with(config("lin", {"A": ["B"], "B": ["C"], "C": []}), calls)
    )
    inst = await svc.create_workflow("lin", "b", run=True)
    assert inst.status == "completed"
    assert [t for _, t in calls.order] == ["A", "B", "C"]
    assert (await svc.get_workflow_instance(inst.id)).status == "completed"


async def test_contexts_follow_go(engine_repo: Any, local_lock: Any) -> None:
    """First-level context; direct predecessors only; system & co stripped; end sees every sink."""
    seen: dict[str, dict[str, Any]] = {}

    def keep(name: str, output: dict[str, Any]) -> Any:
        def run(ctx: JSONContext) -> None:
            seen[name] = JSONContext(ctx.to_map()).to_map()
            for key, value in output.items():
                ctx.set([key], value)

        return run

    calls = Calls()
    cfg = config("ctx", {"A": ["B"], "B": ["C"], "C": [], "D": []})
    workers = {
        "A": recording_worker(calls, keep("A", {"out": "a", "reason": "why", "system": {"x": 1}})),
        "B": recording_worker(calls, keep("B", {"out": "b", "big": 2**60})),
        "C": recording_worker(calls, keep("C", {"out": "c"})),
        "D": recording_worker(calls, keep("D", {"out": "d"})),
    }
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers))
    inst = await svc.create_workflow("ctx", "b", context={"w": {"n": 1}}, run=True)
    assert inst.status == "completed"
    assert seen["A"] == {"pre_node_context": {"root": {}}, "workflow_context": {"w": {"n": 1}}}
    assert seen["B"]["pre_node_context"] == {"A": {"out": "a", "reason": "why"}}
    assert seen["C"]["pre_node_context"] == {"B": {"out": "b", "big": 2**60}}  # no grand-ancestor A
    rows = await rows_of(svc, inst.id)
    end_pre = rows["end"].node_context["pre_node_context"]
    assert end_pre == {"C": {"out": "c"}, "D": {"out": "d"}}
    assert rows["B"].node_context["big"] == 2**60 and isinstance(rows["B"].node_context["big"], int)


async def test_fan_in_runs_once_after_all_predecessors(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cfg = config("dia", {"A": ["B", "C", "D", "E"], "B": ["F"], "C": ["F"], "D": ["F"], "E": ["F"], "F": []})
    svc = make(engine_repo, local_lock, registry_with(cfg, calls))
    inst = await svc.create_workflow("dia", "b", run=True)
    assert inst.status == "completed"
    assert calls.runs("F") == 1
    assert calls.order[-1] == ("run", "F")
    assert set(calls.order[1:5]) == {("run", t) for t in "BCDE"}


async def test_pending_fan_in_is_checked_once_per_pass(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cfg = config("fanin", {"A": ["J"], "B": ["J"], "J": []})

    def not_ready(ctx: JSONContext) -> None:
        raise TaskNotReady("later")

    workers = {"J": recording_worker(calls, check=not_ready)}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers))
    inst = await svc.create_workflow("fanin", "b", run=True)
    assert calls.checks("J") == 1
    await svc.run_workflow(inst.id)
    assert calls.checks("J") == 2 and calls.runs("J") == 1


async def test_retrying_fan_in_counts_one_failure_per_pass(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cfg = config("fanfail", {"A": ["J"], "B": ["J"], "J": []})

    def boom(ctx: JSONContext) -> None:
        raise RuntimeError("boom")

    svc = make(engine_repo, local_lock, registry_with(cfg, calls, {"J": recording_worker(calls, boom)}))
    inst = await svc.create_workflow("fanfail", "b", run=True)
    await svc.run_workflow(inst.id)
    rows = await rows_of(svc, inst.id)
    assert rows["J"].fail_count == 2 and rows["J"].status == "running"
    assert calls.runs("J") == 2


async def test_async_node_pending_then_completed_without_rerunning(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    ready = {"now": False}

    def run(ctx: JSONContext) -> None:
        ctx.set(["started"], True)

    def check(ctx: JSONContext) -> None:
        if not ready["now"]:
            ctx.set(["polls"], (ctx.get_int64("polls")[0]) + 1)
            raise TaskNotReady("still waiting")
        ctx.set(["done_in_check"], True)

    cfg = config("async", {"A": ["B"], "B": []})
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, run, check)}))
    inst = await svc.create_workflow("async", "b", run=True)
    rows = await rows_of(svc, inst.id)
    assert inst.status == "running"
    assert rows["A"].status == "pending" and rows["A"].fail_count == 0
    assert rows["A"].node_context["started"] is True and rows["A"].node_context["polls"] == 1
    assert "still waiting" in rows["A"].node_context["system"]["last_error"]
    assert "last_error_time" in rows["A"].node_context["system"]
    assert "B" not in rows
    ready["now"] = True
    after = await svc.run_workflow(inst.id)
    assert after.status == "completed"
    assert calls.runs("A") == 1 and calls.checks("A") == 2
    rows = await rows_of(svc, inst.id)
    assert rows["A"].node_context["done_in_check"] is True


async def test_not_ready_from_run_reruns_and_keeps_data(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    attempts = {"n": 0}

    def run(ctx: JSONContext) -> None:
        attempts["n"] += 1
        ctx.set(["attempt"], attempts["n"])
        if attempts["n"] < 2:
            raise TaskNotReady()

    svc = make(
        engine_repo,
        local_lock,
        registry_with(config("nr", {"A": []}), calls, {"A": recording_worker(calls, run)}),
    )
    inst = await svc.create_workflow("nr", "b", run=True)
    rows = await rows_of(svc, inst.id)
    assert rows["A"].status == "running" and rows["A"].fail_count == 0
    assert rows["A"].node_context["attempt"] == 1
    assert (await svc.run_workflow(inst.id)).status == "completed"
    assert calls.runs("A") == 2


async def test_generic_error_counts_and_blocks_children(
    engine_repo: Any, local_lock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()

    def boom(ctx: JSONContext) -> None:
        raise ValueError("bad input")

    def critical(ctx: JSONContext) -> None:
        raise RuntimeError("wrapped") from BusinessCriticalError("call a human")

    cfg = config("gen", {"A": ["B"], "B": [], "C": []})
    workers = {"A": recording_worker(calls, boom), "C": recording_worker(calls, critical)}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers))
    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        inst = await svc.create_workflow("gen", "b", run=True)
    assert inst.status == "running"
    rows = await rows_of(svc, inst.id)
    assert rows["A"].fail_count == 1 and rows["A"].status == "running"
    assert "ValueError: bad input" in rows["A"].node_context["system"]["last_error"]
    assert "B" not in rows
    levels = {
        r.getMessage().split(" ")[1]: r.levelno for r in caplog.records if "failed (retry)" in r.getMessage()
    }
    assert levels == {"A": logging.WARNING, "C": logging.ERROR}


async def test_fail_max_count_fails_on_nth_failure(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()

    def boom(ctx: JSONContext) -> None:
        raise RuntimeError("nope")

    cfg = config("fmc", {"A": ["B"], "B": []}, A={"fail_max_count": 3})
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, boom)}))
    inst = await svc.create_workflow("fmc", "b", run=True)
    assert (await svc.run_workflow(inst.id)).status == "running"
    after = await svc.run_workflow(inst.id)
    assert after.status == "failed"
    rows = await rows_of(svc, inst.id)
    assert rows["A"].status == "failed" and rows["A"].fail_count == 3
    assert "fail max count" in rows["A"].node_context["system"]["last_error"]
    assert "B" not in rows
    assert (await svc.run_workflow(inst.id)).status == "failed"
    assert calls.runs("A") == 3


@pytest.mark.parametrize(("limit", "passes", "expected"), [(1, 1, "failed"), (0, 10, "running")])
async def test_fail_max_count_one_and_zero(
    engine_repo: Any, local_lock: Any, limit: int, passes: int, expected: str
) -> None:
    calls = Calls()

    def boom(ctx: JSONContext) -> None:
        raise RuntimeError("nope")

    cfg = config("fmc1", {"A": []}, A={"fail_max_count": limit})
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, boom)}))
    inst = await svc.create_workflow("fmc1", "b")
    for _ in range(passes):
        result = await svc.run_workflow(inst.id)
    assert result.status == expected
    assert (await rows_of(svc, inst.id))["A"].fail_count == passes


async def test_failed_continue_completes_and_successors_run(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()

    def cont(ctx: JSONContext) -> None:
        raise TaskFailedContinue("whatever")

    cfg = config("cont", {"A": ["B"], "B": []})
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, cont)}))
    inst = await svc.create_workflow("cont", "b", run=True)
    assert inst.status == "completed"
    rows = await rows_of(svc, inst.id)
    assert rows["A"].status == "completed" and rows["A"].fail_count == 1
    assert calls.runs("B") == 1


@pytest.mark.parametrize("phase", ["run", "check"])
async def test_terminate_fails_node_instance_and_cancels_siblings(
    engine_repo: Any, local_lock: Any, phase: str
) -> None:
    calls = Calls()

    def stop(ctx: JSONContext) -> None:
        raise TaskFailedTerminate("key parameter missing")

    def wait(ctx: JSONContext) -> None:
        raise TaskNotReady()

    cfg = config("term", {"W": [], "P": [], "X": ["Y"], "Y": []})
    x = recording_worker(calls, stop) if phase == "run" else recording_worker(calls, None, stop)
    workers = {"W": recording_worker(calls, wait), "P": recording_worker(calls, None, wait), "X": x}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers))
    inst = await svc.create_workflow("term", "b")
    first = await svc.run_workflow(inst.id)
    assert first.status == "failed"
    rows = await rows_of(svc, inst.id)
    assert rows["X"].status == "failed" and rows["X"].fail_count == 1
    assert "Y" not in rows
    non_terminal = {
        t: r.status for t, r in rows.items() if r.status not in ("completed", "failed", "canceled")
    }
    assert non_terminal == {}
    assert (await svc.get_workflow_instance(inst.id)).status == "failed"


async def test_timeout_is_strict_and_sets_reason(engine_repo: Any, local_lock: Any) -> None:
    clock = FakeClock()
    calls = Calls()

    def wait(ctx: JSONContext) -> None:
        raise TaskNotReady()

    def custom(ctx: JSONContext) -> None:
        ctx.set(["reason"], "my own reason")
        raise RuntimeError("slow")

    cfg = config("to", {"A": [], "B": []}, A={"max_wait_time_ts": 10}, B={"max_wait_time_ts": 10})
    workers = {"A": recording_worker(calls, wait), "B": recording_worker(calls, custom)}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers), clock=clock)
    inst = await svc.create_workflow("to", "b", run=True)
    assert inst.status == "running"
    clock.advance(10)  # exactly 10 s: not yet (strict >)
    assert (await svc.run_workflow(inst.id)).status == "running"
    clock.advance(1)
    assert (await svc.run_workflow(inst.id)).status == "failed"
    rows = await rows_of(svc, inst.id)
    failed = [t for t, r in rows.items() if r.status == "failed"]
    assert len(failed) == 1
    reason = rows[failed[0]].node_context["reason"]
    assert reason == (TIMEOUT_REASON if failed[0] == "A" else "my own reason")


async def test_success_after_deadline_completes(engine_repo: Any, local_lock: Any) -> None:
    clock = FakeClock()
    calls = Calls()
    state = {"ready": False}

    def check(ctx: JSONContext) -> None:
        if not state["ready"]:
            raise TaskNotReady()

    cfg = config("late", {"A": []}, A={"max_wait_time_ts": 5})
    svc = make(
        engine_repo,
        local_lock,
        registry_with(cfg, calls, {"A": recording_worker(calls, None, check)}),
        clock=clock,
    )
    inst = await svc.create_workflow("late", "b", run=True)
    clock.advance(100)
    state["ready"] = True
    assert (await svc.run_workflow(inst.id)).status == "completed"


async def test_chained_signals_are_recognised(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()

    def chained(ctx: JSONContext) -> None:
        try:
            raise TaskNotReady("inner")
        except TaskNotReady as exc:
            raise RuntimeError("outer") from exc

    svc = make(
        engine_repo,
        local_lock,
        registry_with(config("ch", {"A": []}), calls, {"A": recording_worker(calls, chained)}),
    )
    inst = await svc.create_workflow("ch", "b", run=True)
    assert (await rows_of(svc, inst.id))["A"].fail_count == 0  # not ready, not a counted failure


async def test_run_none_fails_not_implemented_every_pass(engine_repo: Any, local_lock: Any) -> None:
    registry = registry_with(config("ni", {"A": []}), Calls(), {"A": NormalTaskWorker()})
    svc = make(engine_repo, local_lock, registry)
    inst = await svc.create_workflow("ni", "b", run=True)
    await svc.run_workflow(inst.id)
    row = (await rows_of(svc, inst.id))["A"]
    assert row.fail_count == 2 and "Not implemented" in row.node_context["system"]["last_error"]


async def test_cancelled_error_propagates_and_node_stays_resumable(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    started = asyncio.Event()

    async def hang(ctx: JSONContext) -> None:
        started.set()
        await asyncio.sleep(3600)

    cfg = config("hang", {"A": []})
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, hang)}))
    inst = await svc.create_workflow("hang", "b")
    task = asyncio.create_task(svc.run_workflow(inst.id))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rows = await rows_of(svc, inst.id)
    assert rows.get("A") is None or rows["A"].status == "running"
    # the lock was released and a later pass finishes the node
    svc.registry.register_workflow_task("hang2", "A", recording_worker(calls))  # unrelated type is fine
    registry = registry_with(cfg, calls)
    svc2 = make(engine_repo, local_lock, registry)
    assert (await svc2.run_workflow(inst.id)).status == "completed"


async def test_terminal_instance_is_not_touched(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = make(engine_repo, local_lock, registry_with(config("term2", {"A": []}), calls))
    inst = await svc.create_workflow("term2", "b", run=True)
    before = await rows_of(svc, inst.id)
    before_inst = (
        await svc.query_workflow_instances(QueryWorkflowInstanceParams(workflow_instance_id=inst.id))
    )[0]
    again = await svc.run_workflow(inst.id)
    assert again.status == "completed"
    assert await rows_of(svc, inst.id) == before
    after_inst = (
        await svc.query_workflow_instances(QueryWorkflowInstanceParams(workflow_instance_id=inst.id))
    )[0]
    assert after_inst.version == before_inst.version
    assert calls.runs("A") == 1


async def test_bad_ids_and_unknown_types(engine_repo: Any, local_lock: Any) -> None:
    svc = make(engine_repo, local_lock, registry_with(config("ok", {"A": []}), Calls()))
    for bad in (0, -1, True, "1"):
        with pytest.raises(ParamInvalidError):
            await svc.run_workflow(bad)  # type: ignore[arg-type]
    with pytest.raises(InstanceNotFoundError):
        await svc.run_workflow(987654)
    for run in (False, True):
        with pytest.raises(ConfigNotFoundError):
            await svc.create_workflow("nope", "b", run=run)
    assert await svc.count_workflow_instances() == 0


async def test_concurrent_runs_one_wins_the_lock(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    gate = asyncio.Event()

    async def slow(ctx: JSONContext) -> None:
        await gate.wait()

    svc = make(
        engine_repo,
        local_lock,
        registry_with(config("two", {"A": []}), calls, {"A": recording_worker(calls, slow)}),
    )
    inst = await svc.create_workflow("two", "b")
    first = asyncio.create_task(svc.run_workflow(inst.id))
    while calls.runs("A") == 0:
        await asyncio.sleep(0.001)
    with pytest.raises(LockFailedError):
        await svc.run_workflow(inst.id)
    gate.set()
    assert (await first).status == "completed"
    assert calls.runs("A") == 1


async def test_worker_running_its_own_instance_is_refused(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    holder: dict[str, Any] = {}

    async def reenter(ctx: JSONContext) -> None:
        from asyncflow.worker import current_node

        try:
            await holder["svc"].run_workflow(current_node().instance_id)
        except LockFailedError as exc:
            ctx.set(["refused"], str(exc))

    svc = make(
        engine_repo,
        local_lock,
        registry_with(config("re", {"A": []}), calls, {"A": recording_worker(calls, reenter)}),
    )
    holder["svc"] = svc
    inst = await svc.create_workflow("re", "b", run=True)
    assert inst.status == "completed"
    assert "its own instance" in (await rows_of(svc, inst.id))["A"].node_context["refused"]


async def test_branch_order_is_config_order(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cfg = config("order", {"Z": [], "M": [], "A": []})
    svc = make(engine_repo, local_lock, registry_with(cfg, calls), branch_concurrency=1)
    await svc.create_workflow("order", "b", run=True)
    assert [t for _, t in calls.order] == ["Z", "M", "A"]


async def test_a_waiting_branch_takes_the_slot_before_a_chain_goes_on(
    engine_repo: Any, local_lock: Any
) -> None:
    """A task keeps its branch slot from a node to the next one only while no other branch waits."""
    calls = Calls()

    async def slow(ctx: JSONContext) -> None:
        for _ in range(5):  # X's task starts meanwhile and waits for the one slot
            await asyncio.sleep(0)

    cfg = config("chain", {"A": ["B"], "X": [], "B": []})
    workers = {"A": recording_worker(calls, slow)}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers), branch_concurrency=1)
    assert (await svc.create_workflow("chain", "b", run=True)).status == "completed"
    assert [t for _, t in calls.order] == ["A", "X", "B"]


async def test_siblings_run_concurrently_within_a_pass(engine_repo: Any, local_lock: Any) -> None:
    """Each sibling waits for an event the other sets: run one after the other they would deadlock."""
    calls = Calls()
    events = {"L": asyncio.Event(), "R": asyncio.Event()}

    def pair(me: str, other: str) -> Any:
        async def run(ctx: JSONContext) -> None:
            events[me].set()
            await asyncio.wait_for(events[other].wait(), 10)

        return run

    cfg = config("pair", {"L": [], "R": []})
    workers = {"L": recording_worker(calls, pair("L", "R")), "R": recording_worker(calls, pair("R", "L"))}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers))
    inst = await svc.create_workflow("pair", "b", run=True)
    assert inst.status == "completed"


async def test_end_completed_but_instance_running_is_repaired(engine_repo: Any, local_lock: Any) -> None:
    from asyncflow.records import InstanceFields, InstanceWhere

    calls = Calls()
    svc = make(engine_repo, local_lock, registry_with(config("rep", {"A": []}), calls))
    inst = await svc.create_workflow("rep", "b", run=True)
    await engine_repo.update_workflow_instances(
        InstanceWhere(ids=(inst.id,)), InstanceFields(status="running")
    )
    assert (await svc.run_workflow(inst.id)).status == "completed"
    assert (await svc.get_workflow_instance(inst.id)).status == "completed"
    assert calls.runs("A") == 1


async def test_worker_context_that_is_not_json_is_a_counted_failure(
    engine_repo: Any, local_lock: Any
) -> None:
    calls = Calls()
    state = {"poison": True}

    def bad(ctx: JSONContext) -> None:
        ctx.set(["oops"], float("nan") if state["poison"] else 1.5)

    svc = make(
        engine_repo,
        local_lock,
        registry_with(config("nan", {"A": []}), calls, {"A": recording_worker(calls, bad)}),
    )
    inst = await svc.create_workflow("nan", "b")
    assert (await svc.run_workflow(inst.id)).status == "running"
    row = (await rows_of(svc, inst.id))["A"]
    assert row.status == "running" and row.fail_count == 1
    assert row.node_context["oops"] == "nan"
    assert "not JSON" in row.node_context["system"]["last_error"]
    state["poison"] = False
    assert (await svc.run_workflow(inst.id)).status == "completed"
