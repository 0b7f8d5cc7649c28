"""``_InContext``: the runner awaits the first node's drive in the pass's own task, in a copy of the
caller's context (what a task of its own would give it, without the task)."""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Generator

import pytest

from asyncflow.engine.runner import _InContext

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("asyncflow_test_in_context", default="unset")


async def test_the_result_and_the_context_variables_stay_where_they_belong() -> None:
    VAR.set("caller")
    seen: list[str] = []

    async def inner() -> str:
        seen.append(VAR.get())
        VAR.set("inner")
        await asyncio.sleep(0)  # a suspension: the next step runs in the same context
        seen.append(VAR.get())
        return "done"

    context = contextvars.copy_context()
    assert await _InContext(inner(), context) == "done"
    assert seen == ["caller", "inner"]
    assert VAR.get() == "caller"
    assert context[VAR] == "inner"


async def test_it_runs_in_the_awaiting_task_and_raises_what_the_coroutine_raises() -> None:
    me = asyncio.current_task()

    async def inner() -> None:
        assert asyncio.current_task() is me
        await asyncio.sleep(0)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await _InContext(inner(), contextvars.copy_context())


async def test_a_cancellation_of_the_task_goes_to_the_coroutine() -> None:
    started = asyncio.Event()
    handled: list[str] = []

    async def inner() -> str:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            handled.append(VAR.get())
            await asyncio.sleep(0)  # it may go on awaiting before it ends
            return "handled"
        return "slept"

    async def outer() -> str:
        VAR.set("outer")
        return await _InContext(inner(), contextvars.copy_context())

    task = asyncio.create_task(outer())
    await started.wait()
    task.cancel()
    assert await task == "handled"
    assert handled == ["outer"]

    async def stubborn() -> None:
        started.set()
        await asyncio.sleep(10)

    started.clear()
    task = asyncio.create_task(_wrap(stubborn()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _wrap(coro: object) -> object:
    return await _InContext(coro, contextvars.copy_context())  # type: ignore[arg-type]


@types.coroutine
def _suspend() -> Generator[None, None, None]:
    yield


def test_closing_the_awaiting_coroutine_closes_the_inner_one() -> None:
    closed: list[str] = []

    async def inner() -> None:
        try:
            await _suspend()
        finally:
            closed.append(VAR.get())

    async def outer() -> None:
        VAR.set("outer")
        await _InContext(inner(), contextvars.copy_context())

    coro = outer()
    coro.send(None)  # runs up to the suspension (no loop needed)
    coro.close()
    assert closed == ["outer"]
