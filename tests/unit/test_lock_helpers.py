"""The lock helpers that need no service: the coarse operation deadline, the Redis lock's arguments."""

from __future__ import annotations

import asyncio
import sys

import pytest

from asyncflow.errors import ParamInvalidError
from asyncflow.lock._deadline import Deadlines
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
    with deadlines():
        await asyncio.sleep(0)
    deadlines.close()


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
