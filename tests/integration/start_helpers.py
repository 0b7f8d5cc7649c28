"""Helpers of the 0.2 starting tests: a one-node workflow that records its runs, and a service on it."""

from __future__ import annotations

import time
from typing import Any

from asyncflow.clock import FakeClock
from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.registry import Registry
from asyncflow.worker import NormalTaskWorker, current_node


def one_node_registry(*workflow_types: str, ran: list[int] | None = None) -> Registry:
    """Workflows of one node ``A`` each; every run appends its instance id to ``ran``."""
    registry = Registry()
    for workflow_type in workflow_types:
        node = NodeConfig(id="A", name="A", next_nodes=())
        registry.load_workflow_config(WorkflowConfig(id=workflow_type, name=workflow_type, nodes=(node,)))

        async def run(ctx: JSONContext) -> None:
            if ran is not None:
                ran.append(current_node().instance_id)

        registry.register_workflow_task(workflow_type, "A", NormalTaskWorker(run=run))
    return registry


def fake_service(repo: Any, registry: Registry) -> tuple[WorkflowService, FakeClock]:
    """A service on ``repo`` whose clock starts at the real time and moves only when told."""
    clock = FakeClock(start=time.time())
    return WorkflowService(repo, LocalWorkflowLock(), registry, clock=clock), clock
