"""The workflow both example apps run: an order that is reserved, charged, then shipped.

``reserve`` → ``charge`` → ``ship``; each node writes what it did into its node context. ``ship`` has a
wait check that is ready at once (a real one would ask the carrier), so it shows a two-phase node.
"""

from __future__ import annotations

import asyncflow as af

WORKFLOW_TYPE = "order"

CONFIG = {
    "id": WORKFLOW_TYPE,
    "name": "Order",
    "nodes": [
        {"id": "reserve", "name": "Reserve stock", "next_nodes": ["charge"]},
        {"id": "charge", "name": "Charge the card", "next_nodes": ["ship"]},
        {"id": "ship", "name": "Ship the parcel", "next_nodes": []},
    ],
}


def build_registry() -> af.Registry:
    """A fresh registry with the order workflow and its workers."""
    registry = af.Registry()
    registry.load_workflow_config(CONFIG)

    @registry.task(WORKFLOW_TYPE, "reserve")
    async def reserve(ctx: af.JSONContext) -> None:
        sku, _ = ctx.get_string(af.WORKFLOW_CONTEXT, "sku")
        ctx.set(["reserved"], sku)

    @registry.task(WORKFLOW_TYPE, "charge")
    async def charge(ctx: af.JSONContext) -> None:
        amount, _ = ctx.get_int64(af.WORKFLOW_CONTEXT, "amount")
        ctx.set(["charged"], amount)

    async def parcel_picked_up(ctx: af.JSONContext) -> None:
        return None  # ready at once; raise af.TaskNotReady() to be asked again after the poll interval

    @registry.task(WORKFLOW_TYPE, "ship", wait_check=parcel_picked_up)
    async def ship(ctx: af.JSONContext) -> None:
        ctx.set(["tracking"], f"TRK-{af.current_node().instance_id}")

    return registry


async def describe(service: af.WorkflowService, instance_id: int) -> dict[str, object] | None:
    """The instance as JSON: status, context and each node's status (None if there is no such id)."""
    details = await service.query_workflow_instance_detail(
        af.QueryWorkflowInstanceParams(workflow_instance_id=instance_id)
    )
    if not details:
        return None
    detail = details[0]
    return {
        "id": detail.id,
        "business_id": detail.business_id,
        "status": detail.status,
        "context": detail.workflow_context,
        "nodes": {node.task_type: node.status for node in detail.task_instances},
    }
