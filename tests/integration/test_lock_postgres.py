"""``PostgresAdvisoryLock`` beyond the shared contract: the session is the lease."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

from asyncflow.errors import LockFailedError, ParamInvalidError
from asyncflow.lock.postgres import PostgresAdvisoryLock, PostgresLease, advisory_lock_id

pytestmark = pytest.mark.postgres

GUARD = 10.0  # a generous bound on waits that must end (not a performance assertion)


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(postgres_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def lock(postgres_url: str) -> AsyncIterator[PostgresAdvisoryLock]:
    async with PostgresAdvisoryLock(postgres_url, namespace=f"test:{uuid.uuid4().hex[:8]}:") as lock:
        yield lock


async def advisory_locks(admin: AsyncEngine, ident: int) -> int:
    """How many sessions hold the advisory lock ``ident`` (pg_locks splits a bigint in two halves)."""
    unsigned = ident & 0xFFFFFFFFFFFFFFFF
    async with admin.connect() as conn:
        query = text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid::bigint = :high AND objid::bigint = :low AND objsubid = 1"
        )
        result = await conn.execute(query, {"high": unsigned >> 32, "low": unsigned & 0xFFFFFFFF})
        return int(result.scalar_one())


def test_advisory_lock_id_is_a_stable_signed_bigint() -> None:
    ident = advisory_lock_id("asyncflow:lock:workflow_instance_execute_1")
    assert ident == advisory_lock_id("asyncflow:lock:workflow_instance_execute_1")
    assert ident != advisory_lock_id("asyncflow:lock:workflow_instance_execute_2")
    assert -(2**63) <= ident < 2**63


async def test_held_lock_is_visible_in_pg_locks(lock: PostgresAdvisoryLock, admin: AsyncEngine) -> None:
    async with lock.hold("k", 5.0) as lease:
        assert isinstance(lease, PostgresLease)
        assert await advisory_locks(admin, lease.advisory_id) == 1
    assert await advisory_locks(admin, lease.advisory_id) == 0


async def test_a_killed_session_marks_the_lease_lost(lock: PostgresAdvisoryLock, admin: AsyncEngine) -> None:
    async with lock.hold("k", 1.0) as lease:
        async with admin.connect() as conn:
            pid_query = text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid::bigint = :high AND objid::bigint = :low"
            )
            unsigned = lease.advisory_id & 0xFFFFFFFFFFFFFFFF
            pid = (
                await conn.execute(pid_query, {"high": unsigned >> 32, "low": unsigned & 0xFFFFFFFF})
            ).scalar_one()
            await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        async with asyncio.timeout(GUARD):
            await lease.lost_event.wait()
        with pytest.raises(LockFailedError, match="session failed") as caught:
            lease.raise_if_lost()
        assert isinstance(caught.value.__cause__, SQLAlchemyError)
        other = await asyncio.create_task(_hold_elsewhere(lock, "k"))
        assert other is not lease  # the server freed the lock with the session
    assert await advisory_locks(admin, lease.advisory_id) == 0


async def _hold_elsewhere(lock: PostgresAdvisoryLock, key: str) -> Any:
    import contextvars

    async def hold() -> Any:
        async with lock.hold(key, 5.0) as lease:
            return lease

    return await asyncio.get_running_loop().create_task(hold(), context=contextvars.Context())


class _DriverError(Exception):
    """Stands for a driver error SQLAlchemy passes through unwrapped (asyncpg's InternalClientError
    after the server ended an idle session, on SQLAlchemy 2.0.38)."""


class _BrokenExecute:
    """The lease's real connection, whose ``execute`` raises ``_DriverError``."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        raise _DriverError("cannot switch to state 11; another operation (2) is in progress")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_a_driver_error_at_release_discards_the_session_and_never_raises(
    lock: PostgresAdvisoryLock, admin: AsyncEngine
) -> None:
    async with lock.hold("k", 5.0) as lease:
        conn = lease._conn
        lease._conn = cast(Any, _BrokenExecute(conn))
    # the release did not raise; the session was ended instead, which frees the advisory lock
    async with asyncio.timeout(GUARD):
        while await advisory_locks(admin, lease.advisory_id):
            await asyncio.sleep(0.01)
    assert conn.closed


async def test_a_driver_error_at_the_check_marks_the_lease_lost(
    lock: PostgresAdvisoryLock,
) -> None:
    async with lock.hold("k", 0.6) as lease:
        lease._conn = cast(Any, _BrokenExecute(lease._conn))
        async with asyncio.timeout(GUARD):
            await lease.lost_event.wait()
        with pytest.raises(LockFailedError, match="session failed"):
            lease.raise_if_lost()


async def test_unreachable_postgres_fails_with_the_cause() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with PostgresAdvisoryLock(
        f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test", op_timeout=1.0
    ) as lock:
        async with asyncio.timeout(GUARD):
            with pytest.raises(LockFailedError) as caught:
                async with lock.hold("k", 5.0):
                    pass
    assert caught.value.__cause__ is not None


