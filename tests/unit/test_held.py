"""asyncflow._held: a write that lands whole under cancellation reports its result, and the
cancellation is raised at the caller's next await; the engine takes that path only for a marked
``apply_step``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import asyncflow as af
from asyncflow._held import HeldFuture, holds_cancellation, is_held, run_held, wait_cancelling


async def test_run_held_returns_the_result_and_defers_the_cancellation() -> None:
    gate = asyncio.Event()
    done: list[str] = []

    async def write() -> int:
        await gate.wait()
        done.append("written")
        return 7

    got: list[Any] = []

    async def caller() -> None:
        got.append(await run_held(write()))
        got.append(asyncio.current_task().cancelling())  # type: ignore[union-attr]
        await asyncio.sleep(0)
        got.append("never")

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    task.cancel()  # a second request while it waits changes nothing
    await asyncio.sleep(0.01)
    assert done == [] and not task.done()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == ["written"]
    assert got == [7, 2]  # the result, then the cancellation (both requests) at the next await


async def test_run_held_raises_the_cancellation_when_the_write_failed() -> None:
    gate = asyncio.Event()

    async def write() -> int:
        await gate.wait()
        raise ConnectionError("lost")

    task = asyncio.create_task(run_held(write()))
    await asyncio.sleep(0.01)
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_held_without_a_cancellation_is_a_plain_await() -> None:
    async def write() -> str:
        await asyncio.sleep(0)
        return "ok"

    assert await run_held(write()) == "ok"

    async def failing() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await run_held(failing())


async def test_a_held_future_refuses_cancel_and_abandon_cancels_it() -> None:
    future: HeldFuture[int] = HeldFuture(loop=asyncio.get_running_loop())
    assert future.cancel() is False and not future.done()
    assert future.abandon() is True and future.cancelled()


def test_the_repos_steps_are_held_and_a_wrapper_is_not() -> None:
    repo = af.MemoryWorkflowRepo()
    assert is_held(repo.apply_step)
    assert is_held(af.SQLAlchemyWorkflowRepo.apply_step)

    async def counted(step: Any) -> Any:  # a wrapper may await after the write: not held
        return await af.MemoryWorkflowRepo.apply_step(repo, step)

    repo.apply_step = counted  # type: ignore[method-assign]
    assert not is_held(repo.apply_step)

    class Slow(af.MemoryWorkflowRepo):
        async def apply_step(self, step: Any) -> Any:
            return await super().apply_step(step)

    assert not is_held(Slow().apply_step)  # an override is not held unless it says so

    @holds_cancellation
    async def marked() -> None:
        return None

    assert is_held(marked)


async def test_wait_cancelling_cancels_the_pending_tasks_waits_for_them_then_raises() -> None:
    ended: list[str] = []

    async def obeys() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            ended.append("obeys")

    async def ignores() -> None:  # takes its cancellation as a signal to finish its work first
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)
            ended.append("ignores")

    tasks = [asyncio.create_task(obeys()), asyncio.create_task(ignores())]
    waiter = asyncio.create_task(wait_cancelling(lambda: [t for t in tasks if not t.done()]))
    await asyncio.sleep(0)
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert sorted(ended) == ["ignores", "obeys"] and all(t.done() for t in tasks)
    assert tasks[0].cancelled() and not tasks[1].cancelled()


async def test_wait_cancelling_reads_the_pending_tasks_again_after_each_wait() -> None:
    tasks: list[asyncio.Task[None]] = []

    async def adds_one() -> None:
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(asyncio.sleep(0.01)))  # joins while the first is waited for

    tasks.append(asyncio.create_task(adds_one()))
    await wait_cancelling(lambda: [t for t in tasks if not t.done()])
    assert len(tasks) == 2 and all(t.done() for t in tasks)
