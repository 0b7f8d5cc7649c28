"""``LocalWorkflowLock`` with a ``FakeClock``: expiry, take-over, no double release, no two holders."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from asyncflow.clock import FakeClock
from asyncflow.errors import LockFailedError
from asyncflow.lock.local import LocalLease, LocalWorkflowLock
from asyncflow.lock.protocol import WorkflowLock

T = TypeVar("T")


def unrelated(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


async def try_hold(lock: LocalWorkflowLock, key: str, ttl: float = 10.0) -> LocalLease:
    async with lock.hold(key, ttl) as lease:
        return lease


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def lock(clock: FakeClock) -> Any:
    async with LocalWorkflowLock(clock=clock) as lock:
        yield lock


def test_is_a_workflow_lock() -> None:
    assert isinstance(LocalWorkflowLock(), WorkflowLock)


async def test_a_live_holder_never_expires(lock: LocalWorkflowLock, clock: FakeClock) -> None:
    async with lock.hold("k", 1.0) as lease:
        clock.advance(3600)
        assert not lease.lost
        with pytest.raises(LockFailedError):
            await unrelated(try_hold(lock, "k"))


async def test_a_suspended_lease_expires_after_exactly_one_ttl(
    lock: LocalWorkflowLock, clock: FakeClock
) -> None:
    async with lock.hold("k", 5.0) as lease:
        lease._suspend_renewal()
        clock.advance(4.99)
        assert not lease.lost
        with pytest.raises(LockFailedError):
            await unrelated(try_hold(lock, "k"))
        clock.advance(0.01)
        assert lease.lost
        taken = await unrelated(try_hold(lock, "k"))
        assert taken is not lease
        with pytest.raises(LockFailedError, match="lost"):
            lease.raise_if_lost()


async def test_take_over_marks_the_old_lease_lost_at_once(lock: LocalWorkflowLock, clock: FakeClock) -> None:
    done = asyncio.Event()
    async with lock.hold("k", 1.0) as old:
        event = old.lost_event
        old._suspend_renewal()
        clock.advance(1.0)

        async def next_holder() -> LocalLease:
            async with lock.hold("k", 1.0) as lease:
                await done.wait()
                return lease

        task = unrelated(next_holder())
        await asyncio.sleep(0)
        assert event.is_set()
        assert lock.held_keys == {"k"}
    # the old block's release did not remove the new holder
    assert lock.held_keys == {"k"}
    with pytest.raises(LockFailedError):
        await unrelated(try_hold(lock, "k"))
    done.set()
    new = await task
    assert not new.lost
    assert lock.held_keys == frozenset()


async def test_release_is_idempotent(lock: LocalWorkflowLock) -> None:
    block = lock.hold("k", 1.0)
    lease = await block.__aenter__()
    await block.__aexit__(None, None, None)
    await block.__aexit__(None, None, None)  # a second exit releases nothing
    other = await unrelated(try_hold(lock, "k"))
    async with lock.hold("k", 1.0) as current:
        await lock._release(lease)  # a stale lease's release must not free the current holder
        assert lock.held_keys == {"k"}
        assert current is not other


async def test_a_hold_block_cannot_be_entered_twice(lock: LocalWorkflowLock) -> None:
    block = lock.hold("k", 1.0)
    async with block:
        with pytest.raises(RuntimeError, match="twice"):
            await block.__aenter__()


async def test_many_contenders_one_holder(lock: LocalWorkflowLock) -> None:
    inside = most = wins = refusals = 0

    async def contender() -> None:
        nonlocal inside, most, wins, refusals
        for _ in range(20):
            try:
                async with lock.hold("k", 1.0):
                    inside += 1
                    most = max(most, inside)
                    wins += 1
                    await asyncio.sleep(0)
                    inside -= 1
            except LockFailedError:
                refusals += 1
            await asyncio.sleep(0)

    await asyncio.gather(*(unrelated(contender()) for _ in range(50)))
    assert most == 1
    assert wins >= 1 and refusals >= 1
    assert wins + refusals == 1000
    assert lock.held_keys == frozenset()


async def test_separate_local_locks_do_not_exclude_each_other() -> None:
    async with (
        LocalWorkflowLock() as first,
        LocalWorkflowLock() as second,
        first.hold("k", 1.0) as a,
        second.hold("k", 1.0) as b,
    ):
        assert a is not b
        with pytest.raises(LockFailedError):
            await unrelated(try_hold(second, "k"))


async def test_lease_reports_its_state(lock: LocalWorkflowLock) -> None:
    async with lock.hold("k", 2.5) as lease:
        assert lease.key == "k"
        assert lease.ttl == 2.5
        assert "held" in repr(lease)
    assert lease.released
    assert "released" in repr(lease)


async def test_loss_while_held_is_logged(
    lock: LocalWorkflowLock, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncflow.lock._reentrant")
    async with lock.hold("k", 1.0) as lease:
        lease._suspend_renewal()
        clock.advance(2.0)
        assert lease.lost
    assert any("lost while held" in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------- handoffs (a driver's claimed rows)


async def test_an_offered_row_is_taken_once_by_the_next_holder(lock: LocalWorkflowLock) -> None:
    handoffs = lock.handoffs
    assert handoffs is not None
    mark = handoffs.begin()
    handoffs.end(mark, {"k": "row"})
    assert len(handoffs) == 1
    async with lock.hold("k", 10.0):
        assert handoffs.take("k") == "row"
        assert handoffs.take("k") is None
    assert len(handoffs) == 0 and handoffs._released == []  # nothing remembered with no claim out


async def test_a_give_back_withdraws_a_row_and_one_during_a_claim_keeps_it_from_being_offered(
    lock: LocalWorkflowLock,
) -> None:
    handoffs = lock.handoffs
    assert handoffs is not None
    handoffs.end(handoffs.begin(), {"a": 1, "b": 2})
    async with lock.hold("a", 10.0):
        pass  # another holder of "a" ran after the claim: its row may be stale
    assert handoffs.take("a") is None and len(handoffs) == 1
    mark = handoffs.begin()
    async with lock.hold("c", 10.0):
        pass  # "c" held and given back while the claim was out
    inner = handoffs.begin()  # a second claim out at once: the log is kept for the older one
    handoffs.end(inner, {"d": 4})
    handoffs.end(mark, {"c": 3, "e": 5})
    assert (handoffs.take("c"), handoffs.take("d"), handoffs.take("e")) == (None, 4, 5)
    assert handoffs._released == []
    held = lock._take("f", 10.0)
    handoffs.end(handoffs.begin(), {"f": 6})  # held when the claim came back: not offered
    assert handoffs.take("f") is None
    lock._give_back(held)
    handoffs.end(handoffs.begin(), {"g": 7})
    handoffs.drop("g")  # the driver gave the claim back
    assert handoffs.take("g") is None and len(handoffs) == 1  # "b" is still offered
    await lock.aclose()
    assert len(handoffs) == 0


async def test_a_taken_over_lost_lease_withdraws_the_row(lock: LocalWorkflowLock, clock: FakeClock) -> None:
    handoffs = lock.handoffs
    assert handoffs is not None
    old = lock._take("k", 1.0)
    old._suspend_renewal()
    clock.advance(2.0)
    handoffs._rows["k"] = (None, "row", clock.monotonic())  # offered while the old holder was gone
    new = lock._take("k", 10.0)
    assert old.lost and handoffs.take("k") is None
    lock._give_back(new)


def test_a_lock_that_changes_how_it_takes_keys_hands_nothing_over() -> None:
    class Subclassed(LocalWorkflowLock):
        async def _release(self, lease: LocalLease) -> None:
            await super()._release(lease)

    assert Subclassed().handoffs is None
    assert LocalWorkflowLock().handoffs is not None


async def test_overlapping_claims_remember_give_backs_only_back_to_the_oldest_one_out(
    lock: LocalWorkflowLock,
) -> None:
    """Two drivers on one lock whose claims always overlap: the log of give-backs stays bounded."""
    handoffs = lock.handoffs
    assert handoffs is not None
    first = handoffs.begin()
    for round_number in range(1000):
        second = handoffs.begin()
        lock._give_back(lock._take(f"k{round_number}", 10.0))  # a pass ends while both are out
        handoffs.end(first, {f"k{round_number}": "stale"})  # released while out: not offered
        assert handoffs.take(f"k{round_number}") is None
        assert len(handoffs._released) == 1  # back to the older claim still out (second)
        first = second
    handoffs.end(first, {"fresh": "row"})
    assert handoffs.take("fresh") == "row" and handoffs._released == [] and handoffs._marks == []


async def test_a_row_is_taken_only_by_a_pass_on_its_own_repo_and_only_while_young(
    lock: LocalWorkflowLock, clock: FakeClock
) -> None:
    from asyncflow.lock.local import HANDOFF_MAX_AGE

    handoffs = lock.handoffs
    assert handoffs is not None
    repo_a, repo_b = object(), object()
    handoffs.end(handoffs.begin(), {"k": "a's row"}, repo_a)
    handoffs.end(handoffs.begin(), {"k": "b's row"}, repo_b)  # the same id in another database
    assert handoffs.take("k", repo_a) is None  # b's row: not for a pass on repo a (and gone now)
    handoffs.end(handoffs.begin(), {"k": "a's row"}, repo_a)
    assert handoffs.take("k", repo_a) == "a's row"
    handoffs.end(handoffs.begin(), {"k": "a's row"}, repo_a)
    clock.advance(HANDOFF_MAX_AGE)
    handoffs.end(handoffs.begin(), {"j": "young"}, repo_a)
    clock.advance(0.001)
    assert handoffs.take("k", repo_a) is None  # too old: the pass reads the instance
    assert handoffs.take("j", repo_a) == "young"


async def test_a_rows_age_counts_from_when_its_claim_began(lock: LocalWorkflowLock, clock: FakeClock) -> None:
    from asyncflow.lock.local import HANDOFF_MAX_AGE

    handoffs = lock.handoffs
    assert handoffs is not None
    mark = handoffs.begin()
    clock.advance(HANDOFF_MAX_AGE + 0.01)  # a slow claim: its read is that old when its rows come back
    handoffs.end(mark, {"k": "row"})
    assert handoffs.take("k") is None
