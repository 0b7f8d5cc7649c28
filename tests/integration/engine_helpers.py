"""Small helpers shared by the engine tests: workflow builders and call recorders."""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.records import QueryWorkflowInstanceParams, TaskInstanceRecord, WorkflowInstanceDetail
from asyncflow.registry import Registry
from asyncflow.worker import NormalTaskWorker, current_node


class Calls:
    """Counts worker calls per (phase, task type) and keeps their order."""

    def __init__(self) -> None:
        self.order: list[tuple[str, str]] = []
        self.count: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, phase: str, task_type: str) -> None:
        self.order.append((phase, task_type))
        self.count[(phase, task_type)] += 1

    def runs(self, task_type: str) -> int:
        return self.count[("run", task_type)]

    def checks(self, task_type: str) -> int:
        return self.count[("check", task_type)]


def config(workflow_type: str, edges: dict[str, Sequence[str]], **options: dict[str, Any]) -> WorkflowConfig:
    """A config from ``{node: next_nodes}`` in insertion order; ``options[node]`` adds NodeConfig fields."""
    return WorkflowConfig(
        id=workflow_type,
        name=workflow_type,
        nodes=tuple(
            NodeConfig(id=node, name=f"node {node}", next_nodes=tuple(nxt), **options.get(node, {}))
            for node, nxt in edges.items()
        ),
    )


def recording_worker(
    calls: Calls,
    run: Callable[[JSONContext], Any] | None = None,
    check: Callable[[JSONContext], Any] | None = None,
    *,
    with_check: bool = False,
) -> NormalTaskWorker:
    """A worker that records its calls, then delegates to ``run``/``check`` (sync helpers, may raise)."""

    async def _run(ctx: JSONContext) -> None:
        calls.add("run", current_node().task_type)
        if run is not None:
            result = run(ctx)
            if hasattr(result, "__await__"):
                await result

    async def _check(ctx: JSONContext) -> None:
        calls.add("check", current_node().task_type)
        if check is not None:
            result = check(ctx)
            if hasattr(result, "__await__"):
                await result

    return NormalTaskWorker(run=_run, wait_check=_check if (check is not None or with_check) else None)


def registry_with(
    cfg: WorkflowConfig, calls: Calls, workers: dict[str, NormalTaskWorker] | None = None
) -> Registry:
    """A fresh registry holding ``cfg``; nodes without a given worker get a recording no-op worker."""
    registry = Registry()
    registry.load_workflow_config(cfg)
    workers = workers or {}
    for node in cfg.nodes:
        registry.register_workflow_task(cfg.id, node.id, workers.get(node.id) or recording_worker(calls))
    return registry


async def rows_of(service: WorkflowService, instance_id: int) -> dict[str, TaskInstanceRecord]:
    return {row.task_type: row for row in await service.repo.load_task_instances(instance_id)}


async def detail_of(service: WorkflowService, instance_id: int) -> WorkflowInstanceDetail:
    (detail,) = await service.query_workflow_instance_detail(
        QueryWorkflowInstanceParams(workflow_instance_id=instance_id)
    )
    return detail


async def statuses(service: WorkflowService, instance_id: int) -> dict[str, str]:
    return {task_type: row.status for task_type, row in (await rows_of(service, instance_id)).items()}
