"""A driver's claim hands the rows of instances nobody has run yet to their passes (``Handoffs`` of the
in-process lock), on each backend: those passes read nothing, and a row is never used once another
holder of the instance's key could have run it after the claim read it (a node would run twice)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from asyncflow.driver import WorkflowDriver
from asyncflow.engine.service import WorkflowService, lock_key
from asyncflow.errors import ParamInvalidError
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import InstanceFields, InstanceWhere, NewWorkflowInstance, TaskInsert
from asyncflow.worker import current_node
from tests.integration.test_driver import LINEAR, Runs, count, create_many, is_sqlite, registry_for


class LeasedReads:
    """Counts the passes' reads of their instance (``load_instance_state(lease=True)``) on a real repo."""

    def __init__(self, repo: Any) -> None:
        self.ids: list[int] = []
        read = repo.load_instance_state

        async def counted(instance_id: int, *, lease: bool = False) -> Any:
            if lease:
                self.ids.append(instance_id)
            return await read(instance_id, lease=lease)

        repo.load_instance_state = counted


def service_for(repo: Any, runs: Runs, lock: Any = None) -> WorkflowService:
    return WorkflowService(repo, lock or LocalWorkflowLock(), registry_for("lin", LINEAR, runs))


async def claim_and_offer(service: WorkflowService, between: Callable[[], Any] | None = None) -> list[int]:
    """What the driver's claim does: claim every due instance and offer the new ones' rows; ``between``
    runs after the claim came back and before the rows are offered."""
    handoffs = service._handoffs()
    assert handoffs is not None
    mark = handoffs.begin()
    claimed = await service.repo.claim_due_states(now_ms=service._now_ms(), limit=100, lease_ms=60_000)
    if between is not None:
        await between()
    handoffs.end(mark, {lock_key(i): row for i, row in claimed if row is not None}, service.repo)
    return [i for i, _ in claimed]


async def test_a_driver_runs_new_instances_without_reading_them(engine_repo: Any) -> None:
    runs = Runs()
    service = service_for(engine_repo, runs)
    ids = await create_many(service, "lin", 40)
    driver = WorkflowDriver(service, concurrency=1 if is_sqlite(engine_repo) else 8, poll_interval=0.05)
    await driver.run_until_idle()
    assert await count(service, "completed") == 40
    assert runs.count == {(i, node): 1 for i in ids for node in LINEAR}
    # every pass started from its claim's row, at the epoch the claim took (a read would take 2)
    assert [(await engine_repo.get_workflow_instance(i)).lease_epoch for i in ids] == [1] * 40
    handoffs = service._handoffs()
    assert handoffs is not None and len(handoffs) == 0


async def test_instances_someone_ran_are_read_by_their_pass(engine_repo: Any) -> None:
    """Only an instance as it was created is handed over: one with a node row, one a pass leased and
    one an update touched are read by their passes, which run each node once."""
    runs = Runs()
    service = service_for(engine_repo, runs)
    repo = engine_repo
    new, with_row, leased, updated = await create_many(service, "lin", 4)
    await repo.create_task_instance(with_row, TaskInsert(task_type="A", status="completed", node_context={}))
    await repo.load_instance_state(leased, lease=True)
    await repo.update_workflow_instances(
        InstanceWhere(ids=(updated,)), InstanceFields(workflow_context={"k": 1})
    )
    claimed = await repo.claim_due_states(now_ms=service._now_ms(), limit=10, lease_ms=60_000)
    assert [i for i, _ in claimed] == sorted([new, with_row, leased, updated])
    rows = dict(claimed)
    assert [rows[i] is None for i in (new, with_row, leased, updated)] == [False, True, True, True]
    assert rows[new] == await repo.get_workflow_instance(new)  # as claimed: its lease and epoch included
    assert rows[new].lease_epoch == 1 and rows[new].version == 1  # the epoch of the pass it goes to
    assert [(await repo.get_workflow_instance(i)).lease_epoch for i in (with_row, leased)] == [0, 1]


async def test_a_holder_after_the_claim_withdraws_the_row(engine_repo: Any) -> None:
    """``run_workflow`` between the claim and the driver's pass runs the instance to its end: the pass
    must read it (completed), not run its nodes again from the claim's row."""
    runs = Runs()
    service = service_for(engine_repo, runs)
    [instance_id] = await create_many(service, "lin", 1)
    assert await claim_and_offer(service) == [instance_id]
    handoffs = service._handoffs()
    assert handoffs is not None and len(handoffs) == 1
    await service.run_workflow(instance_id)  # holds the key, then gives it back: the row is withdrawn
    assert len(handoffs) == 0
    reads = LeasedReads(engine_repo)
    done = await service._driver_pass(instance_id, 0.05)
    assert done.status == "completed"
    assert reads.ids == [instance_id]
    assert runs.count == {(instance_id, node): 1 for node in LINEAR}


