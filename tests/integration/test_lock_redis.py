"""``RedisWorkflowLock`` beyond the shared contract: processes, failures, renewal loss, ownership."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import multiprocessing
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from asyncflow.errors import LockFailedError
from asyncflow.lock.redis import DEFAULT_PREFIX, RedisLease, RedisWorkflowLock

pytestmark = pytest.mark.redis

GUARD = 10.0  # a generous bound on waits that must end (not a performance assertion)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"asyncflow-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def lock(redis_url: str, prefix: str) -> AsyncIterator[RedisWorkflowLock]:
    async with RedisWorkflowLock(redis_url, prefix=prefix) as lock:
        yield lock


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- two processes contending ------------------------------------------------------------------------


async def _contend(url: str, prefix: str, attempts: int) -> tuple[int, int, int]:
    """Try ``attempts`` holds on one key, and more until one is won (a process whose attempts all fell
    while the other held the key, as they can on a slow machine, tries on once the other is done);
    count wins, refusals and exclusion violations."""
    wins = refusals = violations = 0
    raw = aioredis.Redis.from_url(url)
    try:
        await raw.incr(prefix + "ready")
        async with asyncio.timeout(GUARD):  # start together
            while int(await raw.get(prefix + "ready") or 0) < 2:
                await asyncio.sleep(0.005)
        async with RedisWorkflowLock(url, prefix=prefix) as lock, asyncio.timeout(GUARD):
            tried = 0
            while tried < attempts or not wins:
                tried += 1
                try:
                    async with lock.hold("contended", 5.0) as lease:
                        wins += 1
                        if await raw.incr(prefix + "inside") != 1:
                            violations += 1
                        await asyncio.sleep(0.0005)
                        lease.raise_if_lost()
                        await raw.decr(prefix + "inside")
                except LockFailedError:
                    refusals += 1
                    await asyncio.sleep(0)
    finally:
        await raw.aclose()
    return wins, refusals, violations


def contend_in_process(url: str, prefix: str, attempts: int) -> tuple[int, int, int]:
    return asyncio.run(_contend(url, prefix, attempts))


async def test_two_processes_never_hold_at_the_same_time(redis_url: str, prefix: str) -> None:
    context = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        results = await asyncio.gather(
            *(loop.run_in_executor(pool, contend_in_process, redis_url, prefix, 500) for _ in range(2))
        )
    wins = sum(r[0] for r in results)
    refusals = sum(r[1] for r in results)
    violations = sum(r[2] for r in results)
    assert wins + refusals >= 1000
    assert violations == 0
    assert all(result[0] >= 1 for result in results)  # both processes held it at some point ...
    assert refusals >= 1  # ... and they really contended


# -- Redis unreachable or slow ----------------------------------------------------------------------


async def test_unreachable_redis_fails_with_the_cause() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with RedisWorkflowLock(url, op_timeout=0.5) as lock:
        async with asyncio.timeout(GUARD):
            with pytest.raises(LockFailedError, match="Redis failed") as caught:
                async with lock.hold("k", 5.0):
                    pass
    assert isinstance(caught.value.__cause__, RedisConnectionError)


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while await reader.read(4096):
                pass
        finally:
            writer.close()

    async def __aenter__(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def test_slow_redis_fails_within_the_operation_timeout_url_client() -> None:
    silent = SilentServer()
    async with silent as port, RedisWorkflowLock(f"redis://127.0.0.1:{port}/0", op_timeout=0.3) as lock:
        async with asyncio.timeout(GUARD):
            with pytest.raises(LockFailedError) as caught:
                async with lock.hold("k", 5.0):
                    pass
    assert silent.connections >= 1
    assert isinstance(caught.value.__cause__, TimeoutError | RedisError)


async def test_slow_redis_fails_within_the_operation_timeout_given_client() -> None:
    silent = SilentServer()
    async with silent as port:
        client = aioredis.Redis(host="127.0.0.1", port=port)  # no socket timeouts at all
        try:
            async with RedisWorkflowLock(client, op_timeout=0.3) as lock:
                async with asyncio.timeout(GUARD):
                    with pytest.raises(LockFailedError, match=r"did not answer within 0\.3 s") as caught:
                        async with lock.hold("k", 5.0):
                            pass
        finally:
            await client.aclose()
    assert isinstance(caught.value.__cause__, TimeoutError)


async def test_cancelling_an_acquire_propagates_cancellation() -> None:
    silent = SilentServer()
    async with silent as port:
        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            async with RedisWorkflowLock(client, op_timeout=1.0) as lock:

                async def acquire() -> None:
                    async with lock.hold("k", 5.0):
                        pass

                task = asyncio.create_task(acquire())
                async with asyncio.timeout(GUARD):
                    while silent.connections == 0:
                        await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        finally:
            await client.aclose()


# -- keys, tokens, renewal, release ------------------------------------------------------------------


async def test_default_prefix_and_key_layout(redis_url: str, raw: aioredis.Redis) -> None:
    key = f"workflow_instance_execute_{uuid.uuid4().hex[:8]}"
    async with RedisWorkflowLock(redis_url) as lock, lock.hold(key, 30.0) as lease:
        assert isinstance(lease, RedisLease)
        assert lease.redis_key == DEFAULT_PREFIX + key == "asyncflow:lock:" + key
        token = await raw.get(lease.redis_key)
        assert token is not None and len(token) == 32
        assert 0 < await raw.pttl(lease.redis_key) <= 30_000
    assert await raw.exists(DEFAULT_PREFIX + key) == 0


async def test_renewal_extends_the_redis_ttl(lock: RedisWorkflowLock, raw: aioredis.Redis) -> None:
    async with lock.hold("k", 0.5) as lease:
        await asyncio.sleep(1.2)
        assert await raw.exists(lease.redis_key) == 1
        assert 0 < await raw.pttl(lease.redis_key) <= 500
        assert not lease.lost


async def test_renewal_that_finds_the_key_taken_marks_the_lease_lost(
    lock: RedisWorkflowLock, raw: aioredis.Redis
) -> None:
    async with lock.hold("k", 1.0) as lease:
        await raw.set(lease.redis_key, "someone-else", px=5000)  # as if it had expired and been taken
        async with asyncio.timeout(GUARD):
            await lease.lost_event.wait()
        assert lease.lost
        with pytest.raises(LockFailedError, match="taken"):
            lease.raise_if_lost()
    assert await raw.get(lease.redis_key) == "someone-else"  # the release only deletes its own token


async def test_renewal_that_fails_marks_the_lease_lost_with_the_cause(
    lock: RedisWorkflowLock, raw: aioredis.Redis
) -> None:
    async with lock.hold("k", 1.0) as lease:
        await raw.delete(lease.redis_key)
        await raw.hset(lease.redis_key, "f", "v")  # GET in the renewal script now fails: WRONGTYPE
        async with asyncio.timeout(GUARD):
            await lease.lost_event.wait()
        with pytest.raises(LockFailedError, match="renewal failed") as caught:
            lease.raise_if_lost()
        assert isinstance(caught.value.__cause__, RedisError)
    await raw.delete(lease.redis_key)


async def test_stale_release_never_deletes_a_new_holders_key(
    redis_url: str, prefix: str, raw: aioredis.Redis
) -> None:
    async with (
        RedisWorkflowLock(redis_url, prefix=prefix) as first,
        RedisWorkflowLock(redis_url, prefix=prefix) as second,
    ):
        old_block = first.hold("k", 0.2)
        old = await old_block.__aenter__()
        old._suspend_renewal()
        await asyncio.sleep(0.35)
        async with second.hold("k", 5.0) as new:
            token = await raw.get(new.redis_key)
            await old_block.__aexit__(None, None, None)  # the crashed holder's late release
            assert await raw.get(new.redis_key) == token
            assert not new.lost


async def test_second_cancellation_during_release_still_releases(
    lock: RedisWorkflowLock, raw: aioredis.Redis
) -> None:
    inside = asyncio.Event()
    names: list[str] = []

    async def holder() -> None:
        async with lock.hold("k", 30.0) as lease:
            names.append(lease.redis_key)
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.get_running_loop().create_task(holder(), context=contextvars.Context())
    await inside.wait()
    task.cancel()
    await asyncio.sleep(0)  # the task leaves its block and starts the release ...
    task.cancel()  # ... which this second cancellation interrupts
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(GUARD):  # far less than the 30 s TTL: released, not expired
        while await raw.exists(names[0]):
            await asyncio.sleep(0.01)


async def test_url_client_is_owned_and_given_client_is_not(redis_url: str, raw: aioredis.Redis) -> None:
    owned_name = f"asyncflow-owned-{uuid.uuid4().hex[:8]}"
    given_name = f"asyncflow-given-{uuid.uuid4().hex[:8]}"

    async def connections(name: str) -> int:
        return sum(1 for client in await raw.client_list() if client.get("name") == name)

    separator = "&" if "?" in redis_url else "?"
    owned = RedisWorkflowLock(f"{redis_url}{separator}client_name={owned_name}")
    given_client = aioredis.Redis.from_url(redis_url, client_name=given_name)
    given = RedisWorkflowLock(given_client)
    try:
        for lock in (owned, given):
            async with lock.hold(f"k-{uuid.uuid4().hex[:8]}", 5.0):
                pass
        assert await connections(owned_name) >= 1
        assert await connections(given_name) >= 1
        await owned.aclose()
        await given.aclose()
        async with asyncio.timeout(GUARD):
            while await connections(owned_name):
                await asyncio.sleep(0.01)
        assert await connections(given_name) >= 1
        assert await given_client.ping()
    finally:
        await given_client.aclose()


async def test_scripts_are_reloaded_after_a_script_flush(
    lock: RedisWorkflowLock, raw: aioredis.Redis
) -> None:
    async with lock.hold("k", 1.0) as lease:
        valid_until = lease._valid_until
        await raw.script_flush()  # as after a Redis restart: EVALSHA now answers NOSCRIPT
        async with asyncio.timeout(GUARD):
            while lease._valid_until == valid_until and not lease.lost:  # one renewal round
                await asyncio.sleep(0.02)
        assert not lease.lost
        assert lease._valid_until > valid_until
        await raw.script_flush()
    assert await raw.exists(lease.redis_key) == 0  # the release fell back to EVAL


async def test_a_redis_that_forgets_the_key_opens_a_window_of_one_renewal_interval(
    redis_url: str, prefix: str, raw: aioredis.Redis
) -> None:
    """docs/reliability.md (Limits): a Redis that restarts empty forgets every key at once (simulated
    here by deleting this test's own key). Another process takes the key at once, while the old holder
    still trusts its lease until its next renewal finds the key gone: the window is at most one renewal
    interval (ttl / 3) plus that renewal's round trip."""
    ttl = 1.5
    async with (
        RedisWorkflowLock(redis_url, prefix=prefix) as first,
        RedisWorkflowLock(redis_url, prefix=prefix) as second,
        first.hold("k", ttl) as old,
    ):
        await raw.delete(old.redis_key)  # the restart: the key is gone
        loop = asyncio.get_running_loop()
        forgotten = loop.time()
        async with second.hold("k", ttl) as new:  # taken at once by another holder ...
            assert not old.lost  # ... while the old holder still believes in its lease
            async with asyncio.timeout(GUARD):
                await old.lost_event.wait()  # its next renewal finds the key gone
            window = loop.time() - forgotten
            assert not new.lost
        assert window <= ttl / 3 + 2.0  # one renewal interval + at most op_timeout (2 s)
