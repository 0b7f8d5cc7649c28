"""The memory repo's row changes build every field positionally: they must match ``dataclasses.replace``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

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
