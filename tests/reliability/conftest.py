"""Fixtures of the reliability tests: a repo per backend, private Redis servers, free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import POSTGRES_URL_ENV, isolated_pg_engine


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set (.ci/run sets it)")
    return url


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def repo(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    """A fresh, empty repo with its schema, on each backend."""
    if request.param == "memory":
        yield MemoryWorkflowRepo()
        return
    if request.param == "sqlite":
        sql_repo = SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/reliability.db")
        await sql_repo.create_schema()
        try:
            yield sql_repo
        finally:
            await sql_repo.aclose()
        return
    async with isolated_pg_engine(_postgres_url()) as engine:
        sql_repo = SQLAlchemyWorkflowRepo(engine)
        await sql_repo.create_schema()
        try:
            yield sql_repo
        finally:
            await sql_repo.aclose()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of our own on a free loopback port, which a test may stop and start again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the server and wait until it answers PING."""
        assert self.process is None, "already running"
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not on PATH")
        self.process = await asyncio.create_subprocess_exec(
            *(exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--daemonize", "no", "--loglevel", "warning"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(200):  # a bound on the attempts, 10 ms apart
            if await self._answers():
                return
            await asyncio.sleep(0.01)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    async def _answers(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await reader.readline()).startswith(b"+PONG")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def stop(self) -> None:
        """Kill the server (SIGKILL: an outage, not a shutdown) and reap it."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            await process.wait()


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    """A private redis-server (never the shared one), stopped at the end of the test."""
    server = PrivateRedis(free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The PostgreSQL URL (skips without one)."""
    yield _postgres_url()