async def test_a_holder_while_the_claim_was_out_keeps_the_row_from_being_offered(engine_repo: Any) -> None:
    """The claim read the row, then ``run_workflow`` held the key and gave it back before the claim's
    rows came back: the row is stale and is not offered."""
    runs = Runs()
    service = service_for(engine_repo, runs)
    [instance_id] = await create_many(service, "lin", 1)

    async def run_it() -> None:
        await service.run_workflow(instance_id)

    await claim_and_offer(service, between=run_it)
    handoffs = service._handoffs()
    assert handoffs is not None and len(handoffs) == 0
    done = await service._driver_pass(instance_id, 0.05)
    assert done.status == "completed"
    assert runs.count == {(instance_id, node): 1 for node in LINEAR}


async def test_a_key_held_when_the_claim_comes_back_is_not_offered(engine_repo: Any) -> None:
    """A pass that holds the key when the claim's rows come back (a first pass of ``run=True`` still on
    its first node, say) may write after the claim's read: its row is not offered, and the driver's
    pass, once the key is free, reads the instance."""
    runs = Runs()
    lock = LocalWorkflowLock()
    service = service_for(engine_repo, runs, lock)
    [instance_id] = await create_many(service, "lin", 1)
    async with lock.hold(lock_key(instance_id), 5.0):
        await claim_and_offer(service)
        handoffs = service._handoffs()
        assert handoffs is not None and len(handoffs) == 0
    reads = LeasedReads(engine_repo)
    assert (await service._driver_pass(instance_id, 0.05)).status == "completed"
    assert reads.ids == [instance_id]
    assert runs.count == {(instance_id, node): 1 for node in LINEAR}


async def test_released_claims_withdraw_their_rows() -> None:
    """Instances a stopping driver gives back (held ahead, never started) leave nothing offered."""
    from asyncflow.store.memory import MemoryWorkflowRepo

    runs = Runs()
    gate = asyncio.Event()

    async def blocked(ctx: Any) -> None:
        await gate.wait()

    service = WorkflowService(
        MemoryWorkflowRepo(), LocalWorkflowLock(), registry_for("lin", LINEAR, runs, run=blocked)
    )
    await create_many(service, "lin", 6)
    driver = WorkflowDriver(service, concurrency=2, poll_interval=0.05, batch_size=6)
    handoffs = service._handoffs()
    assert handoffs is not None
    async with driver:
        for _ in range(200):
            if driver.in_flight == 2:
                break
            await asyncio.sleep(0.01)
        await driver.stop(grace=0)
    gate.set()
    assert len(handoffs) == 0


async def test_another_lock_gets_no_handoffs(engine_repo: Any) -> None:
    """A lock other processes share (or any but the in-process one) hands nothing over: its passes read."""

    class Subclassed(LocalWorkflowLock):
        async def _acquire(self, key: str, ttl: float) -> Any:
            return await super()._acquire(key, ttl)

    runs = Runs()
    service = service_for(engine_repo, runs, Subclassed())
    assert service._handoffs() is None
    ids = await create_many(service, "lin", 3)
    reads = LeasedReads(engine_repo)
    await WorkflowDriver(service, concurrency=1, poll_interval=0.05).run_until_idle()
    assert sorted(reads.ids) == ids
    assert runs.count == {(i, node): 1 for i in ids for node in LINEAR}


async def test_an_instance_its_creator_runs_is_created_at_epoch_1_and_never_handed_over(
    engine_repo: Any,
) -> None:
    """``create_workflow(run=True)`` runs the first pass at epoch 1 (created so): a claim never hands such
    an instance over nor moves its epoch, which would fence that pass if its first node outlived the
    lock's TTL (the instance is due for drivers again then)."""
    runs = Runs()
    service = service_for(engine_repo, runs)
    done = await service.create_workflow("lin", "run", run=True)
    assert (await engine_repo.get_workflow_instance(done.id)).lease_epoch == 1
    record = await engine_repo.create_workflow_instance(
        NewWorkflowInstance(workflow_type="lin", business_id="b", workflow_context={}, lease_epoch=1)
    )
    assert record.lease_epoch == 1
    assert await engine_repo.claim_due_states(now_ms=service._now_ms(), limit=9, lease_ms=1000) == [
        (record.id, None)
    ]
    assert (await engine_repo.get_workflow_instance(record.id)).lease_epoch == 1
    for bad in (2, -1, True, 1.0, "1"):
        with pytest.raises(ParamInvalidError, match="lease_epoch"):
            await engine_repo.create_workflow_instance(
                NewWorkflowInstance(
                    workflow_type="lin", business_id="x", workflow_context={}, lease_epoch=bad
                )
            )


