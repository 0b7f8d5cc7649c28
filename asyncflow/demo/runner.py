"""``asyncflow demo``: create N orders, drive them with a :class:`~asyncflow.driver.WorkflowDriver`, play
the manager who approves them, show live progress, and finish with a summary and the DAG.

The sample workflow itself is :mod:`asyncflow.demo.order`. Timings are shortened for the demo (retry
back-off from 0.1 s, not-ready checks every 0.1 s); the engine's warnings about the simulated failures
are counted and summarised instead of printed (``-v`` prints them).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from ..cli.backend import CLIError, open_service, redact, resolve_db_url
from ..cli.graph import dag_text, nodes_of_definition
from ..cli.table import format_table
from ..driver import WorkflowDriver
from ..engine.rules import SchedulePolicy
from ..engine.service import WorkflowService
from ..errors import InvalidStateError, LockFailedError, TaskInstanceNotFoundError
from ..records import NodeExternalEvent, QueryTaskInstanceParams, QueryWorkflowInstanceParams
from ..retry import RetryPolicy
from ..status import TERMINAL_STATUSES, InstanceStatus, TaskStatus
from . import order
from .order import APPROVAL_LIMIT, FRAUD_LIMIT, WORKFLOW_TYPE, ApprovalDesk, make_registry, sample_order

__all__ = ["DemoResult", "run_demo", "run_demo_command"]

logger = logging.getLogger(__name__)

DEMO_SCHEDULE = SchedulePolicy(poll_interval=0.1)
DEMO_RETRY = RetryPolicy(initial_interval=0.1, max_interval=1.0)
_STATUSES = [s.value for s in InstanceStatus]
_TERMINAL = TERMINAL_STATUSES
_MANAGERS = 32  # approvals decided at once
DEMO_CLAIM_LEASE = 2.0


@dataclass(slots=True)
class DemoResult:
    """What a demo run did: instances by status, timings (seconds) and the driver's counters.

    ``refunded`` counts the completed instances that took the ``refund`` branch (their ``ship_order``
    was skipped); the other completed ones shipped.
    """

    counts: dict[str, int]
    create_seconds: float
    drive_seconds: float
    passes: int
    errors: int
    lock_skips: int
    first_id: int
    refunded: int = 0
    log_counts: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in _TERMINAL)


class _LogTally(logging.Handler):
    """Counts the engine's log records by level instead of printing them."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.counts: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname] = self.counts.get(record.levelname, 0) + 1


class _Progress:
    """A live status line on a terminal; plain lines about once a second otherwise."""

    def __init__(self, stream: TextIO, total: int, enabled: bool) -> None:
        self.stream, self.total, self.enabled = stream, total, enabled
        self.tty = enabled and stream.isatty()
        self._last_plain = 0.0
        self._last_text = ""

    def update(self, counts: dict[str, int], elapsed: float, *, final: bool = False) -> None:
        if not self.enabled:
            return
        done = sum(counts.get(s, 0) for s in _TERMINAL)
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = "  ".join(f"{s} {counts[s]}" for s in _STATUSES if counts.get(s))
        text = f"{done}/{self.total} finished  {parts}  {rate:.1f}/s  {elapsed:.1f}s"
        if self.tty:
            filled = int(24 * done / self.total) if self.total else 24
            bar = "#" * filled + "." * (24 - filled)
            self.stream.write(f"\r\x1b[K[{bar}] {text}" + ("\n" if final else ""))
            self.stream.flush()
        elif final or (elapsed - self._last_plain >= 1.0 and text != self._last_text):
            self._last_plain, self._last_text = elapsed, text
            self.stream.write(f"progress: {text}\n")
            self.stream.flush()


async def _count(svc: WorkflowService, first_id: int) -> dict[str, int]:
    counts = {}
    for status in _STATUSES:
        params = QueryWorkflowInstanceParams(
            workflow_type_in=(WORKFLOW_TYPE,), id_greater_than=first_id - 1, status_in=(status,)
        )
        counts[status] = await svc.count_workflow_instances(params)
    return counts


async def _count_refunded(svc: WorkflowService, first_id: int, n: int) -> int:
    """Instances of this run whose ``refund`` node completed (the branch ``route_order`` chose)."""
    rows = await svc.repo.query_task_instances(
        QueryTaskInstanceParams(task_type="refund", status_in=(TaskStatus.COMPLETED.value,))
    )
    return sum(1 for row in rows if first_id <= row.workflow_instance_id < first_id + n)


