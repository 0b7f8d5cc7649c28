"""purge_workflow_instances on every backend: terminal instances only, older than the cut-off, with
their node rows, by status, type and limit, in batches."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest

from asyncflow.clock import FakeClock
from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import ParamInvalidError, TaskFailedTerminate, TaskNotReady
from asyncflow.records import QueryWorkflowInstanceParams
from asyncflow.registry import Registry
from asyncflow.worker import NormalTaskWorker


async def _ok(ctx: JSONContext) -> None:
    return None


async def _fail(ctx: JSONContext) -> None:
    raise TaskFailedTerminate("no")


async def _wait(ctx: JSONContext) -> None:
    raise TaskNotReady("later")


def registry() -> Registry:
    reg = Registry()
    for wf, worker in (("a", NormalTaskWorker(run=_ok)), ("b", NormalTaskWorker(run=_ok))):
        reg.load_workflow_config(WorkflowConfig(id=wf, nodes=(NodeConfig("A"),)))
        reg.register_workflow_task(wf, "A", worker)
    reg.load_workflow_config(WorkflowConfig(id="bad", nodes=(NodeConfig("A"),)))
    reg.register_workflow_task("bad", "A", NormalTaskWorker(run=_fail))
    reg.load_workflow_config(WorkflowConfig(id="slow", nodes=(NodeConfig("A"),)))
    reg.register_workflow_task("slow", "A", NormalTaskWorker(run=_ok, wait_check=_wait))
    return reg


async def test_purge_deletes_old_terminal_instances_with_their_nodes(
    engine_repo: Any, local_lock: Any
) -> None:
    svc = WorkflowService(engine_repo, local_lock, registry())
    done_a = [(await svc.create_workflow("a", f"a{i}", run=True)).id for i in range(3)]
    done_b = (await svc.create_workflow("b", "b0", run=True)).id
    failed = (await svc.create_workflow("bad", "x", run=True)).id
    canceled = (await svc.create_workflow("a", "c")).id
    await svc.cancel_workflow_instance(canceled)
    running = (await svc.create_workflow("slow", "s", run=True)).id
    statuses = {
        i: (await svc.get_workflow_instance(i)).status for i in (*done_a, done_b, failed, canceled, running)
    }
    assert statuses[failed] == "failed" and statuses[running] == "running" and statuses[done_b] == "completed"

    assert await svc.purge_workflow_instances(older_than=600) == 0  # all updated just now
    svc.clock = FakeClock(time.time() + 3600)  # an hour later
    assert await svc.purge_workflow_instances(older_than=7200) == 0
    assert await svc.purge_workflow_instances(older_than=1800, statuses=("canceled",)) == 1
    assert (
        await svc.purge_workflow_instances(older_than=timedelta(minutes=30), workflow_types=["a"], limit=2)
        == 2
    )
    assert await engine_repo.get_workflow_instance(done_a[0]) is None  # oldest ids first
    assert await engine_repo.get_workflow_instance(done_a[2]) is not None
    assert await svc.purge_workflow_instances(older_than=1800) == 3
    left = await engine_repo.query_workflow_instances(QueryWorkflowInstanceParams())
    assert [r.id for r in left] == [running]
    for gone in (*done_a, done_b, failed, canceled):
        assert await engine_repo.load_task_instances(gone) == []
    assert len(await engine_repo.load_task_instances(running)) >= 1


async def test_repo_purges_in_batches(engine_repo: Any, local_lock: Any) -> None:
    svc = WorkflowService(engine_repo, local_lock, registry())
    for i in range(7):
        await svc.create_workflow("a", f"a{i}", run=True)
    later = int(time.time()) + 10
    assert (
        await engine_repo.purge_workflow_instances(
            updated_before=later, statuses=("completed",), batch_size=2
        )
        == 7
    )
    assert await engine_repo.count_workflow_instances(QueryWorkflowInstanceParams()) == 0


async def test_purge_limit_deletes_the_oldest_in_batches(engine_repo: Any, local_lock: Any) -> None:
    svc = WorkflowService(engine_repo, local_lock, registry())
    ids = [(await svc.create_workflow("a", f"l{i}", run=True)).id for i in range(7)]
    later = int(time.time()) + 10
    deleted = await engine_repo.purge_workflow_instances(
        updated_before=later, statuses=("completed",), limit=5, batch_size=2
    )
    assert deleted == 5
    left = await engine_repo.query_workflow_instances(QueryWorkflowInstanceParams())
    assert sorted(r.id for r in left) == ids[5:]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"older_than": 1, "statuses": ("running",)}, "cannot purge instances in status 'running'"),
        ({"older_than": 1, "statuses": "completed"}, "statuses must be a list"),
        ({"older_than": 1, "statuses": ()}, "at least one status"),
        ({"older_than": -1}, "must not be negative"),
        ({"older_than": "30d"}, "seconds or a timedelta"),
        ({"older_than": 1, "limit": 0}, "limit must be a positive int"),
        ({"older_than": 1, "workflow_types": [3]}, "non-empty strings"),
    ],
)
async def test_purge_refuses_bad_arguments(
    engine_repo: Any, local_lock: Any, kwargs: dict[str, Any], match: str
) -> None:
    svc = WorkflowService(engine_repo, local_lock, registry())
    done = (await svc.create_workflow("a", "a", run=True)).id
    svc.clock = FakeClock(time.time() + 3600)
    with pytest.raises(ParamInvalidError, match=match):
        await svc.purge_workflow_instances(**kwargs)
    assert await engine_repo.get_workflow_instance(done) is not None
