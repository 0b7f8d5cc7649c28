"""``DatabaseWorkflowLock`` beyond the lock contract: the repo's lease calls, many locks on one repo
(whose concurrent acquires and releases share statements on PostgreSQL), and bad arguments."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text

from asyncflow.errors import LockFailedError, ParamInvalidError
from asyncflow.lock.database import DatabaseWorkflowLock
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest) -> Any:
    # resolved from a sync fixture: an async fixture cannot request another one dynamically
    if request.param == "postgres":
        return request.getfixturevalue("pg_engine")
    return request.param


@pytest.fixture
async def repo(store: Any, sqlite_url: str) -> AsyncIterator[Any]:
    if store == "memory":
        yield MemoryWorkflowRepo()
        return
    made = SQLAlchemyWorkflowRepo(sqlite_url if store == "sqlite" else store)
    await made.migrate()
    try:
        yield made
    finally:
        await made.aclose()


async def test_the_repo_lease_calls(repo: Any) -> None:
    assert await repo.acquire_lease("k", "h1", 10_000)
    assert not await repo.acquire_lease("k", "h2", 10_000)  # held
    assert await repo.renew_leases([("k", "h1", 10_000), ("k", "h2", 10_000), ("x", "h1", 10)]) == [
        True,
        False,
        False,
    ]
    assert not await repo.release_lease("k", "h2")  # only by its holder
    assert await repo.release_lease("k", "h1")
    assert not await repo.release_lease("k", "h1")
    assert await repo.acquire_lease("k", "h2", 1)
    await asyncio.sleep(0.05)  # expired: the next acquirer takes it over, the old holder cannot renew
    assert await repo.renew_leases([("k", "h2", 10_000)]) == [False]
    assert await repo.acquire_lease("k", "h3", 10_000)
    assert not await repo.release_lease("k", "h2")


async def test_many_locks_on_one_repo(repo: Any) -> None:
    locks = [DatabaseWorkflowLock(repo) for _ in range(8)]
    holders: list[int] = []
    refused: list[int] = []
    gate, all_tried = asyncio.Event(), asyncio.Event()

    def tried(outcome: list[int], index: int) -> None:
        outcome.append(index)
        if len(holders) + len(refused) == len(locks):
            all_tried.set()

    async def contend(index: int) -> None:
        try:
            async with locks[index].hold("one", 5.0):
                tried(holders, index)
                await gate.wait()
        except LockFailedError:
            tried(refused, index)

    contenders = [
        asyncio.get_running_loop().create_task(contend(i), context=contextvars.Context()) for i in range(8)
    ]
    async with asyncio.timeout(30):  # every contender has its answer while the holder still holds
        await all_tried.wait()
    gate.set()
    await asyncio.gather(*contenders)
    assert len(holders) == 1  # concurrent acquires of one key (one statement on PostgreSQL): one holder

    async def hold_briefly(index: int) -> None:
        async with locks[index % 8].hold(f"key-{index}", 5.0):
            await asyncio.sleep(0.01)

    await asyncio.gather(*(hold_briefly(i) for i in range(40)))  # distinct keys: every one is taken
    for index in range(40):  # ... and released: free again at once
        assert await repo.acquire_lease(f"asyncflow:lock:key-{index}", "after", 1000)
    for lock in locks:
        await lock.aclose()


async def test_bad_arguments_are_refused(repo: Any) -> None:
    with pytest.raises(ParamInvalidError, match="keeps leases"):
        DatabaseWorkflowLock(object())  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError, match="op_timeout"):
        DatabaseWorkflowLock(repo, op_timeout=0)
    with pytest.raises(ParamInvalidError, match="ttl_ms"):
        await repo.acquire_lease("k", "h", 0)


CLEANUP = "asyncflow-database-lock-cleanup-"


@pytest.mark.postgres
async def test_an_acquire_cancelled_while_its_insert_waits_leaves_no_lease_behind(pg_engine: Any) -> None:
    """Regression: a hold cancelled while its acquire's INSERT was still waiting (a pass cut by a
    driver's ``stop()``) released at once, before that INSERT landed; the release found nothing, the
    INSERT then took the key, and it stayed held by nobody for the whole TTL (30 s here): every other
    driver was refused the instance until then. The row lock that an open transaction keeps on the
    key's (expired) row holds the INSERT back while the hold is cancelled."""
    repo = SQLAlchemyWorkflowRepo(pg_engine)
    await repo.migrate()
    lock, other = DatabaseWorkflowLock(repo), DatabaseWorkflowLock(repo)
    name = "asyncflow:lock:k"
    assert await repo.acquire_lease(name, "old", 1)  # expired at once: free for the next acquire
    await asyncio.sleep(0.01)
    try:
        async with pg_engine.connect() as blocker:
            await blocker.execute(text("SELECT 1 FROM asyncflow_lock WHERE key = :k FOR UPDATE"), {"k": name})
            blocker_pid = (await blocker.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            holding = asyncio.create_task(lock.hold("k", 30.0).__aenter__())
            async with pg_engine.connect() as watcher:  # until the acquire's INSERT waits for the row
                # waiting for this test's blocker only: another test's INSERT into its own schema's
                # asyncflow_lock, waiting at the same time, is not this one
                waits = text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE pg_blocking_pids(pid) @> ARRAY[CAST(:blocker AS integer)] "
                    "AND query LIKE 'INSERT INTO asyncflow_lock%'"
                )
                for _ in range(1000):  # bounded (10 s): a loaded server may be slow to show the wait
                    if (await watcher.execute(waits, {"blocker": blocker_pid})).scalar_one():
                        break
                    await asyncio.sleep(0.01)
            holding.cancel()
            with pytest.raises(asyncio.CancelledError):
                await holding
            for _ in range(100):  # the clean-up of the cancelled acquire runs (bounded: 1 s at most)
                if not [t for t in asyncio.all_tasks() if t.get_name().startswith(CLEANUP) and not t.done()]:
                    break
                await asyncio.sleep(0.01)
            await blocker.rollback()  # the INSERT goes ahead now
        async with asyncio.timeout(10):  # bounded; far below the 30 s TTL
            while True:
                try:
                    async with other.hold("k", 30.0):
                        break
                except LockFailedError:
                    await asyncio.sleep(0.05)
    finally:
        await lock.aclose()
        await other.aclose()
        await repo.aclose()