async def _decide(svc: WorkflowService, desk: ApprovalDesk, instance_id: int, amount: float) -> None:
    await asyncio.sleep(random.uniform(0.005, 0.03))  # the manager reads the request
    approved = amount <= APPROVAL_LIMIT
    fraud = amount > FRAUD_LIMIT
    limit = FRAUD_LIMIT if fraud else APPROVAL_LIMIT
    content = {
        "approved": approved,
        "fraud": fraud,
        "by": "demo-manager",
        "reason": None if approved else f"amount {amount:.2f} is over the limit {limit:.2f}",
    }
    event = NodeExternalEvent(event_ts=int(time.time() * 1000), event_content=content)
    try:
        await svc.add_node_external_event(instance_id, "manager_approval", event, timeout=10.0)
    except LockFailedError:
        desk.ask(instance_id, amount)  # still busy after 10 s: try again later
    except (InvalidStateError, TaskInstanceNotFoundError) as error:
        logger.warning("approval of instance %s not delivered: %s", instance_id, error)


async def _manager(svc: WorkflowService, desk: ApprovalDesk) -> None:
    """Plays the manager: answers every approval request (orders over the limit are rejected)."""
    slots = asyncio.Semaphore(_MANAGERS)

    async def one(instance_id: int, amount: float) -> None:
        try:
            await _decide(svc, desk, instance_id, amount)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as tg:
        while True:
            instance_id, amount = await desk.requests.get()
            await slots.acquire()
            tg.create_task(one(instance_id, amount), name=f"demo-approve-{instance_id}")


async def run_demo(
    svc: WorkflowService,
    desk: ApprovalDesk,
    n: int,
    *,
    concurrency: int = 64,
    time_limit: float = 300.0,
    progress: _Progress | None = None,
) -> DemoResult:
    """Create ``n`` orders on ``svc`` (whose registry is ``make_registry(desk)``) and drive them to the end.

    Raises :class:`~asyncflow.cli.backend.CLIError` if they are not all finished within ``time_limit``.
    """
    started = time.monotonic()
    first_id = 0
    rng = random.Random(7919)
    for number in range(1, n + 1):
        context = sample_order(number, rng.randrange(1000))
        inst = await svc.create_workflow(WORKFLOW_TYPE, context["order_no"], context=context)
        first_id = first_id or inst.id
    created = time.monotonic()
    # passes here take milliseconds: a short claim lease brings back at once an instance whose pass
    # was skipped because the manager held its lock to deliver a decision
    driver = WorkflowDriver(
        svc,
        concurrency=concurrency,
        poll_interval=DEMO_SCHEDULE.poll_interval,
        workflow_types=[WORKFLOW_TYPE],
        claim_lease=DEMO_CLAIM_LEASE,
    )
    counts: dict[str, int] = {}
    async with asyncio.TaskGroup() as tg:
        manager = tg.create_task(_manager(svc, desk), name="demo-manager")
        try:
            async with driver:
                while True:
                    counts = await _count(svc, first_id)
                    elapsed = time.monotonic() - created
                    done = sum(counts[s] for s in _TERMINAL)
                    if progress is not None:
                        progress.update(counts, elapsed, final=done >= n)
                    if done >= n:
                        # the counts above are one query per status: an instance that finished between
                        # two of them was counted twice; finished ones no longer move, so count again
                        counts = await _count(svc, first_id)
                        break
                    if elapsed > time_limit:
                        raise CLIError(
                            f"demo timed out after {time_limit:.0f} s: {done} of {n} orders finished", 1
                        )
                    await asyncio.sleep(0.2)
        finally:
            manager.cancel()
    ended = time.monotonic()
    refunded = await _count_refunded(svc, first_id, n)
    stats = driver.stats
    return DemoResult(
        counts=counts,
        create_seconds=created - started,
        drive_seconds=ended - created,
        passes=stats.passes,
        errors=stats.errors,
        lock_skips=stats.lock_skips,
        first_id=first_id,
        refunded=refunded,
    )


