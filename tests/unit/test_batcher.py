"""Group commit (asyncflow.store._batcher.StepBatcher): items waiting together leave together, at most
``slots`` batches in flight and ``max_batch`` items each, sorted; outcomes and errors reach their callers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from asyncflow.store._batcher import StepBatcher


class Runner:
    def __init__(self, *, gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.gate = gate
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, items: Sequence[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            return [item * 10 if not isinstance(item, str) else ValueError(item) for item in items]
        finally:
            self.in_flight -= 1


async def test_a_lone_item_goes_alone() -> None:
    runner = Runner()
    batcher: StepBatcher[Any] = StepBatcher(runner, slots=2, max_batch=8)
    assert await batcher.submit(1, 1) == 10
    assert runner.batches == [[1]]


async def test_items_submitted_together_share_a_batch_sorted_by_order() -> None:
    runner = Runner()
    batcher: StepBatcher[Any] = StepBatcher(runner, slots=1, max_batch=8)
    results = await asyncio.gather(*(batcher.submit(order, order) for order in (5, 3, 9, 1)))
    assert results == [50, 30, 90, 10]
    assert runner.batches == [[1, 3, 5, 9]]


async def test_slots_and_max_batch_bound_the_batches() -> None:
    gate = asyncio.Event()
    runner = Runner(gate=gate)
    batcher: StepBatcher[Any] = StepBatcher(runner, slots=2, max_batch=3)
    calls = [asyncio.create_task(batcher.submit(i, i)) for i in range(10)]
    await asyncio.sleep(0.01)
    assert [len(b) for b in runner.batches] == [3, 3]  # two slots busy, the rest wait
    gate.set()
    assert await asyncio.gather(*calls) == [i * 10 for i in range(10)]
    assert runner.most_in_flight == 2
    assert all(len(b) <= 3 for b in runner.batches) and sum(len(b) for b in runner.batches) == 10


async def test_a_full_queue_with_nothing_in_flight_leaves_as_two_halves() -> None:
    """The database works on one half while the process handles the other's outcomes (pipelining);
    batches that queue up while one is in flight leave whole, so the halves stay halves."""
    gate = asyncio.Event()
    runner = Runner(gate=gate)
    batcher: StepBatcher[Any] = StepBatcher(runner, slots=4, max_batch=8)
    first = [asyncio.create_task(batcher.submit(i, i)) for i in range(12)]
    await asyncio.sleep(0.01)
    assert [len(b) for b in runner.batches] == [6, 6]
    later = [asyncio.create_task(batcher.submit(i, i)) for i in range(12, 18)]
    await asyncio.sleep(0.01)
    assert [len(b) for b in runner.batches] == [6, 6, 6]  # something in flight: no split
    gate.set()
    await asyncio.gather(*first, *later)
    runner.batches.clear()
    await asyncio.gather(*(batcher.submit(i, i) for i in range(5)))
    assert [len(b) for b in runner.batches] == [5]  # not a full batch: it leaves whole
    runner.batches.clear()
    await asyncio.gather(*(batcher.submit(i, i) for i in range(20)))
    assert [len(b) for b in runner.batches][:2] == [8, 8] and sum(map(len, runner.batches)) == 20


async def test_an_exception_outcome_reaches_its_caller_only() -> None:
    batcher: StepBatcher[Any] = StepBatcher(Runner(), slots=1, max_batch=8)
    results = await asyncio.gather(batcher.submit(1, 1), batcher.submit(2, "bad"), return_exceptions=True)
    assert results[0] == 10 and isinstance(results[1], ValueError) and str(results[1]) == "bad"


async def test_a_failing_runner_fails_every_caller_of_its_batch_and_the_next_batch_runs() -> None:
    calls = 0

    async def flaky(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("lost")
        return list(items)

    batcher: StepBatcher[int] = StepBatcher(flaky, slots=1, max_batch=8)
    first = await asyncio.gather(batcher.submit(1, 1), batcher.submit(2, 2), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in first)
    assert await batcher.submit(3, 3) == 3


async def test_a_cancelled_caller_does_not_stop_its_batch() -> None:
    gate = asyncio.Event()
    runner = Runner(gate=gate)
    batcher: StepBatcher[Any] = StepBatcher(runner, slots=1, max_batch=8)
    cancelled = asyncio.create_task(batcher.submit(1, 1))
    kept = asyncio.create_task(batcher.submit(2, 2))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    gate.set()
    assert await kept == 20
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert runner.batches == [[1, 2]]  # the cancelled caller's item was applied all the same
    await batcher.aclose()


async def test_aclose_waits_for_batches_in_flight() -> None:
    gate = asyncio.Event()
    runner = Runner(gate=gate)
    batcher: StepBatcher[Any] = StepBatcher(runner, slots=1, max_batch=8)
    call = asyncio.create_task(batcher.submit(1, 1))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(batcher.aclose())
    await asyncio.sleep(0.01)
    assert not closing.done()
    gate.set()
    await closing
    assert call.done() and call.result() == 10


async def test_a_held_callers_cancellation_waits_for_its_outcome_then_is_raised_at_its_next_await() -> None:
    gate = asyncio.Event()
    batcher: StepBatcher[Any] = StepBatcher(Runner(gate=gate), slots=1, max_batch=8)
    seen: list[Any] = []

    async def caller() -> None:
        seen.append(await batcher.submit(1, 1, hold=True))  # returns although cancelled meanwhile
        seen.append("after")  # synchronous code right after still runs ...
        await asyncio.sleep(0)  # ... and the cancellation lands at the next await
        seen.append("never")

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    assert task.cancel("stop") is True
    await asyncio.sleep(0.01)
    assert not task.done()  # the cancellation waits for the batch
    gate.set()
    with pytest.raises(asyncio.CancelledError) as raised:
        await task
    assert seen == [10, "after"]
    assert raised.value.args == ("stop",)
    assert task.cancelling() == 1  # one request, not two: timeouts and task groups count them


async def test_a_held_caller_whose_outcome_is_an_error_gets_the_cancellation_not_the_error() -> None:
    gate = asyncio.Event()
    batcher: StepBatcher[Any] = StepBatcher(Runner(gate=gate), slots=1, max_batch=8)
    task = asyncio.create_task(batcher.submit(1, "bad", hold=True))
    await asyncio.sleep(0.01)
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_held_caller_of_a_cut_batch_is_cancelled() -> None:
    started = asyncio.Event()

    async def hangs(items: Sequence[Any]) -> list[Any]:
        started.set()
        await asyncio.Event().wait()
        return list(items)

    batcher: StepBatcher[Any] = StepBatcher(hangs, slots=1, max_batch=8)
    call = asyncio.create_task(batcher.submit(1, 1, hold=True))
    await started.wait()
    for batch in list(batcher._tasks):  # the batch itself is cancelled (a closing loop, say)
        batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 1)


@pytest.mark.timeout(20)
async def test_aclose_right_after_the_last_outcome_returns() -> None:
    """The caller resumes while the finished batch's task is still in the batcher (finished tasks
    leave it only when the next batch starts, a few at a time): ``aclose`` then must not wait for
    them to leave (since Python 3.12, ``gather`` of done tasks returns without yielding to the loop,
    and an older loop spun forever)."""
    batcher: StepBatcher[Any] = StepBatcher(Runner(), slots=1, max_batch=8)
    assert await batcher.submit(1, 1) == 10
    assert batcher._tasks  # the batch's task is done, and still there
    await asyncio.wait_for(batcher.aclose(), 5)
    assert not batcher._tasks


@pytest.mark.timeout(20)
async def test_aclose_waits_for_the_batch_a_finishing_batch_starts() -> None:
    gate = asyncio.Event()
    runner = Runner(gate=gate)
    batcher: StepBatcher[Any] = StepBatcher(runner, slots=1, max_batch=1)
    first = asyncio.create_task(batcher.submit(1, 1))
    second = asyncio.create_task(batcher.submit(2, 2))  # queued: the only slot is taken
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(batcher.aclose())
    gate.set()
    await closing
    assert second.done() and second.result() == 20
    assert first.result() == 10
    assert runner.batches == [[1], [2]]


async def _held_await(batcher: StepBatcher[Any], order: int, item: Any) -> Any:
    """A caller that awaits :meth:`StepBatcher.enqueue`'s future itself (as the PostgreSQL step does)."""
    future = batcher.enqueue(order, item, True)
    try:
        return await future
    except asyncio.CancelledError as cancel:
        return batcher.held_outcome(future, cancel)


