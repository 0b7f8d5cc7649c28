"""The demo's sample: an order workflow (read this file to see how a real workflow is written).

::

    root ─> validate_order ─┬─> reserve_stock ────┐
                            ├─> charge_payment ───┼─> ship_order ─> notify_customer ─> end
                            └─> manager_approval ─┘

* ``validate_order`` checks the order (a synchronous node: ``run`` only).
* ``reserve_stock``, ``charge_payment`` and ``manager_approval`` run in parallel (a fan-out);
  ``ship_order`` waits for all three (a join).
* ``charge_payment`` talks to a flaky payment gateway: its first two attempts fail with an ordinary
  exception, which the engine retries with back-off; the third succeeds (``fail_count`` ends at 2).
* ``manager_approval`` asks a manager (``run``) and then waits (``wait_check`` raises ``TaskNotReady``)
  until the decision arrives as an external event on the node
  (``WorkflowService.add_node_external_event`` or ``asyncflow event ID manager_approval --content
  '{"approved": true}'``). A rejection fails the workflow (``TaskFailedTerminate``).
* ``notify_customer`` may fail without failing the order (``TaskFailedContinue``).

Run it on a worker process with ``asyncflow worker asyncflow.demo.order:make_registry`` or see it all at
once with ``asyncflow demo``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..config import NodeConfig, WorkflowConfig
from ..context import JSONContext
from ..errors import TaskFailedContinue, TaskFailedTerminate, TaskNotReady
from ..registry import Registry
from ..status import NODE_EVENT, PRE_NODE_CONTEXT, WORKFLOW_CONTEXT
from ..worker import NormalTaskWorker, current_node

__all__ = ["APPROVAL_LIMIT", "WORKFLOW_TYPE", "ApprovalDesk", "make_registry", "order_config"]

WORKFLOW_TYPE = "order_demo"
APPROVAL_LIMIT = 900.0
"""Orders above this amount are rejected by the (simulated) manager."""

GATEWAY_FAILURES = 2
"""How many times the payment gateway fails before it accepts a charge."""


def order_config() -> WorkflowConfig:
    """The workflow config (the Go JSON shape; ``WorkflowConfig.to_dict()`` shows it)."""
    return WorkflowConfig(
        id=WORKFLOW_TYPE,
        name="Order (asyncflow demo)",
        nodes=(
            NodeConfig(
                id="validate_order",
                name="Validate order",
                next_nodes=("reserve_stock", "charge_payment", "manager_approval"),
            ),
            NodeConfig(id="reserve_stock", name="Reserve stock", next_nodes=("ship_order",)),
            NodeConfig(
                id="charge_payment", name="Charge payment", next_nodes=("ship_order",), fail_max_count=5
            ),
            NodeConfig(
                id="manager_approval",
                name="Manager approval",
                next_nodes=("ship_order",),
                max_wait_time_ts=3600,
            ),
            NodeConfig(id="ship_order", name="Ship order", next_nodes=("notify_customer",)),
            NodeConfig(id="notify_customer", name="Notify customer"),
        ),
    )


class ApprovalDesk:
    """Where ``manager_approval`` files its requests: the demo's "manager" reads them from ``requests``.

    In a real system ``run`` would send an e-mail or open a ticket; the answer comes back as an external
    event on the node, whoever sends it.
    """

    def __init__(self) -> None:
        self.requests: asyncio.Queue[tuple[int, float]] = asyncio.Queue()

    def ask(self, instance_id: int, amount: float) -> None:
        """File a request to approve ``amount`` for the instance (never blocks)."""
        self.requests.put_nowait((instance_id, amount))


# ----------------------------------------------------------------------------------- the workers


async def validate_order(ctx: JSONContext) -> None:
    """Check the order in the workflow context and compute its total."""
    items, ok = ctx.get(WORKFLOW_CONTEXT, "items")
    if not ok or not isinstance(items, list) or not items:
        raise TaskFailedTerminate("the order has no items")
    total = sum(float(item["price"]) * int(item["qty"]) for item in items)
    ctx.set(["total"], round(total, 2))
    ctx.set(["item_count"], sum(int(item["qty"]) for item in items))


async def reserve_stock(ctx: JSONContext) -> None:
    """Reserve the items (simulated warehouse call)."""
    await asyncio.sleep(0.01)
    count, _ = ctx.get_int64(PRE_NODE_CONTEXT, "validate_order", "item_count")
    ctx.set(["reservation"], f"RSV-{current_node().instance_id:06d}")
    ctx.set(["reserved_items"], count)


async def charge_payment(ctx: JSONContext) -> None:
    """Charge the card; the simulated gateway times out on the first attempts of every order."""
    node = current_node()
    if node.fail_count < GATEWAY_FAILURES:
        raise ConnectionError(f"payment gateway timed out (simulated, attempt {node.fail_count + 1})")
    total, _ = ctx.get_float64(PRE_NODE_CONTEXT, "validate_order", "total")
    ctx.set(["charged"], total)
    ctx.set(["payment_id"], f"PAY-{node.instance_id:06d}")


def make_approval_worker(desk: ApprovalDesk | None) -> NormalTaskWorker:
    """``manager_approval``: ask (``run``), then wait for the decision event (``wait_check``)."""

    async def ask(ctx: JSONContext) -> None:
        total, _ = ctx.get_float64(PRE_NODE_CONTEXT, "validate_order", "total")
        ctx.set(["requested_for"], total)
        if desk is not None:
            desk.ask(current_node().instance_id, total)

    async def decision(ctx: JSONContext) -> None:
        content, ok = ctx.get(NODE_EVENT, "event_content")
        if not ok or not isinstance(content, dict) or "approved" not in content:
            raise TaskNotReady("waiting for a manager's decision")
        ctx.set(["approved_by"], content.get("by", "unknown"))
        if not content["approved"]:
            raise TaskFailedTerminate(
                f"rejected by {content.get('by', 'the manager')}: {content.get('reason')}"
            )

    return NormalTaskWorker(run=ask, wait_check=decision)


async def ship_order(ctx: JSONContext) -> None:
    """Join: runs once stock, payment and approval are all done."""
    pre, _ = ctx.get(PRE_NODE_CONTEXT)
    pre = pre if isinstance(pre, dict) else {}
    ctx.set(
        ["shipment"],
        {
            "reservation": pre.get("reserve_stock", {}).get("reservation"),
            "payment_id": pre.get("charge_payment", {}).get("payment_id"),
            "approved_by": pre.get("manager_approval", {}).get("approved_by"),
        },
    )


async def notify_customer(ctx: JSONContext) -> None:
    """Send the confirmation; a bounced e-mail must not fail a shipped order."""
    email, _ = ctx.get_string(WORKFLOW_CONTEXT, "email")
    if email.endswith(".invalid"):
        raise TaskFailedContinue(f"mail to {email} bounced")
    ctx.set(["notified"], email)


def make_registry(desk: ApprovalDesk | None = None) -> Registry:
    """A registry holding the order workflow and its workers (``desk`` receives approval requests)."""
    registry = Registry()
    registry.load_workflow_config(order_config())
    workers: dict[str, Any] = {
        "validate_order": NormalTaskWorker(run=validate_order),
        "reserve_stock": NormalTaskWorker(run=reserve_stock),
        "charge_payment": NormalTaskWorker(run=charge_payment),
        "manager_approval": make_approval_worker(desk),
        "ship_order": NormalTaskWorker(run=ship_order),
        "notify_customer": NormalTaskWorker(run=notify_customer),
    }
    for task_key, worker in workers.items():
        registry.register_workflow_task(WORKFLOW_TYPE, task_key, worker)
    return registry


def sample_order(number: int, amount_seed: int) -> dict[str, Any]:
    """A made-up order (the workflow context of one instance); deterministic for a given seed."""
    price = 20.0 + (amount_seed * 37) % 300
    qty = 1 + amount_seed % 3
    domain = "example.invalid" if number % 10 == 7 else "example.com"
    return {
        "order_no": f"ORD-{number:05d}",
        "email": f"customer{number}@{domain}",
        "items": [{"sku": f"SKU-{amount_seed % 50:03d}", "price": price, "qty": qty}],
    }
