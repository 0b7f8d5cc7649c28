"""Traces across processes: an instance created with a request span current in one process, driven by
a ``WorkflowDriver`` in another process on the same SQLite file or PostgreSQL schema: the node spans
exported by the driver process belong to the request's trace, under the request's span."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import uuid
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import asyncflow as af
from tests.conftest import POSTGRES_URL_ENV

from ._otel_child import traced_service

ROOT = pathlib.Path(__file__).resolve().parents[2]


async def _create_in_a_request(url: str, schema: str) -> tuple[Any, list[int]]:
    """This process: two instances created inside one request span; returns the span and the ids."""
    svc, provider, exporter = traced_service(url, schema)
    repo = svc.repo
    assert isinstance(repo, af.SQLAlchemyWorkflowRepo)
    try:
        await repo.create_schema()
        with provider.get_tracer("api").start_as_current_span("POST /traced"):
            ids = [(await svc.create_workflow("traced", f"order-{n}")).id for n in range(2)]
        untraced = await svc.create_workflow("traced", "batch-job")  # no span current: a trace of its own
    finally:
        await repo.aclose()
        await repo.engine.dispose()
    (request,) = exporter.get_finished_spans()
    return request, [*ids, untraced.id]


def _drive_elsewhere(url: str, schema: str) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration._otel_child", url, schema],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _check(request: Any, ids: list[int], spans: list[dict[str, Any]]) -> None:
    by_instance: dict[int, list[dict[str, Any]]] = {}
    for span in spans:
        by_instance.setdefault(span["attributes"]["asyncflow.instance_id"], []).append(span)
    assert sorted(by_instance) == sorted(ids)
    traced, untraced = ids[:2], ids[2]
    for instance_id in traced:
        nodes = by_instance[instance_id]
        assert sorted(s["attributes"]["asyncflow.task_type"] for s in nodes) == ["A", "B"]
        for span in nodes:
            assert span["trace_id"] == request.context.trace_id
            assert span["parent_id"] == request.context.span_id
            assert span["attributes"]["asyncflow.outcome"] == "completed"
    for span in by_instance[untraced]:
        assert span["trace_id"] != request.context.trace_id
        assert span["parent_id"] is None


def test_sqlite_driver_process_joins_the_creating_trace(tmp_path: pathlib.Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/traced.db"
    request, ids = asyncio.run(_create_in_a_request(url, ""))
    _check(request, ids, _drive_elsewhere(url, ""))


@pytest.mark.postgres
def test_postgres_driver_process_joins_the_creating_trace() -> None:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    schema = f"t_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        admin_engine = create_async_engine(url)
        try:
            async with admin_engine.begin() as conn:
                await conn.execute(text(sql))
        finally:
            await admin_engine.dispose()

    asyncio.run(admin(f'CREATE SCHEMA "{schema}"'))
    try:
        request, ids = asyncio.run(_create_in_a_request(url, schema))
        _check(request, ids, _drive_elsewhere(url, schema))
    finally:
        asyncio.run(admin(f'DROP SCHEMA "{schema}" CASCADE'))
