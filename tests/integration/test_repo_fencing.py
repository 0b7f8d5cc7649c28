"""The pass fence in the repo contract, on every implementation: a pass's first read takes a new lease
epoch, and a step that names an older one writes nothing (``StepResult.stale``)."""

from __future__ import annotations

import asyncio

from asyncflow.records import (
    InstanceFields,
    InstanceWhere,
    Step,
    TaskFields,
    TaskUpdate,
    TaskWhere,
)
from asyncflow.store.protocol import WorkflowRepo

from . import test_repo_contract as contract

# the contract's fixtures: every backend, inside and outside transaction()
backend = contract.backend
clock = contract.clock
engine_if_postgres = contract.engine_if_postgres
pg_engine_without_lanes = contract.pg_engine_without_lanes
repo = contract.repo
new = contract.new
task = contract.task


async def _leased(repo: WorkflowRepo, instance_id: int) -> int:
    state = await repo.load_instance_state(instance_id, lease=True)
    assert state is not None
    return state[0].lease_epoch


async def test_a_leased_read_takes_a_new_epoch_and_a_plain_read_does_not(repo: WorkflowRepo) -> None:
    created = await repo.create_workflow_instance(new())
    assert created.lease_epoch == 0
    await repo.create_task_instance(created.id, task("a"))
    assert [await _leased(repo, created.id) for _ in range(3)] == [1, 2, 3]
    plain = await repo.load_instance_state(created.id)
    assert plain is not None and plain[0].lease_epoch == 3 and [r.task_type for r in plain[1]] == ["a"]
    fetched = await repo.get_workflow_instance(created.id)
    assert fetched is not None and fetched.lease_epoch == 3
    assert await repo.load_instance_state(10**9, lease=True) is None


async def test_concurrent_leased_reads_of_one_instance_get_distinct_epochs(repo: WorkflowRepo) -> None:
    created = await repo.create_workflow_instance(new())
    epochs = await asyncio.gather(*(_leased(repo, created.id) for _ in range(6)))
    assert sorted(epochs) == [1, 2, 3, 4, 5, 6]


async def test_a_step_of_an_older_epoch_writes_nothing_and_says_stale(repo: WorkflowRepo) -> None:
    created = await repo.create_workflow_instance(new())
    row = await repo.create_task_instance(created.id, task("a"))
    old = await _leased(repo, created.id)
    newer = await _leased(repo, created.id)
    before = await repo.load_instance_state(created.id)

    def step(epoch: int, next_run_at: int | None = None) -> Step:
        update = TaskUpdate(id=row.id, expected_version=row.version, status="completed", node_context={})
        return Step(
            instance_id=created.id,
            instance_status="running",
            next_run_at=next_run_at,
            updates=(update,),
            lease_epoch=epoch,
        )

    stale = await repo.apply_step(step(old, next_run_at=5))
    assert (stale.applied, stale.stale, stale.inserted) == (False, True, ())
    stale_insert = await repo.apply_step(Step(instance_id=created.id, inserts=(task("b"),), lease_epoch=old))
    assert (stale_insert.applied, stale_insert.stale) == (False, True)
    assert await repo.load_instance_state(created.id) == before  # nothing written
    applied = await repo.apply_step(step(newer))
    assert (applied.applied, applied.stale) == (True, False)
    state = await repo.load_instance_state(created.id)
    assert state is not None and state[0].status == "running" and state[1][0].status == "completed"
    unfenced = await repo.apply_step(Step(instance_id=created.id, next_run_at=7))  # no epoch: no check
    assert unfenced.applied


async def test_a_failed_status_condition_is_a_conflict_not_a_stale_pass(repo: WorkflowRepo) -> None:
    created = await repo.create_workflow_instance(new())
    old = await _leased(repo, created.id)
    await repo.update_workflow_instances(InstanceWhere(ids=(created.id,)), InstanceFields(status="canceled"))
    result = await repo.apply_step(Step(instance_id=created.id, next_run_at=1, lease_epoch=old))
    assert (result.applied, result.stale) == (False, False)


async def test_updates_outside_passes_fence_the_passes_in_flight(repo: WorkflowRepo) -> None:
    created = await repo.create_workflow_instance(new())
    row = await repo.create_task_instance(created.id, task("a"))
    epoch = await _leased(repo, created.id)
    # node updates (restarts reset nodes) leave the epoch; the instance update that goes with them moves it
    await repo.update_task_instances(TaskWhere(ids=(row.id,)), TaskFields(fail_count=0))
    assert (await repo.apply_step(Step(instance_id=created.id, next_run_at=1, lease_epoch=epoch))).applied
    await repo.update_workflow_instances(InstanceWhere(ids=(created.id,)), InstanceFields(next_run_at=2))
    fetched = await repo.get_workflow_instance(created.id)
    assert fetched is not None and fetched.lease_epoch == epoch + 1
    result = await repo.apply_step(Step(instance_id=created.id, next_run_at=3, lease_epoch=epoch))
    assert (result.applied, result.stale) == (False, True)
