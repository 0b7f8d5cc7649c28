"""The demo's summary adds up to the orders it ran, even when instances finish while it counts them
(its counts are one query per status; seen as ``running 8`` + ``completed 10`` of 10 under load)."""

from __future__ import annotations

import pathlib
import re
from typing import Any

from asyncflow.demo.order import ApprovalDesk, make_registry
from asyncflow.demo.runner import DEMO_RETRY, DEMO_SCHEDULE, run_demo
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import QueryWorkflowInstanceParams
from asyncflow.store.memory import MemoryWorkflowRepo

N = 6
README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


class StaleRunningCount(MemoryWorkflowRepo):
    """Answers the first "running" count after every order finished as it was just before they did:
    what a count racing with the last completions sees."""

    def __init__(self) -> None:
        super().__init__()
        self.stale_given = False

    async def count_workflow_instances(self, params: QueryWorkflowInstanceParams) -> int:
        if params.status_in == ("running",) and not self.stale_given:
            finished = QueryWorkflowInstanceParams(status_in=("completed", "failed", "canceled"))
            if await super().count_workflow_instances(finished) == N:
                self.stale_given = True
                return N
        return await super().count_workflow_instances(params)


async def test_the_summary_counts_add_up_when_instances_finish_while_counted() -> None:
    desk = ApprovalDesk()
    repo: Any = StaleRunningCount()
    svc = WorkflowService(repo, LocalWorkflowLock(), make_registry(desk))
    result = await run_demo(svc, desk, N, concurrency=8, time_limit=60.0)
    assert repo.stale_given
    assert sum(result.counts.values()) == N, result.counts
    assert result.counts.get("running", 0) == 0
    # ORD-00003 is blocked as fraud (failed), ORD-00006 rejected and refunded (the branch), 4 shipped
    assert (result.counts.get("failed"), result.counts.get("completed"), result.refunded) == (1, 5, 1)


async def test_the_readme_sample_summary_is_what_the_default_demo_gives() -> None:
    """The README shows the demo's order counts for its default 200 orders: they are deterministic."""
    text = README.read_text(encoding="utf-8")
    sample = re.search(
        r"^shipped \(completed\)\s+(\d+).*?^refunded \(completed, branch\)\s+(\d+).*?"
        r"^failed\s+(\d+)",
        text,
        flags=re.M | re.S,
    )
    assert sample is not None
    desk = ApprovalDesk()
    svc = WorkflowService(
        MemoryWorkflowRepo(),
        LocalWorkflowLock(),
        make_registry(desk),
        schedule=DEMO_SCHEDULE,
        retry=DEMO_RETRY,
    )
    result = await run_demo(svc, desk, 200, concurrency=64, time_limit=60.0)
    completed, failed = result.counts.get("completed", 0), result.counts.get("failed", 0)
    assert (completed - result.refunded, result.refunded, failed) == tuple(map(int, sample.groups()))
    assert completed + failed == 200
