"""The memory repo's row changes build every field positionally: they must match ``dataclasses.replace``;
its index of runnable instances follows every write."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from asyncflow.records import InstanceFields, InstanceWhere, NewWorkflowInstance, Step
from asyncflow.status import RUNNABLE_INSTANCE_STATUSES as RUNNABLE
from asyncflow.store._memory_rows import (
    Instance,
    Task,
    changed_instance,
    changed_task,
    leased_instance,
    new_instance_row,
    new_task_row,
)
from asyncflow.store._prepare import InstanceChange, TaskChange
from asyncflow.store.memory import MemoryWorkflowRepo


def _distinct(cls: type) -> dict[str, object]:
    """A value of the right type for each field, no two alike (a field filled from another shows)."""
    values: dict[str, object] = {}
    for number, f in enumerate(dataclasses.fields(cls), start=1):
        values[f.name] = f"{f.name}-{number}" if "str" in str(f.type) else 1000 + number
    return values


INSTANCE = Instance(**_distinct(Instance))  # type: ignore[arg-type]
TASK = Task(**_distinct(Task))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [InstanceChange(None, None, None), InstanceChange("completed", '{"a": 1}', 77)],
    ids=["nothing", "everything"],
)
def test_changed_instance_is_replace_with_the_change(change: InstanceChange) -> None:
    expected = dataclasses.replace(
        INSTANCE,
        status=change.status or INSTANCE.status,
        workflow_context=change.context or INSTANCE.workflow_context,
        next_run_at=INSTANCE.next_run_at if change.next_run_at is None else change.next_run_at,
        updated_at=5,
        version=INSTANCE.version + 1,
    )
    assert changed_instance(INSTANCE, change, 5) == expected


@pytest.mark.parametrize(
    "change",
    [TaskChange(None, None, None, None), TaskChange("failed", '{"b": 2}', 3, 44)],
    ids=["nothing", "everything"],
)
def test_changed_task_is_replace_with_the_change(change: TaskChange) -> None:
    expected = dataclasses.replace(
        TASK,
        status=change.status or TASK.status,
        node_context=change.context or TASK.node_context,
        fail_count=TASK.fail_count if change.fail_count is None else change.fail_count,
        started_at=TASK.started_at if change.started_at is None else change.started_at,
        updated_at=5,
        version=TASK.version + 1,
    )
    assert changed_task(TASK, change, 5) == expected


def test_leased_instance_takes_a_new_epoch_or_a_due_time_and_nothing_else() -> None:
    assert leased_instance(INSTANCE) == dataclasses.replace(INSTANCE, lease_epoch=INSTANCE.lease_epoch + 1)
    assert leased_instance(INSTANCE, 99) == dataclasses.replace(INSTANCE, next_run_at=99)


@pytest.mark.parametrize(
    ("factory", "row"), [(new_instance_row, INSTANCE), (new_task_row, TASK)], ids=["Instance", "Task"]
)
def test_the_positional_factories_build_what_the_constructors_build(
    factory: Callable[..., Any], row: Any
) -> None:
    fields = dataclasses.fields(row)
    built = factory(*[getattr(row, f.name) for f in fields])
    assert type(built) is type(row) and built == row
    assert all(getattr(built, f.name) is getattr(row, f.name) for f in fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.id = 0


async def test_the_runnable_ids_follow_every_status_write() -> None:
    """``State.runnable`` (what the claim and ``next_due_at`` read) holds exactly the ids of the
    instances in a runnable status after every kind of write, a rolled-back transaction included."""
    repo = MemoryWorkflowRepo()

    def check() -> None:
        state = repo._state
        assert state.runnable == {i.id for i in state.instances.values() if i.status in RUNNABLE}

    def new(business_id: str, status: str = "init") -> NewWorkflowInstance:
        return NewWorkflowInstance(
            workflow_type="w", business_id=business_id, workflow_context={}, status=status
        )

    a = await repo.create_workflow_instance(new("a"))
    b = await repo.create_workflow_instance(new("b", "completed"))
    ids = await repo.create_workflow_instances([new("c"), new("d", "failed")])
    child, _ = await repo.create_child_instance(new("e"), parent_id=a.id, parent_node="n", child_key="k")
    await repo.fire_schedule_tick("s", "t1", new("f"), now_ms=0, prune_before="t0")
    check()
    assert (await repo.apply_step(Step(instance_id=a.id, instance_status="running"))).applied
    assert (await repo.apply_step(Step(instance_id=ids[0], instance_status="completed"))).applied
    assert (await repo.apply_step(Step(instance_id=child.id, next_run_at=5))).applied
    check()
    await repo.update_workflow_instances(InstanceWhere(ids=(b.id, ids[1])), InstanceFields(status="running"))
    await repo.update_workflow_instances(InstanceWhere(ids=(a.id,)), InstanceFields(status="canceled"))
    check()
    with pytest.raises(RuntimeError):
        async with repo.transaction():
            await repo.update_workflow_instances(InstanceWhere(ids=(b.id,)), InstanceFields(status="failed"))
            await repo.create_workflow_instance(new("g"))
            check()
            raise RuntimeError
    check()
    assert b.id in repo._state.runnable
    await repo.purge_workflow_instances(updated_before=2**62, statuses=["canceled", "completed", "running"])
    check()
    claimed = await repo.claim_due_instances(now_ms=10, limit=10, lease_ms=1)
    assert sorted(claimed) == sorted(repo._state.runnable) and len(claimed) == 2
    check()


async def test_a_call_waits_while_a_transaction_of_another_task_holds_the_state() -> None:
    """The pass's calls take the state at once only when no transaction holds it (``_ready``)."""
    repo = MemoryWorkflowRepo()
    first = await repo.create_workflow_instance(
        NewWorkflowInstance(workflow_type="w", business_id="a", workflow_context={})
    )
    go = asyncio.Event()

    async def outside() -> tuple[int, bool]:
        await go.wait()
        made = await repo.create_workflow_instance(
            NewWorkflowInstance(workflow_type="w", business_id="out", workflow_context={})
        )
        step = await repo.apply_step(Step(instance_id=first.id, instance_status="running"))
        return made.id, step.applied

    task = asyncio.create_task(outside())
    with pytest.raises(RuntimeError):
        async with repo.transaction():
            await repo.update_workflow_instances(
                InstanceWhere(ids=(first.id,)), InstanceFields(status="failed")
            )
            await repo.create_workflow_instance(
                NewWorkflowInstance(workflow_type="w", business_id="in", workflow_context={})
            )
            go.set()
            for _ in range(5):
                await asyncio.sleep(0)
            assert not task.done()
            raise RuntimeError  # rolled back: the waiting calls see the state from before
    assert await task == (2, True)
    loaded = await repo.load_instance_state(first.id)
    assert loaded is not None and loaded[0].status == "running"
