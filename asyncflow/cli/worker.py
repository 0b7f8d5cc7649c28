"""``asyncflow worker APP``: run a :class:`~asyncflow.driver.WorkflowDriver` until SIGINT or SIGTERM.

APP (``module:attribute``) gives a ``Registry`` (the worker builds the service on ``--db`` and
``--redis``) or a ready ``WorkflowService`` (used as it is: its own repo and lock). On the first signal the
driver stops claiming work, in-flight passes get ``--grace`` seconds, then they are cancelled (their
nodes stay resumable). A second signal stops at once: in-flight passes are cancelled now (their nodes
stay resumable). Further signals are reported and ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator

from .._held import wait_to_end
from ..driver import WorkflowDriver
from ..engine.service import WorkflowService
from ..errors import StoreError
from ..lock.local import LocalWorkflowLock
from ..records import QueryWorkflowInstanceParams
from ..store.sqlalchemy import SQLAlchemyWorkflowRepo
from ..store.tables import SCHEMA_VERSION
from .app import load_app
from .backend import open_service, redact
from .metrics import serve_metrics
from .purge import retaining

__all__ = ["GEN0_THRESHOLD", "run_worker", "settle_collector"]

logger = logging.getLogger("asyncflow.cli.worker")

GEN0_THRESHOLD = 10_000
"""The collector's first threshold in a worker process (Python's default: 700)."""


def settle_collector() -> None:
    """Tune the collector of a process that runs passes, once start-up is done.

    What start-up made (modules, definitions, the engine, the pool) lives as long as the process:
    frozen (``gc.freeze()``), it is left out of the full collections, which otherwise scan it all
    every time (a pause of tens of milliseconds every one or two thousand workflows). A pass that succeeds
    makes no reference cycles, so the young collections it triggers find nothing to free: a first threshold
    of :data:`GEN0_THRESHOLD` instead of 700 runs them about a tenth as often, and fewer of the objects
    of passes still in flight get promoted to be scanned again by the older generations. A higher
    threshold already set, or a collector turned off (threshold 0), is left as it is.
    """
    gc.collect()
    gc.freeze()
    first, *older = gc.get_threshold()
    if 0 < first < GEN0_THRESHOLD:
        gc.set_threshold(GEN0_THRESHOLD, *older)


@contextlib.asynccontextmanager
async def _service(args: argparse.Namespace) -> AsyncIterator[WorkflowService]:
    app = await load_app(args.app)
    if isinstance(app, WorkflowService):
        if args.db or args.redis:
            logger.warning(
                "%s is a WorkflowService with its own repo and lock: --db/--redis are ignored", args.app
            )
        yield app
        return
    async with open_service(args.db, args.redis, app) as svc:
        yield svc


def _describe(svc: WorkflowService, args: argparse.Namespace) -> str:
    repo = svc.repo
    where = redact(str(repo.engine.url)) if isinstance(repo, SQLAlchemyWorkflowRepo) else type(repo).__name__
    lock = type(svc.lock).__name__
    types = ", ".join(args.type) if args.type else ", ".join(svc.registry.workflow_types()) or "(none loaded)"
    return f"database {where}, lock {lock}, workflow types {types}, concurrency {args.concurrency}"


def _install_signals(stop: asyncio.Event, now: asyncio.Event) -> list[signal.Signals]:
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def on_signal(signum: signal.Signals) -> None:
        if now.is_set():
            logger.warning("received %s again: already stopping now", signum.name)
        elif stop.is_set():
            logger.warning(
                "received %s again: stopping now (cancelling in-flight passes; their nodes stay resumable)",
                signum.name,
            )
            now.set()
        else:
            logger.info(
                "received %s: stopping (in-flight passes finish first; again to stop at once)", signum.name
            )
            stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on the main thread/Windows
            continue
        installed.append(signum)
    return installed


async def _stop(driver: WorkflowDriver, grace: float, now: asyncio.Event) -> None:
    """``driver.stop(grace)``, cut short (grace 0: in-flight passes cancelled) when ``now`` is set.

    Cancelled itself, it cancels its two tasks and waits for them to end before the cancellation goes
    on: returning at once left them running after the worker had stopped (orphans).
    """
    stopping = asyncio.create_task(driver.stop(grace=grace), name="asyncflow-worker-stop")
    hurry = asyncio.create_task(now.wait(), name="asyncflow-worker-stop-now")
    try:
        await asyncio.wait({stopping, hurry}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            await driver.stop(grace=0)
        await stopping
    finally:
        hurry.cancel()
        stopping.cancel()
        await wait_to_end((stopping, hurry))


async def _check_schema_version(repo: SQLAlchemyWorkflowRepo) -> None:
    """Say when the database's schema is not this asyncflow's: the worker runs on, as it can (a role
    that may not read the version table gets a warning, not a refusal)."""
    try:
        recorded = await repo.schema_version()
    except StoreError as error:
        logger.warning("could not read the database's asyncflow schema version: %s", error)
        return
    if recorded < SCHEMA_VERSION:
        logger.warning(
            "the database has asyncflow schema version %d, older than this asyncflow's %d: run "
            "`asyncflow migrate` (until then what needs the newer versions fails, or runs the older way)",
            recorded,
            SCHEMA_VERSION,
        )
    elif recorded > SCHEMA_VERSION:
        logger.warning(
            "the database has asyncflow schema version %d, newer than this asyncflow's %d: a newer "
            "asyncflow migrated it; upgrade this worker",
            recorded,
            SCHEMA_VERSION,
        )


async def run_worker(args: argparse.Namespace) -> int:
    """Drive APP's workflows until a signal; returns 0 after a clean stop."""
    async with _service(args) as svc:
        svc.registry.preload_workflow_definitions()  # a broken config fails now, not on the first pass
        await svc.count_workflow_instances(QueryWorkflowInstanceParams())  # reachable, tables present
        repo = svc.repo
        if isinstance(repo, SQLAlchemyWorkflowRepo):
            await _check_schema_version(repo)
        shared = isinstance(repo, SQLAlchemyWorkflowRepo) and repo.shared_by_processes
        if isinstance(svc.lock, LocalWorkflowLock) and shared:  # an app's own service
            logger.warning(
                "the instance lock is local to this process; run one worker process per database, or "
                "give every process the same DatabaseWorkflowLock or RedisWorkflowLock"
            )
        driver = WorkflowDriver(
            svc,
            concurrency=args.concurrency,
            poll_interval=args.poll_interval,
            workflow_types=args.type or None,
        )
        stop, now = asyncio.Event(), asyncio.Event()
        installed = _install_signals(stop, now)
        settle_collector()
        logger.info("asyncflow worker started: %s", _describe(svc, args))
        try:
            async with (
                serve_metrics(driver, getattr(args, "metrics_port", None)),
                driver,
                retaining(svc, getattr(args, "retain", None)),
            ):
                await stop.wait()
                await _stop(driver, args.grace, now)
        finally:
            loop = asyncio.get_running_loop()
            for signum in installed:
                loop.remove_signal_handler(signum)
        stats = driver.stats
        summary = (
            f"asyncflow worker stopped: {stats.passes} passes, {stats.completed} completed, "
            f"{stats.failed} failed, {stats.errors} errors, {stats.lock_skips} lock skips"
        )
        print(summary, file=sys.stderr)
        await svc.aclose()
    return 0
