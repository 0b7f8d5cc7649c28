"""Shared by the dashboard tests: two small workflows, a seeded database and the app a browser sees.

* ``approval``: ``prepare`` then ``approve``, which waits for an external event ``{"ok": true}``.
* ``doomed``: ``explode`` fails the workflow with a message full of HTML.

``make_app`` (a uvicorn factory) serves ``/wf`` = the dashboard with actions allowed to requests that
carry the cookie ``operator=yes``, and runs a driver, so instances progress while a browser watches.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver
from asyncflow.engine.rules import SchedulePolicy
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import TaskFailedTerminate, TaskNotReady
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.registry import Registry
from asyncflow.status import NODE_EVENT
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.web import dashboard
from asyncflow.worker import NormalTaskWorker

DB_ENV = "ASYNCFLOW_TEST_DASHBOARD_DB"
EVIL = "<script>alert('x')</script><img src=x onerror=alert(1)>"


async def _prepare(ctx: JSONContext) -> None:
    ctx.set(["prepared"], True)


async def _ask(ctx: JSONContext) -> None:
    ctx.set(["asked"], True)


async def _decision(ctx: JSONContext) -> None:
    content, ok = ctx.get(NODE_EVENT, "event_content")
    if not ok or not isinstance(content, dict) or not content.get("ok"):
        raise TaskNotReady("waiting for the approval event")
    ctx.set(["approved"], True)


async def _explode(ctx: JSONContext) -> None:
    raise TaskFailedTerminate(f"boom {EVIL}")


def make_registry() -> Registry:
    registry = Registry()
    registry.load_workflow_config(
        WorkflowConfig(
            id="approval",
            name="Approval",
            nodes=(
                NodeConfig(id="prepare", name="Prepare", next_nodes=("approve",)),
                NodeConfig(id="approve", name="Approve", max_wait_time_ts=3600),
            ),
        )
    )
    registry.register_workflow_task("approval", "prepare", NormalTaskWorker(run=_prepare))
    registry.register_workflow_task("approval", "approve", NormalTaskWorker(run=_ask, wait_check=_decision))
    registry.load_workflow_config(
        WorkflowConfig(id="doomed", name="Doomed", nodes=(NodeConfig(id="explode", name="Explode"),))
    )
    registry.register_workflow_task("doomed", "explode", NormalTaskWorker(run=_explode))
    return registry


def make_service(target: Any) -> WorkflowService:
    """A service on ``target``: a database URL, or an engine (left open)."""
    repo = SQLAlchemyWorkflowRepo(target)
    return WorkflowService(
        repo, LocalWorkflowLock(), make_registry(), schedule=SchedulePolicy(poll_interval=0.2)
    )


@dataclass(frozen=True)
class Seeded:
    waiting: int  # approval, pending on its event
    failed: int  # doomed
    evil: int  # approval with an HTML business id and context, pending
    others: tuple[int, ...]  # approval instances, pending


async def seed(target: Any, extra: int = 3) -> Seeded:
    """Create the schema and instances in known states (each has had its first pass)."""
    svc = make_service(target)
    try:
        await svc.repo.create_schema()
        waiting = await svc.create_workflow("approval", "order-1", context={"amount": 5}, run=True)
        failed = await svc.create_workflow("doomed", "order-2", run=True)
        evil = await svc.create_workflow("approval", EVIL, context={"note": EVIL}, run=True)
        others = [(await svc.create_workflow("approval", f"bulk-{i}", run=True)).id for i in range(extra)]
        return Seeded(waiting.id, failed.id, evil.id, tuple(others))
    finally:
        await svc.repo.aclose()


async def operator_only(request: Request, action: str) -> bool:
    """The test's ``authorize``: only requests with the cookie ``operator=yes`` may act."""
    return request.cookies.get("operator") == "yes"


def make_app() -> Starlette:
    """The app a browser test serves (uvicorn ``--factory``); the database comes from ``DB_ENV``."""
    svc = make_service(os.environ[DB_ENV])

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        try:
            async with WorkflowDriver(svc, poll_interval=0.2):
                yield
        finally:
            await svc.repo.aclose()

    board = dashboard(svc, read_only=False, authorize=operator_only, refresh_seconds=1)
    return Starlette(routes=[Mount("/wf", board)], lifespan=lifespan)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
