"""Fixtures for engine tests: a repo per backend (memory, SQLite file, PostgreSQL) and locks."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import POSTGRES_URL_ENV, REDIS_URL_ENV, isolated_pg_engine

BACKENDS = ["memory", "sqlite", "postgres"]


@pytest.fixture(params=BACKENDS)
async def engine_repo(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    """A fresh, empty repo with its schema, on each backend."""
    backend = request.param
    if backend == "memory":
        yield MemoryWorkflowRepo()
        return
    if backend == "sqlite":
        repo = SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/engine.db")
        await repo.create_schema()
        try:
            yield repo
        finally:
            await repo.aclose()
        return
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set (.ci/run sets it)")
    async with isolated_pg_engine(url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        try:
            yield repo
        finally:
            await repo.aclose()


@pytest.fixture
async def local_lock() -> AsyncIterator[LocalWorkflowLock]:
    lock = LocalWorkflowLock()
    try:
        yield lock
    finally:
        await lock.aclose()


@pytest.fixture(params=["local", "redis"])
async def any_lock(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """The local lock and the Redis lock (private key prefix per test)."""
    if request.param == "local":
        lock: Any = LocalWorkflowLock()
    else:
        url = os.environ.get(REDIS_URL_ENV)
        if not url:
            pytest.skip(f"{REDIS_URL_ENV} is not set (.ci/run sets it)")
        from asyncflow.lock.redis import RedisWorkflowLock

        lock = RedisWorkflowLock(url, prefix=f"asyncflow-test:{uuid.uuid4().hex[:8]}:")
    try:
        yield lock
    finally:
        await lock.aclose()


@pytest.fixture
async def pg_repo(pg_engine: Any) -> AsyncIterator[SQLAlchemyWorkflowRepo]:
    """A PostgreSQL repo with its schema in a fresh, private schema of the test database."""
    made = SQLAlchemyWorkflowRepo(pg_engine)
    await made.create_schema()
    yield made
    await made.aclose()