async def test_a_cancel_between_the_claim_and_the_pass_runs_no_node(engine_repo: Any) -> None:
    """A cancel holds no lock key: it withdraws the rows of what it canceled itself, so the pass reads
    the instance (canceled) and runs nothing."""
    runs = Runs()
    service = service_for(engine_repo, runs)
    [instance_id] = await create_many(service, "lin", 1)
    await claim_and_offer(service)
    await service.cancel_workflow_instance(instance_id)
    handoffs = service._handoffs()
    assert handoffs is not None and len(handoffs) == 0
    assert (await service._driver_pass(instance_id, 0.05)).status == "canceled"
    assert runs.count == {}


async def test_services_on_two_databases_sharing_a_lock_run_each_their_own_rows(tmp_path: Any) -> None:
    """Instance ids (so lock keys) of two databases overlap: a row goes only to a pass on its own repo."""
    from asyncflow.store.memory import MemoryWorkflowRepo

    lock = LocalWorkflowLock()
    seen: dict[str, str] = {}

    async def note(ctx: Any) -> None:
        seen[current_node().task_type] = ctx.get("workflow_context", "tenant")[0]

    services = []
    for tenant in ("a", "b"):
        repo = MemoryWorkflowRepo()
        service = WorkflowService(repo, lock, registry_for("lin", LINEAR, Runs(), run=note))
        await repo.create_workflow_instance(
            NewWorkflowInstance(workflow_type="lin", business_id=tenant, workflow_context={"tenant": tenant})
        )
        services.append(service)
    for service in services:
        await claim_and_offer(service)  # both offer a row under key 1: the second replaces the first
    for service, tenant in zip(services, "ab", strict=True):
        seen.clear()
        assert (await service._driver_pass(1, 0.05)).status == "completed"
        assert set(seen.values()) == {tenant}


async def test_a_repo_that_changes_how_it_claims_or_reads_is_called_as_before(engine_repo: Any) -> None:
    """A subclass's claim_due_instances, or a patched load_instance_state, is what the driver calls:
    nothing is handed over past it."""
    runs = Runs()
    service = service_for(engine_repo, runs)
    assert service._claims_rows() is not None
    claims: list[int] = []
    real = engine_repo.claim_due_instances

    async def counted(**kwargs: Any) -> list[int]:
        ids = await real(**kwargs)
        claims.extend(ids)
        return ids

    engine_repo.claim_due_instances = counted
    assert service._claims_rows() is None
    ids = await create_many(service, "lin", 3)
    await WorkflowDriver(service, concurrency=1, poll_interval=0.05).run_until_idle()
    assert sorted(claims) == ids
    del engine_repo.claim_due_instances
    assert service._claims_rows() is not None

    class Tenant(type(engine_repo)):  # type: ignore[misc]
        async def load_instance_state(self, instance_id: int, *, lease: bool = False) -> Any:
            return await super().load_instance_state(instance_id, lease=lease)

    engine_repo.__class__ = Tenant
    assert service._claims_rows() is None


async def test_a_cancel_withdraws_the_row_when_it_writes_not_after_its_commit(engine_repo: Any) -> None:
    """The cancel's follow-up reads (children canceled late) come after its commit: the row is gone
    from the moment the cancel updates the instance, and stays gone if the cancel's caller gives up."""
    runs = Runs()
    service = service_for(engine_repo, runs)
    [instance_id] = await create_many(service, "lin", 1)
    await claim_and_offer(service)
    handoffs = service._handoffs()
    assert handoffs is not None and len(handoffs) == 1
    entered, never = asyncio.Event(), asyncio.Event()
    real = engine_repo.query_child_instances

    async def stalls(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await never.wait()
        return await real(*args, **kwargs)

    engine_repo.query_child_instances = stalls  # (not what a driver's claim depends on)
    cancel = asyncio.create_task(service.cancel_workflow_instance(instance_id))
    await entered.wait()  # in the cancel's tree, after its update of the instance
    assert len(handoffs) == 0
    cancel.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancel
    del engine_repo.query_child_instances
    assert len(handoffs) == 0


async def test_a_patch_on_the_repos_class_is_called_as_before(engine_repo: Any) -> None:
    from unittest import mock

    service = service_for(engine_repo, Runs())
    assert service._claims_rows() is not None
    real = type(engine_repo).claim_due_instances

    async def counted(self: Any, **kwargs: Any) -> list[int]:
        return list(await real(self, **kwargs))

    with mock.patch.object(type(engine_repo), "claim_due_instances", counted):
        assert service._claims_rows() is None
    assert service._claims_rows() is not None
