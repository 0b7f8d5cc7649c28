"""Shared fixtures: service URLs and isolated PostgreSQL schemas.

PostgreSQL and Redis tests read ``ASYNCFLOW_TEST_POSTGRES_URL`` (a ``postgresql+asyncpg://`` URL) and
``ASYNCFLOW_TEST_REDIS_URL``. ``.ci/run`` always sets both, so in CI those tests never skip; on a
developer machine without them they are skipped with the reason shown.

``ASYNCFLOW_TEST_EAGER_TASKS=1`` (Python 3.12+; ``nox -s newest`` sets it) runs every test's event
loop with ``asyncio.eager_task_factory``, as an application may: a new task then runs at once, up to
its first real wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

POSTGRES_URL_ENV = "ASYNCFLOW_TEST_POSTGRES_URL"
REDIS_URL_ENV = "ASYNCFLOW_TEST_REDIS_URL"
EAGER_TASKS_ENV = "ASYNCFLOW_TEST_EAGER_TASKS"


def pytest_configure(config: pytest.Config) -> None:
    """Eager tasks in every event loop of the test process when ``ASYNCFLOW_TEST_EAGER_TASKS=1``."""
    if os.environ.get(EAGER_TASKS_ENV) == "1":
        if sys.version_info < (3, 12):
            raise pytest.UsageError(f"{EAGER_TASKS_ENV}=1 needs Python 3.12 or newer")

        class EagerTasksPolicy(asyncio.DefaultEventLoopPolicy):
            """New event loops start their tasks eagerly."""

            def new_event_loop(self) -> asyncio.AbstractEventLoop:
                loop = super().new_event_loop()
                loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
                return loop

        asyncio.set_event_loop_policy(EagerTasksPolicy())


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set (.ci/run sets it)")
    return url


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        pytest.skip(f"{REDIS_URL_ENV} is not set (.ci/run sets it)")
    return url


@contextlib.asynccontextmanager
async def isolated_pg_engine(
    postgres_url: str, *, application_name: str | None = None, **kwargs: Any
) -> AsyncIterator[Any]:
    """An AsyncEngine whose connections use a fresh, private schema (dropped afterwards) and, if given,
    ``application_name`` (to tell its sessions from others' in ``pg_stat_activity``)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(postgres_url)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    options: dict[str, Any] = {"pool_size": 20, "max_overflow": 20}
    options.update(kwargs)
    settings = {"search_path": schema}
    if application_name is not None:
        settings["application_name"] = application_name
    engine = create_async_engine(postgres_url, connect_args={"server_settings": settings}, **options)
    try:
        yield engine
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


@pytest.fixture
async def pg_engine(postgres_url: str) -> AsyncIterator[Any]:
    """An AsyncEngine whose connections use a fresh, private schema (dropped afterwards)."""
    async with isolated_pg_engine(postgres_url) as engine:
        yield engine


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    """A fresh SQLite file per test."""
    return f"sqlite+aiosqlite:///{tmp_path}/asyncflow.db"  # type: ignore[str-bytes-safe]
