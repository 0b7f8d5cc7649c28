"""The lock helpers that need no service: the coarse operation deadline, the Redis lock's arguments."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from asyncflow.errors import LockFailedError, ParamInvalidError
from asyncflow.lock._deadline import Deadlines
from asyncflow.lock._renewal import RenewableLease, Renewer, validity
from asyncflow.lock.redis import RedisWorkflowLock


async def test_deadline_cuts_a_slow_operation_with_timeout_error() -> None:
    deadlines = Deadlines(0.05)
    with pytest.raises(TimeoutError, match=r"0\.05"), deadlines():
        await asyncio.Event().wait()
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0  # the cancellation was taken back
    await asyncio.sleep(0)  # and no stray cancellation is pending
    deadlines.close()


async def test_deadline_lets_a_quick_operation_finish() -> None:
    deadlines = Deadlines(5.0)
    finished = False
    with deadlines():
        await asyncio.sleep(0)
        finished = True
    deadlines.close()
    assert finished


async def test_outer_cancellation_is_not_turned_into_timeout() -> None:
    deadlines = Deadlines(5.0)
    started = asyncio.Event()

    async def operation() -> None:
        with deadlines():
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(operation())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadlines.close()


async def test_deadline_and_outer_cancellation_together_propagate_cancellation() -> None:
    deadlines = Deadlines(5.0)
    started = asyncio.Event()

    async def operation() -> None:
        with deadlines():
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(operation())
    await started.wait()
    task.cancel()  # the caller cancels ...
    (bound,) = deadlines._active
    bound._deadline = 0.0
    deadlines._check()  # ... and the deadline fires in the same loop iteration: cancellation wins
    with pytest.raises(asyncio.CancelledError):
        await task
    deadlines.close()


def test_deadline_outside_a_task_is_refused() -> None:
    with pytest.raises(RuntimeError), Deadlines(1.0)():
        pass


def test_redis_lock_validates_its_arguments() -> None:
    with pytest.raises(ParamInvalidError, match="op_timeout"):
        RedisWorkflowLock("redis://127.0.0.1:1/0", op_timeout=0)
    with pytest.raises(ParamInvalidError, match="prefix"):
        RedisWorkflowLock("redis://127.0.0.1:1/0", prefix=None)  # type: ignore[arg-type]


def test_missing_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)  # makes ``import redis.asyncio`` fail
    with pytest.raises(ImportError, match=r"asyncflow\[redis\]"):
        RedisWorkflowLock("redis://127.0.0.1:6379/0")


def test_renewer_keeps_working_on_a_new_event_loop() -> None:
    renewed: list[str] = []

    async def renew(batch: list[RenewableLease]) -> None:
        for lease in batch:
            renewed.append(lease.key)
            renewer.renewed(lease, time.monotonic())

    renewer: Renewer[RenewableLease] = Renewer(renew, name="asyncflow-test-renewer")

    async def hold_briefly(key: str, seconds: float) -> None:
        lease = RenewableLease(key, 0.15, renewer, time.monotonic())
        renewer.track(lease)
        await asyncio.sleep(seconds)
        renewer.untrack(lease)

    asyncio.run(hold_briefly("first", 0.0))  # leaves a pending timer behind on a closed loop
    asyncio.run(hold_briefly("second", 0.4))
    assert "second" in renewed
    assert "first" not in renewed


async def test_suspended_renewable_lease_is_marked_lost_when_its_validity_ends() -> None:
    async def renew(batch: list[RenewableLease]) -> None:
        for lease in batch:
            renewer.renewed(lease, time.monotonic())

    renewer: Renewer[RenewableLease] = Renewer(renew, name="asyncflow-test-renewer")
    lease = RenewableLease("k", 0.1, renewer, time.monotonic())
    renewer.track(lease)
    assert validity(lease.ttl) == pytest.approx(0.097)  # 1 % + 2 ms of drift margin
    assert validity(30.0) == pytest.approx(29.698)
    lease._suspend_renewal()
    assert lease not in renewer
    async with asyncio.timeout(5.0):
        await lease.lost_event.wait()
    assert lease.lost
    assert await renewer.aclose() == []


async def test_a_lease_past_its_validity_is_lost_not_renewed() -> None:
    seen: list[str] = []

    async def renew(batch: list[RenewableLease]) -> None:
        seen.extend(lease.key for lease in batch)

    renewer: Renewer[RenewableLease] = Renewer(renew, name="asyncflow-test-renewer")
    late = RenewableLease("late", 0.3, renewer, time.monotonic() - 1.0)  # as after a blocked loop
    renewer.track(late)
    async with asyncio.timeout(5.0):
        while late in renewer:  # the round drops it
            await asyncio.sleep(0.01)
    with pytest.raises(LockFailedError, match="before it could be renewed"):
        late.raise_if_lost()
    assert late.lost_event.is_set()
    assert seen == []
    await renewer.aclose()


@pytest.mark.parametrize("bad", [10**400, float("nan"), float("inf"), 0, -1, True, "1"])
def test_every_lock_s_op_timeout_is_checked(bad: object) -> None:
    """An int beyond a float's range raised a raw ``OverflowError`` (``math.isfinite``)."""
    from asyncflow.lock.database import DatabaseWorkflowLock
    from asyncflow.lock.postgres import PostgresAdvisoryLock
    from asyncflow.store.memory import MemoryWorkflowRepo

    with pytest.raises(ParamInvalidError, match="op_timeout"):
        RedisWorkflowLock("redis://127.0.0.1:1/0", op_timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError, match="op_timeout"):
        PostgresAdvisoryLock("postgresql+asyncpg://u@127.0.0.1:1/db", op_timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError, match="op_timeout"):
        DatabaseWorkflowLock(MemoryWorkflowRepo(), op_timeout=bad)  # type: ignore[arg-type]