async def test_an_enqueued_future_is_the_outcome_of_its_item() -> None:
    runner = Runner()
    batcher: StepBatcher[Any] = StepBatcher(runner, slots=2, max_batch=8)
    futures = [batcher.enqueue(order, order) for order in (5, 3)]
    assert [await future for future in futures] == [50, 30]
    assert runner.batches == [[3, 5]]
    with pytest.raises(ValueError, match="bad"):
        await batcher.enqueue(1, "bad")


async def test_a_held_enqueued_callers_cancellation_waits_for_its_outcome() -> None:
    gate = asyncio.Event()
    batcher: StepBatcher[Any] = StepBatcher(Runner(gate=gate), slots=1, max_batch=8)
    seen: list[Any] = []

    async def caller() -> None:
        seen.append(await _held_await(batcher, 1, 1))
        await asyncio.sleep(0)
        seen.append("never")

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    assert task.cancel("stop") is True
    await asyncio.sleep(0.01)
    assert not task.done()
    gate.set()
    with pytest.raises(asyncio.CancelledError) as raised:
        await task
    assert seen == [10]
    assert raised.value.args == ("stop",)
    assert task.cancelling() == 1


async def test_a_held_enqueued_caller_whose_outcome_is_an_error_gets_the_cancellation() -> None:
    gate = asyncio.Event()
    batcher: StepBatcher[Any] = StepBatcher(Runner(gate=gate), slots=1, max_batch=8)
    task = asyncio.create_task(_held_await(batcher, 1, "bad"))
    await asyncio.sleep(0.01)
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_batch_runner_with_the_wrong_number_of_outcomes_fails_every_caller() -> None:
    async def short(items: Sequence[Any]) -> list[Any]:
        return list(items)[:-1]

    batcher: StepBatcher[Any] = StepBatcher(short, slots=1, max_batch=8)
    results = await asyncio.gather(batcher.submit(1, 1), batcher.submit(2, 2), return_exceptions=True)
    assert all(isinstance(result, ValueError) for result in results)