async def test_given_engine_is_not_disposed_and_gets_its_session_back_clean(postgres_url: str) -> None:
    engine = create_async_engine(postgres_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            before = (await conn.execute(text("SHOW idle_session_timeout"))).scalar_one()
        async with PostgresAdvisoryLock(engine) as lock, lock.hold("k", 5.0):
            assert cast(QueuePool, engine.pool).checkedout() == 1
        assert cast(QueuePool, engine.pool).checkedout() == 0
        async with engine.connect() as conn:  # the same pooled session the lock used
            assert (await conn.execute(text("SHOW idle_session_timeout"))).scalar_one() == before
    finally:
        await engine.dispose()


async def test_a_connect_the_timeout_cuts_leaves_no_session_behind(
    postgres_url: str, admin: AsyncEngine
) -> None:
    """``op_timeout`` also bounds making a new connection. When it ends the wait while SQLAlchemy's
    ``connect`` event runs (the dialect's set-up of a new connection), the new session is closed,
    not left open until the collector finds it (SQLAlchemy before 2.0.53 stranded it: an open
    session on the server until then, and a ``ResourceWarning`` from asyncpg when collected)."""
    name = f"asyncflow-test-{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(postgres_url, connect_args={"server_settings": {"application_name": name}})

    @event.listens_for(engine.sync_engine, "connect")
    def slow_setup(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.run_async(lambda _conn: asyncio.sleep(1.0))

    async def sessions() -> int:
        async with admin.connect() as conn:
            query = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name")
            return int((await conn.execute(query, {"name": name})).scalar_one())

    try:
        async with PostgresAdvisoryLock(engine, op_timeout=0.3) as lock:
            with pytest.raises(LockFailedError, match="did not answer"):
                async with lock.hold("k", 5.0):
                    pass
            async with asyncio.timeout(GUARD):  # its close may still be on its way to the server
                while await sessions():  # a stranded connection stays open until collected
                    await asyncio.sleep(0.01)
    finally:
        await engine.dispose()


def test_non_postgres_backends_are_refused() -> None:
    with pytest.raises(ParamInvalidError, match="PostgreSQL"):
        PostgresAdvisoryLock("sqlite+aiosqlite:///:memory:")


async def test_a_hold_that_acquires_while_the_lock_closes_leaves_no_session_behind(
    postgres_url: str, admin: AsyncEngine
) -> None:
    """``aclose()`` releases the leases it finds; one still being acquired meanwhile (its connection
    being opened) is not among them. It used to get its advisory lock all the same, and its release
    at the block's end was skipped (the lock was closed): the session stayed checked out, holding the
    lock. It fails now, like any hold on a closed lock, and its session goes back."""
    engine = create_async_engine(postgres_url)

    @event.listens_for(engine.sync_engine, "connect")
    def slow_setup(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.run_async(lambda _conn: asyncio.sleep(0.5))

    namespace = f"test:{uuid.uuid4().hex[:8]}:"
    ran = False

    async def hold() -> None:
        nonlocal ran
        async with lock.hold("k", 30.0):
            ran = True

    try:
        lock = PostgresAdvisoryLock(engine, namespace=namespace, op_timeout=5.0)
        holding = asyncio.create_task(hold())
        await asyncio.sleep(0.1)  # its connection is being set up
        await lock.aclose()
        with pytest.raises(LockFailedError, match="closed"):
            async with asyncio.timeout(GUARD):
                await holding
        assert not ran
        async with asyncio.timeout(GUARD):  # a discarded session's end may still be on its way
            while await advisory_locks(admin, advisory_lock_id(namespace + "k")):
                await asyncio.sleep(0.01)
        assert cast(QueuePool, engine.pool).checkedout() == 0
    finally:
        await engine.dispose()


async def test_a_lease_the_closed_lock_did_not_release_gives_its_session_back_at_the_block_s_end(
    postgres_url: str, admin: AsyncEngine
) -> None:
    """``aclose()`` releases the leases it still renews; one it no longer renews (lost, or suspended
    by the test hook, as if its renewal had failed) is released by its block's end, as the hook
    promises. That release used to be skipped once the lock was closed: the session stayed checked
    out, holding the advisory lock, until collected."""
    engine = create_async_engine(postgres_url)
    try:
        lock = PostgresAdvisoryLock(engine, namespace=f"test:{uuid.uuid4().hex[:8]}:")
        async with lock.hold("k", 30.0) as lease:
            lease._suspend_renewal()
            await lock.aclose()
            assert await advisory_locks(admin, lease.advisory_id) == 1  # still held by the block
        async with asyncio.timeout(GUARD):  # a discarded session's end may still be on its way
            while await advisory_locks(admin, lease.advisory_id):
                await asyncio.sleep(0.01)
        assert cast(QueuePool, engine.pool).checkedout() == 0
    finally:
        await engine.dispose()
