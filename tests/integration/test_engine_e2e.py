"""End to end on every repo and with both locks (local and Redis): a workflow with a fan-out, a join, a
wait check, an external event, a retry, a cancel and a restart."""

from __future__ import annotations

from typing import Any

from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import TaskNotReady
from asyncflow.records import NodeExternalEvent

from .engine_helpers import Calls, config, recording_worker, registry_with, statuses

EDGES = {"intake": ["pick", "pack"], "pick": ["ship"], "pack": ["ship"], "ship": ["approve"], "approve": []}


def workers(calls: Calls, flaky: dict[str, int]) -> dict[str, Any]:
    def pack(ctx: JSONContext) -> None:
        flaky["left"] -= 1
        if flaky["left"] >= 0:
            raise RuntimeError("the packing machine jammed")
        ctx.set(["boxes"], 2)

    def ship(ctx: JSONContext) -> None:
        boxes, ok = ctx.get_int64("pre_node_context", "pack", "boxes")
        assert ok
        ctx.set(["shipped"], boxes)

    def approved(ctx: JSONContext) -> None:
        if not ctx.get("node_event", "event_content")[1]:
            raise TaskNotReady("waiting for a human")

    return {
        "pack": recording_worker(calls, pack),
        "ship": recording_worker(calls, ship, with_check=True),
        "approve": recording_worker(calls, None, approved),
    }


async def test_order_flow_end_to_end(engine_repo: Any, any_lock: Any) -> None:
    calls = Calls()
    flaky = {"left": 2}
    svc = WorkflowService(
        engine_repo, any_lock, registry_with(config("e2e", EDGES), calls, workers(calls, flaky))
    )
    inst = await svc.create_workflow("e2e", "order-1", context={"customer": "Ada"}, run=True)
    assert inst.status == "running"
    await svc.run_workflow(inst.id)
    await svc.run_workflow(inst.id)  # the third attempt of pack succeeds; ship and approve run
    st = await statuses(svc, inst.id)
    assert st["pack"] == "completed" and st["ship"] == "completed" and st["approve"] == "pending"
    await svc.add_node_external_event(inst.id, "approve", NodeExternalEvent(1, {"by": "manager"}))
    done = await svc.run_workflow(inst.id)
    assert done.status == "completed"
    assert calls.runs("pack") == 3 and calls.runs("ship") == 1 and calls.runs("intake") == 1
    # restart the join: ship and everything after it run again
    again = await svc.restart_workflow_node(inst.id, "ship", force=True, run=True)
    assert again.status == "completed"  # approve kept its node_event through the restart
    assert calls.runs("ship") == 2
    # a second order is canceled while it waits
    other = await svc.create_workflow("e2e", "order-2", run=True)
    await svc.cancel_workflow_instance(other.id)
    assert (await svc.run_workflow(other.id)).status == "canceled"
    assert set((await statuses(svc, other.id)).values()) <= {"completed", "canceled"}
