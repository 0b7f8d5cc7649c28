"""Cancel, external events, restarts, queries and create, on every backend."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService, lock_key
from asyncflow.errors import (
    InstanceNotFoundError,
    InvalidStateError,
    LockFailedError,
    ParamInvalidError,
    TaskInstanceNotFoundError,
    TaskNotReady,
)
from asyncflow.records import (
    InstanceFields,
    InstanceWhere,
    NodeExternalEvent,
    Pager,
    QueryWorkflowInstanceParams,
    TaskFields,
    TaskWhere,
)
from asyncflow.status import NODE_EVENT

from .engine_helpers import Calls, config, detail_of, recording_worker, registry_with, rows_of, statuses


def make(repo: Any, lock: Any, registry: Any, **kwargs: Any) -> WorkflowService:
    return WorkflowService(repo, lock, registry, **kwargs)


def waiting_for_event(calls: Calls, key: str = "approved") -> Any:
    def check(ctx: JSONContext) -> None:
        content, ok = ctx.get(NODE_EVENT, "event_content")
        if not ok or not isinstance(content, dict) or key not in content:
            raise TaskNotReady("waiting for approval")
        ctx.set(["decision"], content[key])

    return recording_worker(calls, None, check)


# ---------------------------------------------------------------- cancel


async def test_cancel_init_then_run_stays_canceled(engine_repo: Any, local_lock: Any) -> None:
    svc = make(engine_repo, local_lock, registry_with(config("c1", {"A": []}), Calls()))
    inst = await svc.create_workflow("c1", "b")
    await svc.cancel_workflow_instance(inst.id)
    assert (await svc.run_workflow(inst.id)).status == "canceled"
    assert await rows_of(svc, inst.id) == {}


async def test_cancel_between_nodes_creates_nothing_more(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cfg = config("c2", {"A": ["B"], "B": []})
    gate = {"open": False}

    def check(ctx: JSONContext) -> None:
        if not gate["open"]:
            raise TaskNotReady()

    svc = make(
        engine_repo, local_lock, registry_with(cfg, calls, {"A": recording_worker(calls, None, check)})
    )
    inst = await svc.create_workflow("c2", "b", run=True)
    await svc.cancel_workflow_instance(inst.id)
    gate["open"] = True
    assert (await svc.run_workflow(inst.id)).status == "canceled"
    assert await statuses(svc, inst.id) == {"root": "completed", "A": "canceled"}
    assert calls.runs("B") == 0


async def test_cancel_terminal_is_a_noop_and_errors_are_typed(engine_repo: Any, local_lock: Any) -> None:
    svc = make(engine_repo, local_lock, registry_with(config("c3", {"A": []}), Calls()))
    inst = await svc.create_workflow("c3", "b", run=True)
    await svc.cancel_workflow_instance(inst.id)
    assert (await svc.get_workflow_instance(inst.id)).status == "completed"
    assert set((await statuses(svc, inst.id)).values()) == {"completed"}
    with pytest.raises(InstanceNotFoundError):
        await svc.cancel_workflow_instance(999_999)
    with pytest.raises(ParamInvalidError):
        await svc.cancel_workflow_instance(0)


async def test_cancel_while_a_pass_runs(engine_repo: Any, local_lock: Any) -> None:
    """The cancel succeeds; the pass stops at its next write and returns normally."""
    calls = Calls()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(ctx: JSONContext) -> None:
        entered.set()
        await release.wait()

    cfg = config("c4", {"A": ["B"], "B": [], "W": []})
    workers = {"A": recording_worker(calls, slow), "W": waiting_for_event(calls)}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers))
    inst = await svc.create_workflow("c4", "b")
    running = asyncio.create_task(svc.run_workflow(inst.id))
    await entered.wait()
    await svc.cancel_workflow_instance(inst.id)
    release.set()
    result = await running
    assert result.status == "canceled"
    rows = await rows_of(svc, inst.id)
    assert all(row.status in ("completed", "canceled") for row in rows.values())
    assert "B" not in rows and calls.runs("B") == 0
    assert (await svc.run_workflow(inst.id)).status == "canceled"


# ---------------------------------------------------------------- events


async def test_event_wakes_an_approval_node(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cfg = config("ev", {"approve": ["after"], "after": []})
    seen: dict[str, Any] = {}

    def after(ctx: JSONContext) -> None:
        seen.update(ctx.get("pre_node_context", "approve")[0])

    workers = {"approve": waiting_for_event(calls), "after": recording_worker(calls, after)}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers))
    inst = await svc.create_workflow("ev", "order-1", run=True)
    assert inst.status == "running"
    before = (await rows_of(svc, inst.id))["approve"]
    await svc.add_node_external_event(inst.id, "approve", NodeExternalEvent(5, {"approved": "yes"}))
    row = (await rows_of(svc, inst.id))["approve"]
    assert row.status == before.status and row.fail_count == before.fail_count
    assert row.node_context[NODE_EVENT] == {"event_ts": 5, "event_content": {"approved": "yes"}}
    assert calls.checks("approve") == 1  # the event did not run anything
    assert (await svc.run_workflow(inst.id)).status == "completed"
    assert seen["node_event"]["event_ts"] == 5 and seen["decision"] == "yes"


async def test_event_versioning_and_errors(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cfg = config("ev2", {"A": ["B"], "B": []})
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, {"A": waiting_for_event(calls, "never")}))
    inst = await svc.create_workflow("ev2", "b", run=True)
    with pytest.raises(InvalidStateError):
        await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(-1, "x"))
    await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(0, "zero"))
    await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(10, "ten"))
    await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(10, "ten again"))
    with pytest.raises(InvalidStateError):
        await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(9, "old"))
    event = (await rows_of(svc, inst.id))["A"].node_context[NODE_EVENT]
    assert event == {"event_ts": 10, "event_content": "ten again"}
    with pytest.raises(TaskInstanceNotFoundError):
        await svc.add_node_external_event(inst.id, "B", NodeExternalEvent(1, "x"))
    with pytest.raises(TaskInstanceNotFoundError):
        await svc.add_node_external_event(inst.id, "nope", NodeExternalEvent(1, "x"))
    with pytest.raises(InvalidStateError):
        await svc.add_node_external_event(inst.id, "root", NodeExternalEvent(1, "x"))  # completed node
    with pytest.raises(InstanceNotFoundError):
        await svc.add_node_external_event(424242, "A", NodeExternalEvent(1, "x"))
    with pytest.raises(ParamInvalidError):
        await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(True, "x"))  # type: ignore[arg-type]
    await svc.cancel_workflow_instance(inst.id)
    with pytest.raises(InvalidStateError):
        await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(20, "late"))


class ChangesAfterRead:
    """A repo that lets something else change the instance right after the event's read."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.change: Any = None

    async def load_instance_state(self, instance_id: int) -> Any:
        state = await self.inner.load_instance_state(instance_id)
        if self.change is not None:
            change, self.change = self.change, None
            await change()
        return state

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_an_event_is_one_atomic_write_that_refuses_a_change_since_its_read(
    engine_repo: Any, local_lock: Any
) -> None:
    calls = Calls()
    cfg = config("ev5", {"A": []})
    repo = ChangesAfterRead(engine_repo)
    svc = make(repo, local_lock, registry_with(cfg, calls, {"A": waiting_for_event(calls, "never")}))
    inst = await svc.create_workflow("ev5", "b", run=True)
    before = (await engine_repo.get_workflow_instance(inst.id)).next_run_at
    row = (await rows_of(svc, inst.id))["A"]
    assert before > svc.clock.time() * 1000  # not due: it waits for the event
    await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(1, "one"))
    woken = await engine_repo.get_workflow_instance(inst.id)
    assert woken.next_run_at <= svc.clock.time() * 1000 < before  # due now, in the same write
    assert (await rows_of(svc, inst.id))["A"].version == row.version + 1

    async def a_worker_wrote_the_node() -> None:
        now = await rows_of(svc, inst.id)
        await engine_repo.update_task_instances(
            TaskWhere(ids=(now["A"].id,)), TaskFields(node_context={"by": "worker"})
        )

    repo.change = a_worker_wrote_the_node
    with pytest.raises(InvalidStateError, match="changed since"):
        await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(2, "two"))
    assert (await rows_of(svc, inst.id))["A"].node_context == {"by": "worker"}  # not overwritten
    unchanged = await engine_repo.get_workflow_instance(inst.id)
    assert unchanged.version == woken.version  # and the instance was not touched either

    async def someone_cancelled_it() -> None:
        await engine_repo.update_workflow_instances(
            InstanceWhere(ids=(inst.id,)), InstanceFields(status="canceled")
        )

    repo.change = someone_cancelled_it
    with pytest.raises(InvalidStateError, match="changed since"):
        await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(3, "three"))
    assert (await rows_of(svc, inst.id))["A"].node_context == {"by": "worker"}

    await engine_repo.update_workflow_instances(  # a status this engine does not know (a newer one's)
        InstanceWhere(ids=(inst.id,)), InstanceFields(status="paused")
    )
    await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(4, "four"))  # stored, as before
    assert (await rows_of(svc, inst.id))["A"].node_context[NODE_EVENT]["event_ts"] == 4


