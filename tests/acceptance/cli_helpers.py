"""Helpers of the CLI acceptance tests: run ``python -m asyncflow`` in a subprocess, make scratch
PostgreSQL databases, and put instances of the demo workflow into known states."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from asyncflow.demo.order import WORKFLOW_TYPE, make_registry, sample_order
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import NodeExternalEvent
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENV_VARS = ("ASYNCFLOW_DB_URL", "ASYNCFLOW_REDIS_URL")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout importable, no inherited ASYNCFLOW_* URLs."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_cli(
    *args: str, cwd: pathlib.Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m asyncflow ARGS`` (text output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "asyncflow", *args],
        cwd=cwd,
        env=env if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass(frozen=True)
class Result:
    """What a CLI call returned (the shape of ``subprocess.CompletedProcess``)."""

    returncode: int
    stdout: str
    stderr: str


def call_cli(*args: str, cwd: pathlib.Path) -> Result:
    """``asyncflow ARGS`` in this process (fast): same parser, same code paths, output captured.

    ``ASYNCFLOW_*`` variables are hidden for the call; the cwd is ``cwd``.
    """
    from asyncflow.cli import main

    saved = {k: os.environ.pop(k) for k in ENV_VARS if k in os.environ}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.environ.update(saved)
    return Result(code, out.getvalue(), err.getvalue())


def assert_clean_error(result: Result | subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """Exit ``code``, one ``asyncflow: error:`` line naming ``fragments``, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert (lines and lines[-1].startswith("asyncflow: error: ")) or "usage:" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


async def _admin(postgres_url: str, statement: str) -> None:
    engine = create_async_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


@contextlib.contextmanager
def scratch_database(postgres_url: str, name: str) -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); yields its URL (password included)."""
    asyncio.run(_admin(postgres_url, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass(frozen=True)
class Instances:
    """Ids of demo-workflow instances in known states."""

    fresh: int  # init: never run
    waiting: int  # running: manager_approval waits for its event; charge_payment failed once
    completed: int
    failed: int  # blocked by the manager (a decision flagged as fraud)


async def _populate(url: str) -> Instances:
    repo = SQLAlchemyWorkflowRepo(url)
    try:
        await repo.create_schema()
        svc = WorkflowService(repo, LocalWorkflowLock(), make_registry())
        ids = []
        for number in range(1, 5):
            inst = await svc.create_workflow(
                WORKFLOW_TYPE, f"ORD-{number:05d}", context=sample_order(number, 3)
            )
            ids.append(inst.id)
        fresh, waiting, completed, failed = ids
        await svc.run_workflow(waiting)  # charge_payment fails once; approval waits
        for instance_id, approved in ((completed, True), (failed, False)):
            for _ in range(3):  # charge_payment succeeds on its third attempt
                await svc.run_workflow(instance_id)
            content = {
                "approved": approved,
                "fraud": not approved,  # a plain rejection would take the refund branch and complete
                "by": "test",
                "reason": None if approved else "too expensive",
            }
            await svc.add_node_external_event(instance_id, "manager_approval", NodeExternalEvent(1, content))
            await svc.run_workflow(instance_id)
        return Instances(fresh=fresh, waiting=waiting, completed=completed, failed=failed)
    finally:
        await repo.aclose()


def populate(url: str) -> Instances:
    """Create the schema and four demo instances in the states :class:`Instances` names."""
    return asyncio.run(_populate(url))
