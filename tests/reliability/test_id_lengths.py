"""Business ids, workflow types, node ids and schedule ids are at most 1,024 bytes of UTF-8 on every backend.

PostgreSQL refuses a btree index entry of over about 2,700 bytes: a 10 MB business id failed there
alone (a raw StoreError from its ``business_id`` index) while SQLite and the memory repo stored it.
Every backend now refuses a longer id alike with ``ParamInvalidError`` (``ConfigError`` for configs and
schedules) naming the field and the limit, before anything is written; an id at the limit is stored
everywhere, in the unique indexes too (docs/reliability.md).
"""

from __future__ import annotations

from typing import Any

import pytest

from asyncflow.engine.service import WorkflowService
from asyncflow.errors import ConfigError, ParamInvalidError
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import QueryWorkflowInstanceParams
from asyncflow.registry import Registry
from asyncflow.schedules import Schedule
from asyncflow.worker import NormalTaskWorker, start_child_workflow

from .helpers import MIXED, Journal, service, snapshot

LIMIT = 1024

TOO_LONG = [
    "x" * (LIMIT + 1),
    "é" * (LIMIT // 2 + 1),  # 513 characters, 1,026 bytes
    "😀" * (LIMIT // 4 + 1),  # 257 characters, 1,028 bytes
    "b" * (10 * 1024 * 1024),
]
AT_THE_LIMIT = ["x" * LIMIT, "é" * (LIMIT // 2), "😀" * (LIMIT // 4), "a" + "é" * 511 + "b"]


@pytest.mark.parametrize("business_id", TOO_LONG, ids=lambda b: f"{len(b)}-chars")
async def test_a_business_id_over_the_limit_is_refused_alike_and_writes_nothing(
    repo: Any, business_id: str
) -> None:
    svc = service(repo, Journal())
    await svc.create_workflow(MIXED, "other")
    before = await snapshot(repo)
    for unique in (None, "always"):
        with pytest.raises(ParamInvalidError, match=r"business_id .*at most 1024 bytes"):
            await svc.create_workflow(MIXED, business_id, unique=unique)
    assert await snapshot(repo) == before


async def test_ids_at_the_limit_are_stored_everywhere_unique_indexes_included(repo: Any) -> None:
    long_type = "t" * LIMIT  # with a business id at the limit too: both in the unique indexes' entries
    registry = Registry()
    registry.load_workflow_config({"id": long_type, "nodes": [{"id": "n" * LIMIT}]})
    registry.register_workflow_task(long_type, "n" * LIMIT, NormalTaskWorker(run=lambda ctx: None))
    svc = WorkflowService(repo, LocalWorkflowLock(), registry)
    for business_id in AT_THE_LIMIT:
        inst = await svc.create_workflow(long_type, business_id, unique="always", run=True)
        assert inst.status == "completed"
        found = await svc.query_workflow_instances(QueryWorkflowInstanceParams(business_id=business_id))
        assert [r.business_id for r in found] == [business_id]


@pytest.mark.parametrize(
    "config",
    [
        {"id": "w" * (LIMIT + 1), "nodes": [{"id": "a"}]},
        {"id": "é" * (LIMIT // 2 + 1), "nodes": [{"id": "a"}]},
        {"id": "w", "nodes": [{"id": "a" * (LIMIT + 1)}]},
        {"id": "w", "nodes": [{"id": "a", "next_nodes": ["b" * (LIMIT + 1)]}, {"id": "b" * (LIMIT + 1)}]},
    ],
    ids=["workflow-id", "workflow-id-utf8", "node-id", "next-node"],
)
def test_a_config_with_an_id_over_the_limit_is_refused(config: dict[str, Any]) -> None:
    registry = Registry()
    with pytest.raises(ConfigError, match=r"at most 1024 bytes"):
        registry.load_workflow_config(config)
    assert registry.workflow_types() == []


def test_a_schedule_whose_business_ids_would_be_over_the_limit_is_refused() -> None:
    """A tick's instance has the business id ``<schedule id>@<tick>`` (21 bytes more than the id)."""
    fits = "s" * (LIMIT - len("@2030-01-01T09:00:00Z"))
    Schedule(id=fits, workflow_type="w", cron="0 9 * * *")
    with pytest.raises(ConfigError, match=r"at most 1024 bytes"):
        Schedule(id=fits + "s", workflow_type="w", cron="0 9 * * *")


async def test_a_child_whose_business_id_would_be_over_the_limit_is_refused_by_name(repo: Any) -> None:
    """A child's business id is ``<parent business id>/<node>/<key>``: the node's call says so, rather
    than the repo naming a business id the node never gave (and writes no child)."""
    errors: list[str] = []

    async def parent(ctx: Any) -> None:
        try:
            await start_child_workflow("child", "k" * 30)
        except ParamInvalidError as exc:
            errors.append(str(exc))

    registry = Registry()
    registry.load_workflow_config({"id": "parent", "nodes": [{"id": "a"}]})
    registry.load_workflow_config({"id": "child", "nodes": [{"id": "x"}]})
    registry.register_workflow_task("parent", "a", NormalTaskWorker(run=parent))
    registry.register_workflow_task("child", "x", NormalTaskWorker(run=lambda ctx: None))
    svc = WorkflowService(repo, LocalWorkflowLock(), registry)
    inst = await svc.create_workflow("parent", "p" * 1000, run=True)
    assert inst.status == "completed"
    assert len(errors) == 1 and "the child's business id (<parent business id>/a/<key>)" in errors[0]
    assert "at most 1024 bytes" in errors[0]
    assert await svc.count_workflow_instances() == 1