async def test_event_keeps_other_keys_and_replaces_non_objects(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()

    def check(ctx: JSONContext) -> None:
        raise TaskNotReady()

    def run(ctx: JSONContext) -> None:
        ctx.set(["node_event"], {"note": "kept"})

    cfg = config("ev3", {"A": [], "B": []})

    def run_b(ctx: JSONContext) -> None:
        ctx.set(["node_event"], "not an object")

    workers = {"A": recording_worker(calls, run, check), "B": recording_worker(calls, run_b, check)}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers))
    inst = await svc.create_workflow("ev3", "b", run=True)
    await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(1, [1, 2]))
    await svc.add_node_external_event(inst.id, "B", NodeExternalEvent(1, None))
    rows = await rows_of(svc, inst.id)
    assert rows["A"].node_context[NODE_EVENT] == {"note": "kept", "event_ts": 1, "event_content": [1, 2]}
    assert rows["B"].node_context[NODE_EVENT] == {"event_ts": 1, "event_content": None}


async def test_event_while_locked_fails_or_waits(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = make(
        engine_repo,
        local_lock,
        registry_with(config("ev4", {"A": []}), calls, {"A": waiting_for_event(calls)}),
    )
    inst = await svc.create_workflow("ev4", "b", run=True)
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with local_lock.hold(lock_key(inst.id), 5):
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await holding.wait()
    with pytest.raises(LockFailedError):
        await svc.add_node_external_event(inst.id, "A", NodeExternalEvent(1, {"approved": 1}))
    assert NODE_EVENT not in (await rows_of(svc, inst.id))["A"].node_context
    waiter = asyncio.create_task(
        svc.add_node_external_event(inst.id, "A", NodeExternalEvent(1, {"approved": 1}), timeout=5)
    )
    await asyncio.sleep(0.05)
    release.set()
    await holder
    await waiter
    assert (await svc.run_workflow(inst.id)).status == "completed"


# ---------------------------------------------------------------- restarts


async def test_restart_node_reruns_it_and_its_descendants(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cfg = config("rs", {"A": ["B"], "B": ["C"], "C": [], "D": []})
    svc = make(engine_repo, local_lock, registry_with(cfg, calls))
    inst = await svc.create_workflow("rs", "b", run=True)
    assert inst.status == "completed"
    with pytest.raises(InvalidStateError):
        await svc.restart_workflow_node(inst.id, "B")
    assert (await svc.get_workflow_instance(inst.id)).status == "completed"
    after = await svc.restart_workflow_node(inst.id, "B", force=True)
    assert after.status == "running"
    assert await statuses(svc, inst.id) == {
        "root": "completed",
        "A": "completed",
        "B": "restarting",
        "C": "restarting",
        "D": "completed",
        "end": "restarting",
    }
    assert (await svc.run_workflow(inst.id)).status == "completed"
    assert calls.runs("B") == 2 and calls.runs("C") == 2 and calls.runs("A") == 1 and calls.runs("D") == 1


async def test_restart_node_resets_counts_and_refreshes_context(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    state = {"fail": True, "value": 1}

    def a_run(ctx: JSONContext) -> None:
        ctx.set(["value"], state["value"])

    def b_run(ctx: JSONContext) -> None:
        if state["fail"]:
            raise RuntimeError("transient")

    cfg = config("rs2", {"A": ["B"], "B": []}, B={"fail_max_count": 3})
    workers = {"A": recording_worker(calls, a_run), "B": recording_worker(calls, b_run, with_check=True)}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers))
    inst = await svc.create_workflow("rs2", "b", run=True)
    await svc.run_workflow(inst.id)
    assert (await rows_of(svc, inst.id))["B"].fail_count == 2
    await svc.restart_workflow_node(inst.id, "B")
    row = (await rows_of(svc, inst.id))["B"]
    assert row.status == "restarting" and row.fail_count == 0
    await svc.run_workflow(inst.id)  # fails once more: count 1, not failed (count was reset)
    assert (await rows_of(svc, inst.id))["B"].fail_count == 1
    assert (await svc.get_workflow_instance(inst.id)).status == "running"
    # restart A with a new output: B gets a fresh context, keeping its node_event
    await svc.add_node_external_event(inst.id, "B", NodeExternalEvent(3, "keep me"))
    state["value"], state["fail"] = 2, False
    after = await svc.restart_workflow_node(inst.id, "A", run=True)
    assert after.status == "completed"
    b_ctx = (await rows_of(svc, inst.id))["B"].node_context
    assert b_ctx["pre_node_context"]["A"]["value"] == 2
    assert b_ctx[NODE_EVENT]["event_content"] == "keep me"
    assert "system" not in b_ctx


async def test_restart_node_errors(engine_repo: Any, local_lock: Any) -> None:
    svc = make(engine_repo, local_lock, registry_with(config("rs3", {"A": []}), Calls()))
    inst = await svc.create_workflow("rs3", "b")
    with pytest.raises(ParamInvalidError):
        await svc.restart_workflow_node(inst.id, "nope")
    with pytest.raises(InstanceNotFoundError):
        await svc.restart_workflow_node(31337, "A")
    await svc.restart_workflow_node(inst.id, "A")  # no rows yet: nothing to reset
    assert await rows_of(svc, inst.id) == {}
    await svc.run_workflow(inst.id)
    await svc.restart_workflow_node(inst.id, "root", force=True)
    assert set((await statuses(svc, inst.id)).values()) == {"restarting"}
    assert (await svc.run_workflow(inst.id)).status == "completed"


async def test_restart_instance(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    state = {"fail": True}
    seen: list[Any] = []

    def run(ctx: JSONContext) -> None:
        seen.append(ctx.get("workflow_context", "v")[0])
        if state["fail"]:
            from asyncflow.errors import TaskFailedTerminate

            raise TaskFailedTerminate("stop")

    cfg = config("ri", {"A": ["B"], "B": [], "W": []})
    workers = {"A": recording_worker(calls, run), "W": waiting_for_event(calls)}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers))
    inst = await svc.create_workflow("ri", "b", context={"v": 1}, run=True)
    assert inst.status == "failed"
    assert (await statuses(svc, inst.id)).get("W") in (None, "canceled")
    state["fail"] = False
    after = await svc.restart_workflow_instance(inst.id, context={"v": 2}, run=True)
    assert after.status == "running"  # W still waits for its event
    assert seen == [1, 2]
    assert (await statuses(svc, inst.id))["B"] == "completed"
    noop = await svc.restart_workflow_instance(inst.id, run=True)
    assert noop.status == "running" and calls.runs("A") == 2
    await svc.add_node_external_event(inst.id, "W", NodeExternalEvent(1, {"approved": True}))
    assert (await svc.run_workflow(inst.id)).status == "completed"
    with pytest.raises(InvalidStateError):
        await svc.restart_workflow_instance(inst.id)


