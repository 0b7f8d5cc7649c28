"""The ``WorkflowLock`` contract, run against every implementation (local, redis, postgres advisory, and
``DatabaseWorkflowLock`` on the memory repo, SQLite and PostgreSQL).

Every test holds keys through the Protocol's ``hold(key, ttl)`` and the shared test hook
``lease._suspend_renewal()`` (a holder that stopped renewing, as after a crash). "Unrelated" tasks run
in a fresh ``contextvars.Context``, so they carry no re-entrancy marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from asyncflow.clock import FakeClock
from asyncflow.errors import LockFailedError, ParamInvalidError
from asyncflow.lock._reentrant import ReentrantLock
from asyncflow.lock.database import DatabaseWorkflowLock
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.lock.protocol import LockLease, WorkflowLock
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import POSTGRES_URL_ENV, REDIS_URL_ENV, isolated_pg_engine

T = TypeVar("T")

SHORT_TTL = 0.3  # a real, short lease: a suspended one must expire within it
RENEWED_TTL = 0.5  # a short lease that renewal must keep alive (slack for a busy machine)
GUARD = 10.0  # a generous bound on waits that must end (not a performance assertion)


def _postgres_available() -> bool:
    try:
        import asyncflow.lock.postgres  # noqa: F401
    except ImportError:
        return False
    return True


def _params() -> list[Any]:
    params: list[Any] = [
        pytest.param("local", id="local"),
        pytest.param("redis", id="redis", marks=pytest.mark.redis),
    ]
    if _postgres_available():
        params.append(pytest.param("postgres", id="postgres", marks=pytest.mark.postgres))
    params += [
        pytest.param("database-memory", id="database-memory"),
        pytest.param("database-sqlite", id="database-sqlite"),
        pytest.param("database-postgres", id="database-postgres", marks=pytest.mark.postgres),
    ]
    return params


LockFactory = Callable[[], Awaitable[ReentrantLock[Any]]]


@pytest.fixture(params=_params())
async def make_lock(request: pytest.FixtureRequest) -> AsyncIterator[LockFactory]:
    """Builds locks of one kind; all built in a test share the backend (and the Redis prefix).

    ``DatabaseWorkflowLock``s of a test share one database, each through a repo object of its own
    (as processes would), except on the memory repo (one object: nothing else can share it)."""
    kind = request.param
    made: list[ReentrantLock[Any]] = []
    prefix = f"asyncflow-test:{uuid.uuid4().hex[:12]}:"
    async with contextlib.AsyncExitStack() as stack:
        database = await _lock_database(kind, request, stack)

        async def factory() -> ReentrantLock[Any]:
            lock = await _new_lock(kind, prefix, database, stack)
            made.append(lock)
            return lock

        try:
            yield factory
        finally:
            for lock in made:
                await lock.aclose()
            leftover = [t for t in asyncio.all_tasks() if t.get_name().startswith("asyncflow-")]
            assert leftover == [], f"tasks left running after aclose(): {leftover}"


async def _lock_database(kind: str, request: pytest.FixtureRequest, stack: contextlib.AsyncExitStack) -> Any:
    """What the database locks of a test share: a memory repo, a SQLite URL or a PostgreSQL engine."""
    if kind == "database-memory":
        return MemoryWorkflowRepo()
    if kind == "database-sqlite":
        url = f"sqlite+aiosqlite:///{request.getfixturevalue('tmp_path')}/locks.db"
        repo = SQLAlchemyWorkflowRepo(url)
        await repo.migrate()
        await repo.aclose()
        return url
    if kind == "database-postgres":
        url = os.environ.get(POSTGRES_URL_ENV)
        if not url:
            pytest.skip(f"{POSTGRES_URL_ENV} is not set (.ci/run sets it)")
        engine = await stack.enter_async_context(isolated_pg_engine(url))
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.migrate()
        await repo.aclose()
        return engine
    return None


async def _new_lock(kind: str, prefix: str, database: Any, stack: contextlib.AsyncExitStack) -> Any:
    if kind.startswith("database-"):
        repo = database
        if not isinstance(database, MemoryWorkflowRepo):
            repo = SQLAlchemyWorkflowRepo(database)
            stack.push_async_callback(repo.aclose)  # after the locks (callbacks run in reverse)
        return DatabaseWorkflowLock(repo, prefix=prefix)
    return await _other_lock(kind, prefix)


async def _other_lock(kind: str, prefix: str) -> Any:
    if kind == "local":
        return LocalWorkflowLock(clock=FakeClock())  # its time moves only in elapse(): no sleeping
    if kind == "redis":
        url = os.environ.get(REDIS_URL_ENV)
        if not url:
            pytest.skip(f"{REDIS_URL_ENV} is not set (.ci/run sets it)")
        from asyncflow.lock.redis import RedisWorkflowLock

        return RedisWorkflowLock(url, prefix=prefix, op_timeout=2.0)
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set (.ci/run sets it)")
    from asyncflow.lock.postgres import PostgresAdvisoryLock

    return PostgresAdvisoryLock(url, namespace=prefix)


@pytest.fixture
async def lock(make_lock: LockFactory) -> ReentrantLock[Any]:
    return await make_lock()


def unrelated(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task that does not inherit the caller's context (so no re-entrancy marker)."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


async def try_hold(lock: WorkflowLock, key: str, ttl: float = 5.0) -> Any:
    """Hold ``key`` briefly; return the lease (raises ``LockFailedError`` if held elsewhere)."""
    async with lock.hold(key, ttl) as lease:
        return lease


async def assert_held_elsewhere(lock: WorkflowLock, key: str) -> None:
    with pytest.raises(LockFailedError):
        await unrelated(try_hold(lock, key))


async def elapse(lock: WorkflowLock, seconds: float) -> None:
    """Let ``seconds`` pass for ``lock``: the local lock's fake clock moves at once (deterministic);
    Redis and PostgreSQL keep time on the server, so for them this really sleeps."""
    clock = getattr(lock, "_clock", None)
    if isinstance(lock, LocalWorkflowLock) and isinstance(clock, FakeClock):
        clock.advance(seconds)
        await asyncio.sleep(0)
    else:
        await asyncio.sleep(seconds)


def key() -> str:
    return f"workflow_instance_execute_{uuid.uuid4().hex[:8]}"


async def test_lock_satisfies_the_protocol(lock: ReentrantLock[Any]) -> None:
    assert isinstance(lock, WorkflowLock)
    async with lock.hold(key(), 5.0) as lease:
        assert isinstance(lease, LockLease)
        assert not lease.lost
        lease.raise_if_lost()


async def test_held_key_fails_at_once_for_another_holder(lock: ReentrantLock[Any]) -> None:
    k = key()
    async with lock.hold(k, 5.0) as lease:
        assert lease.key == k
        with pytest.raises(LockFailedError, match="held"):
            await unrelated(try_hold(lock, k))
        assert not lease.lost


async def test_free_again_after_release(lock: ReentrantLock[Any]) -> None:
    k = key()
    async with lock.hold(k, 5.0) as first:
        pass
    assert first.released
    second = await unrelated(try_hold(lock, k))
    assert second is not first


async def test_reentrant_in_the_same_task(lock: ReentrantLock[Any]) -> None:
    k = key()
    async with lock.hold(k, 5.0) as outer:
        async with lock.hold(k, 5.0) as inner:
            assert inner is outer
            async with lock.hold(k, 1.0) as innermost:
                assert innermost is outer
        assert not outer.released  # the nested blocks did not release
        await assert_held_elsewhere(lock, k)
    await unrelated(try_hold(lock, k))


async def test_reentrant_in_a_child_task(lock: ReentrantLock[Any]) -> None:
    k = key()
    async with lock.hold(k, 5.0) as outer:
        child_lease = await asyncio.create_task(try_hold(lock, k))
        assert child_lease is outer

        async def spawns_a_grandchild() -> Any:
            return await asyncio.create_task(try_hold(lock, k))

        async with asyncio.TaskGroup() as group:
            grandchild = group.create_task(spawns_a_grandchild())
        assert grandchild.result() is outer
        assert not outer.released
        await assert_held_elsewhere(lock, k)


async def test_not_reentrant_from_an_unrelated_task(lock: ReentrantLock[Any]) -> None:
    k = key()
    go = asyncio.Event()

    async def started_before_the_hold() -> Any:
        await go.wait()
        return await try_hold(lock, k)

    early = asyncio.create_task(started_before_the_hold())  # its context was copied before the hold
    async with lock.hold(k, 5.0):
        go.set()
        with pytest.raises(LockFailedError):
            await early


async def test_child_that_outlives_the_block_acquires_afresh(lock: ReentrantLock[Any]) -> None:
    k = key()
    block_done = asyncio.Event()

    async def child() -> Any:
        await block_done.wait()
        return await try_hold(lock, k)

    async with lock.hold(k, 5.0) as outer:
        task = asyncio.create_task(child())
    block_done.set()
    late = await task
    assert late is not outer  # the copied marker names a released lease: not re-entrant


async def test_two_lock_objects_are_not_reentrant_for_each_other(make_lock: LockFactory) -> None:
    first, second = await make_lock(), await make_lock()
    k = key()
    async with first.hold(k, 5.0) as outer:
        if isinstance(first, LocalWorkflowLock):  # separate local locks share nothing
            async with second.hold(k, 5.0) as other:
                assert other is not outer
        else:  # a shared backend: the second object is another holder
            with pytest.raises(LockFailedError):
                await try_hold(second, k)


async def test_released_after_an_exception(lock: ReentrantLock[Any]) -> None:
    k = key()
    with pytest.raises(RuntimeError, match="boom"):
        async with lock.hold(k, 5.0) as lease:
            raise RuntimeError("boom")
    assert lease.released
    await unrelated(try_hold(lock, k))


async def test_released_after_cancellation(lock: ReentrantLock[Any]) -> None:
    k = key()
    inside = asyncio.Event()
    leases: list[Any] = []

    async def holder() -> None:
        async with lock.hold(k, 5.0) as lease:
            leases.append(lease)
            inside.set()
            await asyncio.Event().wait()

    task = unrelated(holder())
    await inside.wait()
    await assert_held_elsewhere(lock, k)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leases[0].released
    await unrelated(try_hold(lock, k))


async def test_cancellation_propagates_from_a_nested_hold(lock: ReentrantLock[Any]) -> None:
    k = key()
    inside = asyncio.Event()

    async def holder() -> None:
        async with lock.hold(k, 5.0), lock.hold(k, 5.0):
            inside.set()
            await asyncio.sleep(GUARD)

    task = unrelated(holder())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await unrelated(try_hold(lock, k))


async def test_keys_are_independent(lock: ReentrantLock[Any]) -> None:
    a, b = key(), key()
    async with lock.hold(a, 5.0) as lease_a:
        lease_b = await unrelated(try_hold(lock, b))
        assert lease_b.key == b
        async with lock.hold(b, 5.0) as held_b:
            assert held_b is not lease_a
            await assert_held_elsewhere(lock, b)
        await assert_held_elsewhere(lock, a)


async def test_concurrent_contenders_get_exactly_one_holder(lock: ReentrantLock[Any]) -> None:
    k = key()
    inside = 0
    most = 0
    wins = 0

    async def contender() -> None:
        nonlocal inside, most, wins
        for _ in range(5):
            try:
                async with lock.hold(k, 5.0):
                    inside += 1
                    most = max(most, inside)
                    wins += 1
                    await asyncio.sleep(0.001)
                    inside -= 1
            except LockFailedError:
                await asyncio.sleep(0)

    await asyncio.gather(*(unrelated(contender()) for _ in range(20)))
    assert most == 1
    assert wins >= 1


async def test_renewal_keeps_a_short_lease_while_held(lock: ReentrantLock[Any]) -> None:
    k = key()
    async with lock.hold(k, RENEWED_TTL) as lease:
        await elapse(lock, RENEWED_TTL * 3)  # several TTLs: only renewal can keep the key
        assert not lease.lost
        lease.raise_if_lost()
        await assert_held_elsewhere(lock, k)
    await unrelated(try_hold(lock, k))


async def test_a_holder_that_stops_renewing_frees_the_key_within_one_ttl(lock: ReentrantLock[Any]) -> None:
    k = key()
    taken = asyncio.Event()
    done = asyncio.Event()
    second: list[Any] = []

    async def next_holder() -> None:
        async with asyncio.timeout(GUARD):
            while True:  # the backend frees the key within one TTL: try until it did (bounded)
                try:
                    async with lock.hold(k, 5.0) as lease:
                        second.append(lease)
                        taken.set()
                        await done.wait()
                        return
                except LockFailedError:
                    await asyncio.sleep(0.01)

    async with lock.hold(k, SHORT_TTL) as first:
        first._suspend_renewal()  # the simulated crash
        await elapse(lock, SHORT_TTL)
        task = unrelated(next_holder())
        await taken.wait()
        assert first.lost
        assert first.lost_event.is_set()
        with pytest.raises(LockFailedError, match="lost"):
            first.raise_if_lost()
        with pytest.raises(LockFailedError):
            async with lock.hold(k, 5.0):  # re-entering a lost lease fails too
                pass
    # the old holder's release (after expiry) must not have deleted the next holder's key
    await assert_held_elsewhere(lock, k)
    assert not second[0].lost
    done.set()
    await task
    await unrelated(try_hold(lock, k))


async def test_lost_event_is_set_when_the_loss_is_detected(lock: ReentrantLock[Any]) -> None:
    k = key()
    async with lock.hold(k, SHORT_TTL) as lease:
        event = lease.lost_event
        assert not event.is_set()
        lease._suspend_renewal()
        async with asyncio.timeout(GUARD):
            while not lease.lost:  # detection may be lazy (local) or timed (redis)
                await elapse(lock, 0.02)
        assert event.is_set()


async def test_bad_arguments_are_refused(lock: ReentrantLock[Any]) -> None:
    with pytest.raises(ParamInvalidError):
        lock.hold("", 5.0)
    with pytest.raises(ParamInvalidError):
        lock.hold(key(), 0)
    with pytest.raises(ParamInvalidError):
        lock.hold(key(), float("nan"))


async def test_closed_lock_refuses_new_holds_and_loses_held_ones(make_lock: LockFactory) -> None:
    lock = await make_lock()
    k = key()
    async with lock as same:
        assert same is lock
        async with lock.hold(k, 5.0) as lease:
            await lock.aclose()
            assert lease.lost
            with pytest.raises(LockFailedError):
                lease.raise_if_lost()
    assert lock.closed
    with pytest.raises(LockFailedError, match="closed"):
        await try_hold(lock, key())
    await lock.aclose()  # idempotent
