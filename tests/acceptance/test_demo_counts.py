"""The demo's summary adds up to the orders it ran, even when instances finish while it counts them
(its counts are one query per status; seen as ``running 8`` + ``completed 10`` of 10 under load)."""

from __future__ import annotations

from typing import Any

from asyncflow.demo.order import ApprovalDesk, make_registry
from asyncflow.demo.runner import run_demo
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import QueryWorkflowInstanceParams
from asyncflow.store.memory import MemoryWorkflowRepo

N = 6


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