async def test_restart_instance_from_canceled(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cfg = config("ri2", {"W": ["X"], "X": []})
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, {"W": waiting_for_event(calls)}))
    inst = await svc.create_workflow("ri2", "b", run=True)
    await svc.cancel_workflow_instance(inst.id)
    await svc.restart_workflow_instance(inst.id)
    assert (await statuses(svc, inst.id))["W"] == "restarting"
    await svc.add_node_external_event(inst.id, "W", NodeExternalEvent(1, {"approved": 1}))
    assert (await svc.run_workflow(inst.id)).status == "completed"
    assert calls.runs("W") == 2


# ---------------------------------------------------------------- queries and create


async def test_queries_filters_paging_and_detail(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cfg = config("q", {"A": ["B"], "B": []})
    other = config("q2", {"X": []})
    registry = registry_with(cfg, calls)
    registry.load_workflow_config(other)
    registry.register_workflow_task("q2", "X", recording_worker(calls))
    svc = make(engine_repo, local_lock, registry)
    ids = [(await svc.create_workflow("q", f"biz-{i % 3}", task_id=i)).id for i in range(12)]
    await svc.create_workflow("q2", "biz-0")
    await svc.run_workflow(ids[0])
    assert await svc.count_workflow_instances() == 13
    assert await svc.count_workflow_instances(QueryWorkflowInstanceParams(workflow_type_in=("q",))) == 12
    params = QueryWorkflowInstanceParams(business_id="biz-0", page=Pager(page=1, size=2))
    assert await svc.count_workflow_instances(params) == 5
    page1 = await svc.query_workflow_instances(QueryWorkflowInstanceParams(page=Pager(0, 0)))
    assert [r.id for r in page1] == sorted(r.id for r in page1) and len(page1) == 10
    both = QueryWorkflowInstanceParams(status_in=("completed",), workflow_type_in=("q",))
    assert [r.id for r in await svc.query_workflow_instances(both)] == [ids[0]]
    desc = await svc.query_workflow_instances(QueryWorkflowInstanceParams(order_by_id_asc=False))
    assert desc[0].id > desc[-1].id
    by_task = await svc.query_workflow_instances(QueryWorkflowInstanceParams(task_id=7))
    assert [r.id for r in by_task] == [ids[7]]
    (detail,) = await svc.query_workflow_instance_detail(
        QueryWorkflowInstanceParams(workflow_instance_id=ids[0])
    )
    assert [t.task_type for t in detail.task_instances] == ["root", "A", "B", "end"]
    assert all(t.status == "completed" for t in detail.task_instances)
    assert detail.node("A").pre_nodes_keys == ["root"] and detail.node("A").next_nodes_keys == ["B"]
    assert detail.node("A").task_name == "node A" and detail.node("root").task_name == "开始节点"
    fresh = await detail_of(svc, ids[1])
    assert {t.status for t in fresh.task_instances} == {"uncreated"}
    assert all(t.id == 0 and t.node_context is None for t in fresh.task_instances)


async def test_detail_reports_fail_count(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()

    def boom(ctx: JSONContext) -> None:
        raise RuntimeError("x")

    svc = make(
        engine_repo,
        local_lock,
        registry_with(config("fc", {"A": []}), calls, {"A": recording_worker(calls, boom)}),
    )
    inst = await svc.create_workflow("fc", "b", run=True)
    await svc.run_workflow(inst.id)
    assert (await detail_of(svc, inst.id)).node("A").fail_count == 2


async def test_create_validates_its_input(engine_repo: Any, local_lock: Any) -> None:
    svc = make(engine_repo, local_lock, registry_with(config("cv", {"A": []}), Calls()))
    with pytest.raises(ParamInvalidError):
        await svc.create_workflow("cv", "b", context={"x": float("nan")})
    with pytest.raises(ParamInvalidError):
        await svc.create_workflow("cv", "b", context=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError):
        await svc.create_workflow("cv", "b\x00")
    assert await svc.count_workflow_instances() == 0
    inst = await svc.create_workflow("cv", "b", context=None)
    assert inst.workflow_context == {} and inst.status == "init"
    biz = "订单-🚀-\t\n\x01"
    inst2 = await svc.create_workflow("cv", biz, context=JSONContext({"n": 2**62}))
    stored = await svc.get_workflow_instance(inst2.id)
    assert stored.business_id == biz and stored.workflow_context == {"n": 2**62}


async def test_hundred_concurrent_creates(engine_repo: Any, local_lock: Any) -> None:
    svc = make(engine_repo, local_lock, registry_with(config("cc", {"A": []}), Calls()))
    created = await asyncio.gather(*(svc.create_workflow("cc", f"CONCURRENT-{i}") for i in range(100)))
    assert len({c.id for c in created}) == 100


async def test_forced_node_restart_revives_collateral_cancels(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    state = {"fail": True}

    def run(ctx: JSONContext) -> None:
        if state["fail"]:
            from asyncflow.errors import TaskFailedTerminate

            raise TaskFailedTerminate("stop")

    cfg = config("coll", {"W": [], "X": []})
    workers = {"W": waiting_for_event(calls), "X": recording_worker(calls, run)}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers), branch_concurrency=1)
    inst = await svc.create_workflow("coll", "b")
    await svc.run_workflow(inst.id)  # W pending (first in config order), then X fails the instance
    assert await statuses(svc, inst.id) == {"root": "completed", "W": "canceled", "X": "failed"}
    state["fail"] = False
    after = await svc.restart_workflow_node(inst.id, "X", force=True)
    assert after.status == "running"
    assert (await statuses(svc, inst.id))["W"] == "restarting"
    await svc.run_workflow(inst.id)
    await svc.add_node_external_event(inst.id, "W", NodeExternalEvent(1, {"approved": 1}))
    assert (await svc.run_workflow(inst.id)).status == "completed"


async def test_event_from_a_worker_of_the_same_instance_is_not_overwritten(
    engine_repo: Any, local_lock: Any
) -> None:
    calls = Calls()
    holder: dict[str, Any] = {}

    async def send(ctx: JSONContext) -> None:
        from asyncflow.worker import current_node

        await holder["svc"].add_node_external_event(
            current_node().instance_id, "W", NodeExternalEvent(1, {"approved": "by A"})
        )

    cfg = config("self", {"W": [], "A": []})
    workers = {"W": waiting_for_event(calls), "A": recording_worker(calls, send)}
    svc = make(engine_repo, local_lock, registry_with(cfg, calls, workers), branch_concurrency=1)
    holder["svc"] = svc
    inst = await svc.create_workflow("self", "b")
    await svc.run_workflow(inst.id)
    row = (await rows_of(svc, inst.id))["W"]
    assert row.node_context[NODE_EVENT]["event_content"] == {"approved": "by A"}
    assert (await svc.run_workflow(inst.id)).status == "completed"
    assert (await rows_of(svc, inst.id))["W"].node_context["decision"] == "by A"


async def test_lock_wait_timeouts_are_checked_like_wait_for_workflow_s(
    engine_repo: Any, local_lock: Any
) -> None:
    """``timeout=`` of an event and of a restart: seconds >= 0 or ``None``. An int beyond a float's
    range raised a raw ``OverflowError``; NaN and negative values were taken as "do not wait"."""
    svc = make(engine_repo, local_lock, registry_with(config("tw", {"A": []}), Calls()))
    inst = await svc.create_workflow("tw", "b", run=True)
    event = NodeExternalEvent(event_ts=1, event_content={})
    for bad in (10**400, float("nan"), -1, -float("inf"), "1", True):
        with pytest.raises(ParamInvalidError, match="timeout"):
            await svc.add_node_external_event(inst.id, "A", event, timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(ParamInvalidError, match="timeout"):
            await svc.restart_workflow_node(inst.id, "A", force=True, timeout=bad)  # type: ignore[arg-type]
    for good in (0, 5, float("inf")):  # inf: as None
        restarted = await svc.restart_workflow_node(inst.id, "A", force=True, timeout=good)
        assert restarted.status == "running"