def _summary(result: DemoResult, n: int, db: str) -> str:
    lines = ["", f"Summary: {n} orders of workflow {WORKFLOW_TYPE!r} on {db}", ""]
    rows: list[list[object]] = [
        [status, result.counts.get(status, 0), f"{100 * result.counts.get(status, 0) / n:.1f}%"]
        for status in _STATUSES
        if result.counts.get(status, 0)
    ]
    rows.append(["total", sum(result.counts.values()), "100.0%"])
    lines.append(format_table(["STATUS", "INSTANCES", "SHARE"], rows, right=(1, 2)))
    completed = result.counts.get("completed", 0)
    outcomes = [
        ("shipped (completed)", completed - result.refunded),
        ("refunded (completed, branch)", result.refunded),
        ("failed", result.counts.get("failed", 0)),
    ]
    by_outcome: list[list[object]] = [[name, count, f"{100 * count / n:.1f}%"] for name, count in outcomes]
    lines += ["", format_table(["ORDERS", "INSTANCES", "SHARE"], by_outcome, right=(1, 2))]
    rate = result.finished / result.drive_seconds if result.drive_seconds > 0 else 0.0
    lines += [
        "",
        format_table(
            ["MEASURE", "VALUE"],
            [
                [
                    "time",
                    f"{result.create_seconds + result.drive_seconds:.2f} s "
                    f"(create {result.create_seconds:.2f} s, drive {result.drive_seconds:.2f} s)",
                ],
                ["throughput", f"{rate:.1f} instances/s while driving"],
                ["driver", f"{result.passes} passes, {result.errors} errors, {result.lock_skips} lock skips"],
                [
                    "engine log",
                    ", ".join(f"{v} {k}" for k, v in sorted(result.log_counts.items())) or "quiet",
                ],
            ],
        ),
    ]
    failed = result.counts.get("failed", 0)
    lines += [
        "",
        "Expected along the way: every charge_payment fails twice before it succeeds (retried with",
        "back-off), some customer e-mails bounce (TaskFailedContinue: the order still completes),",
        f"orders over {APPROVAL_LIMIT:.0f} are rejected by the manager and route_order sends them to the",
        f"refund branch (af.choose: ship_order and notify_customer end skipped; {result.refunded} refunded),",
        f"and orders over {FRAUD_LIMIT:.0f} are blocked as suspected fraud (TaskFailedTerminate: {failed}",
        "failed instance(s) above). -v prints the engine's log.",
    ]
    return "\n".join(lines)


async def run_demo_command(args: argparse.Namespace) -> int:
    """The ``asyncflow demo`` command (see :mod:`asyncflow.cli.entry` for the arguments)."""
    url = resolve_db_url(args.db)
    desk = ApprovalDesk()
    registry = make_registry(desk)
    out = sys.stdout
    tally = _LogTally()
    engine_logger = logging.getLogger("asyncflow")
    quiet = not args.verbose
    if quiet:
        engine_logger.addHandler(tally)
        engine_logger.propagate = False
    try:
        async with open_service(
            args.db, args.redis, registry, create_file=True, schedule=DEMO_SCHEDULE, retry=DEMO_RETRY
        ) as svc:
            await svc.repo.create_schema()
            out.write(f"asyncflow demo: {args.n} orders of {WORKFLOW_TYPE!r} on {redact(url)}\n")
            out.write(f"the workflow: {order.__file__}\n")
            out.flush()
            progress = _Progress(sys.stderr, args.n, enabled=not args.no_progress)
            result = await run_demo(
                svc, desk, args.n, concurrency=args.concurrency, time_limit=args.timeout, progress=progress
            )
            result.log_counts = dict(tally.counts)
            definition = registry.get_workflow_definition(WORKFLOW_TYPE)
    finally:
        if quiet:
            engine_logger.removeHandler(tally)
            engine_logger.propagate = True
    out.write(_summary(result, args.n, redact(url)) + "\n\n")
    out.write(f"DAG of {WORKFLOW_TYPE} (rank = longest path from root):\n")
    out.write(dag_text(nodes_of_definition(definition)) + "\n\n")
    last = result.first_id + args.n - 1
    out.write(
        "Next: asyncflow ls --status failed   |   asyncflow show "
        f"{last}   |   asyncflow show {last} --html order.html   |   asyncflow graph {WORKFLOW_TYPE}\n"
    )
    if args.db:
        out.write(f"(add --db {args.db} to those commands)\n")
    return 0
