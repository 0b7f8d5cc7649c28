"""The demo's sample: an order workflow (read this file to see how a real workflow is written).

::

    root ─> validate_order ─┬─> reserve_stock ────┐                 ┌─> ship_order ─> notify_customer ─┐
                            ├─> charge_payment ───┼─> route_order ──┤                                  ├─> end
                            └─> manager_approval ─┘                 └─> refund ────────────────────────┘

* ``validate_order`` checks the order (a synchronous node: ``run`` only).
* ``reserve_stock``, ``charge_payment`` and ``manager_approval`` run in parallel (a fan-out);
  ``route_order`` waits for all three (a join).
* ``charge_payment`` talks to a flaky payment gateway: its first two attempts fail with an ordinary
  exception, which the engine retries with back-off; the third succeeds (``fail_count`` ends at 2).
* ``manager_approval`` asks a manager (``run``) and then waits (``wait_check`` raises ``TaskNotReady``)
  until the decision arrives as an external event on the node
  (``WorkflowService.add_node_external_event`` or ``asyncflow event ID manager_approval --content
  '{"approved": true}'``). A decision flagged ``"fraud": true`` fails the workflow
  (``TaskFailedTerminate``); an approval or a plain rejection is recorded for ``route_order``.
* ``route_order`` is a branch: it calls ``af.choose`` to follow ``ship_order`` for an approved order and
  ``refund`` for a rejected one; the successor not chosen ends ``skipped`` (so does ``notify_customer``
  after a skipped ``ship_order``), and the order still completes: ``end`` waits for each of its
  predecessors to be done (completed or skipped).
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
from ..worker import NormalTaskWorker, choose, current_node

__all__ = [
    "APPROVAL_LIMIT",
    "FRAUD_LIMIT",
    "WORKFLOW_TYPE",
    "ApprovalDesk",
    "make_registry",
    "order_config",
]

WORKFLOW_TYPE = "order_demo"
APPROVAL_LIMIT = 500.0
"""Orders above this amount are rejected by the (simulated) manager: they take the ``refund`` branch."""

FRAUD_LIMIT = 800.0
"""Orders above this amount are blocked by the (simulated) manager as suspected fraud: they fail."""

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
            NodeConfig(id="reserve_stock", name="Reserve stock", next_nodes=("route_order",)),
            NodeConfig(
                id="charge_payment", name="Charge payment", next_nodes=("route_order",), fail_max_count=5
            ),
            NodeConfig(
                id="manager_approval",
                name="Manager approval",
                next_nodes=("route_order",),
                max_wait_time_ts=3600,
            ),
            NodeConfig(id="route_order", name="Route order", next_nodes=("ship_order", "refund")),
            NodeConfig(id="ship_order", name="Ship order", next_nodes=("notify_customer",)),
            NodeConfig(id="notify_customer", name="Notify customer"),
            NodeConfig(id="refund", name="Refund"),
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
        if content.get("fraud"):
            raise TaskFailedTerminate(
                f"blocked by {content.get('by', 'the manager')}: {content.get('reason')}"
            )
        ctx.set(["approved"], bool(content["approved"]))
        if not content["approved"]:
            ctx.set(["rejection"], content.get("reason"))

    return NormalTaskWorker(run=ask, wait_check=decision)


async def route_order(ctx: JSONContext) -> None:
    """Join and branch: once stock, payment and approval are all done, ship or refund (``af.choose``)."""
    pre, _ = ctx.get(PRE_NODE_CONTEXT)
    pre = pre if isinstance(pre, dict) else {}
    approval = pre.get("manager_approval", {})
    ctx.set(
        ["order"],
        {
            "reservation": pre.get("reserve_stock", {}).get("reservation"),
            "payment_id": pre.get("charge_payment", {}).get("payment_id"),
            "charged": pre.get("charge_payment", {}).get("charged"),
            "approved_by": approval.get("approved_by"),
        },
    )
    choose("ship_order" if approval.get("approved") else "refund")  # the other one ends skipped


async def ship_order(ctx: JSONContext) -> None:
    """The approved branch: ship what was reserved and paid for."""
    order, _ = ctx.get(PRE_NODE_CONTEXT, "route_order", "order")
    ctx.set(["shipment"], order)


async def refund(ctx: JSONContext) -> None:
    """The rejected branch: give the money back and release the stock (the order completes refunded)."""
    order, _ = ctx.get(PRE_NODE_CONTEXT, "route_order", "order")
    order = order if isinstance(order, dict) else {}
    ctx.set(["refunded"], order.get("charged"))
    ctx.set(["refund_id"], f"REF-{current_node().instance_id:06d}")
    ctx.set(["released"], order.get("reservation"))


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
        "route_order": NormalTaskWorker(run=route_order),
        "ship_order": NormalTaskWorker(run=ship_order),
        "notify_customer": NormalTaskWorker(run=notify_customer),
        "refund": NormalTaskWorker(run=refund),
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
