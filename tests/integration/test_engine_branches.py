"""Branches and joins (0.2) on every repo: ``af.choose``, ``skipped`` nodes, ``join`` all/any/first."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import TaskNotReady
from asyncflow.worker import choose

from .engine_helpers import Calls, config, recording_worker, registry_with, rows_of, statuses

# check picks approve or reject; both feed notify (join any), which feeds the end.
BRANCH = {"check": ["approve", "reject"], "approve": ["notify"], "reject": ["notify"], "notify": []}


def branch_service(repo: Any, lock: Any, calls: Calls, pick: tuple[str, ...], join: str = "any") -> Any:
    def check(ctx: JSONContext) -> None:
        choose(*pick)

    def approve(ctx: JSONContext) -> None:
        ctx.set(["ok"], True)

    workers = {"check": recording_worker(calls, check), "approve": recording_worker(calls, approve)}
    cfg = config("branch", BRANCH, notify={"join": join})
    return WorkflowService(repo, lock, registry_with(cfg, calls, workers))


async def test_choose_one_branch_then_join_any(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = branch_service(engine_repo, local_lock, calls, ("approve",))
    inst = await svc.create_workflow("branch", "b-1", run=True)
    assert inst.status == "completed"
    st = await statuses(svc, inst.id)
    assert st["approve"] == "completed" and st["reject"] == "skipped" and st["notify"] == "completed"
    assert st["end"] == "completed"
    assert calls.runs("reject") == 0 and calls.runs("notify") == 1
    rows = await rows_of(svc, inst.id)
    pre = rows["notify"].node_context["pre_node_context"]
    assert set(pre) == {"approve"} and pre["approve"]["ok"] is True  # only completed predecessors


async def test_choose_nothing_skips_every_successor(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = branch_service(engine_repo, local_lock, calls, ())
    inst = await svc.create_workflow("branch", "b-2", run=True)
    assert inst.status == "completed"  # a skipped node never fails a workflow
    st = await statuses(svc, inst.id)
    assert st["approve"] == st["reject"] == st["notify"] == "skipped"
    assert st["check"] == "completed" and st["end"] == "completed"
    assert calls.runs("approve") == calls.runs("reject") == calls.runs("notify") == 0
    end = (await rows_of(svc, inst.id))["end"]
    assert end.node_context["pre_node_context"] == {}


async def test_all_join_propagates_a_skip(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = branch_service(engine_repo, local_lock, calls, ("reject",), join="all")
    inst = await svc.create_workflow("branch", "b-3", run=True)
    assert inst.status == "completed"
    st = await statuses(svc, inst.id)
    assert st["reject"] == "completed" and st["approve"] == "skipped" and st["notify"] == "skipped"
    assert calls.runs("notify") == 0


async def test_without_choose_every_successor_runs(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    svc = WorkflowService(engine_repo, local_lock, registry_with(config("plain", BRANCH), calls))
    inst = await svc.create_workflow("plain", "p-1", run=True)
    assert inst.status == "completed"
    assert set((await statuses(svc, inst.id)).values()) == {"completed"}


async def test_first_join_cancels_a_slow_running_sibling(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def fast(ctx: JSONContext) -> None:
        await started.wait()  # slow's worker is running when fast completes

    async def slow(ctx: JSONContext) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    edges = {"start": ["fast", "slow"], "fast": ["race"], "slow": ["race"], "race": []}
    cfg = config("race", edges, race={"join": "first"})
    workers = {"slow": recording_worker(calls, slow), "fast": recording_worker(calls, fast)}
    svc = WorkflowService(engine_repo, local_lock, registry_with(cfg, calls, workers))
    inst = await asyncio.wait_for(svc.create_workflow("race", "r-1", run=True), 10)
    assert inst.status == "completed"
    assert cancelled.is_set()
    st = await statuses(svc, inst.id)
    assert st["fast"] == "completed" and st["slow"] == "canceled" and st["race"] == "completed"
    assert st["end"] == "completed"
    rows = await rows_of(svc, inst.id)
    assert set(rows["race"].node_context["pre_node_context"]) == {"fast"}
    again = await svc.run_workflow(inst.id)  # a later pass does not take the drop for a cancel
    assert again.status == "completed"


async def test_restart_upstream_of_skipped_nodes_runs_them_again(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    pick = {"branch": ("approve",)}

    def check(ctx: JSONContext) -> None:
        choose(*pick["branch"])

    cfg = config("restartable", BRANCH, notify={"join": "any"})
    svc = WorkflowService(
        engine_repo, local_lock, registry_with(cfg, calls, {"check": recording_worker(calls, check)})
    )
    inst = await svc.create_workflow("restartable", "rs-1", run=True)
    assert (await statuses(svc, inst.id))["reject"] == "skipped"
    pick["branch"] = ("reject",)
    again = await svc.restart_workflow_node(inst.id, "check", force=True, run=True)
    assert again.status == "completed"
    st = await statuses(svc, inst.id)
    assert st["reject"] == "completed" and st["approve"] == "skipped" and st["notify"] == "completed"
    assert calls.runs("reject") == 1 and calls.runs("approve") == 1 and calls.runs("notify") == 2


async def test_first_join_drops_a_sibling_not_yet_started(engine_repo: Any, local_lock: Any) -> None:
    calls = Calls()
    edges = {"start": ["fast", "slow"], "fast": ["race"], "slow": ["race"], "race": []}
    cfg = config("race2", edges, race={"join": "first"})
    svc = WorkflowService(engine_repo, local_lock, registry_with(cfg, calls))
    inst = await svc.create_workflow("race2", "r-2", run=True)
    assert inst.status == "completed"
    st = await statuses(svc, inst.id)
    assert st["fast"] == "completed" and st["slow"] == "canceled" and st["race"] == "completed"
    assert calls.runs("slow") == 0


@pytest.mark.parametrize("join", ["all", "any", "first"])
async def test_a_join_of_one_predecessor_changes_nothing(
    engine_repo: Any, local_lock: Any, join: str
) -> None:
    """A lone feeder's completion (whose writes the runner finds without the edges) gives what the
    general rules give for a ``first`` join of one edge: the chain completes, end with its last node."""
    calls = Calls()
    cfg = config(f"one-{join}", {"A": ["B"], "B": ["C"], "C": []}, B={"join": join}, C={"join": join})
    svc = WorkflowService(engine_repo, local_lock, registry_with(cfg, calls))
    inst = await svc.create_workflow(f"one-{join}", "j", context={"k": 1}, run=True)
    assert inst.status == "completed"
    assert [t for _, t in calls.order] == ["A", "B", "C"]
    rows = await rows_of(svc, inst.id)
    assert {t: r.status for t, r in rows.items()} == dict.fromkeys(
        ("root", "A", "B", "C", "end"), "completed"
    )
    assert rows["end"].node_context["pre_node_context"] == {"C": {}}
    assert rows["C"].node_context["workflow_context"] == {"k": 1}


async def test_a_restarted_node_on_a_branch_not_taken_is_skipped_again(
    engine_repo: Any, local_lock: Any
) -> None:
    calls = Calls()
    svc = branch_service(engine_repo, local_lock, calls, ("approve",))
    inst = await svc.create_workflow("branch", "b-9", run=True)
    await svc.restart_workflow_node(inst.id, "reject", force=True, run=True)
    done = await svc.run_workflow(inst.id)  # the next pass runs notify, whose predecessors are done
    assert done.status == "completed"
    st = await statuses(svc, inst.id)
    assert st["reject"] == "skipped" and st["notify"] == "completed" and st["end"] == "completed"
    assert calls.runs("reject") == 0 and calls.runs("notify") == 2


async def test_choose_in_a_wait_check_of_a_pass_nested_in_a_run_raises(
    engine_repo: Any, local_lock: Any
) -> None:
    """A ``wait_check`` of another instance's pass, run from inside a node's ``run()``, has no choice
    to make: ``choose()`` raises there (it must not reach the enclosing ``run()``'s successors)."""
    from asyncflow.registry import Registry
    from asyncflow.worker import NormalTaskWorker, current_node

    seen: list[object] = []
    registry = Registry()
    registry.load_workflow_config(config("outer", {"X": ["Y", "Z"], "Y": [], "Z": []}))
    registry.load_workflow_config(config("inner", {"P": []}))
    svc = WorkflowService(engine_repo, local_lock, registry)
    inner_ids: list[int] = []

    async def x_run(ctx: JSONContext) -> None:
        await svc.run_workflow(inner_ids[0])  # its wait_check runs inside this run()
        seen.append(current_node().task_type)  # this node's own call again
        choose("Y")

    async def p_check(ctx: JSONContext) -> None:
        for pick in ("Y", "P"):
            try:
                choose(pick)
            except LookupError as exc:
                seen.append(("LookupError", pick, str(exc)))

    async def noop(ctx: JSONContext) -> None:
        return None

    registry.register_workflow_task("outer", "X", NormalTaskWorker(run=x_run))
    for node in ("Y", "Z"):
        registry.register_workflow_task("outer", node, NormalTaskWorker(run=noop))
    registry.register_workflow_task("inner", "P", NormalTaskWorker(run=noop, wait_check=p_check))
    inner = await svc.create_workflow("inner", "in-1")
    inner_ids.append(inner.id)
    outer = await svc.create_workflow("outer", "out-1", run=True)
    assert outer.status == "completed"
    message = "asyncflow.choose() is only available inside a worker's run()"
    assert seen == [("LookupError", "Y", message), ("LookupError", "P", message), "X"]
    st = await statuses(svc, outer.id)
    assert st["Y"] == "completed" and st["Z"] == "skipped"  # X's own choice, made after the inner pass
    assert (await statuses(svc, inner.id))["P"] == "completed"


async def test_a_skipped_node_is_not_reported_as_stalling_the_instance(
    engine_repo: Any, local_lock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A pass after the one that skipped a branch finds its row ``skipped``: terminal, nothing stalls."""
    calls = Calls()
    ready = [False]

    def approve(ctx: JSONContext) -> None:
        if not ready[0]:
            raise TaskNotReady("later")

    workers = {
        "check": recording_worker(calls, lambda ctx: choose("approve")),
        "approve": recording_worker(calls, approve),
    }
    svc = WorkflowService(engine_repo, local_lock, registry_with(config("branch", BRANCH), calls, workers))
    inst = await svc.create_workflow("branch", "stall-1", run=True)
    assert (await statuses(svc, inst.id))["reject"] == "skipped"
    ready[0] = True
    with caplog.at_level(logging.DEBUG, logger="asyncflow.engine"):
        assert (await svc.run_workflow(inst.id)).status == "completed"
    assert not [r for r in caplog.records if "which the engine does not run" in r.getMessage()]
