"""Running asyncflow workflows under measurement, in the two modes of the benchmark.

* ``direct``: ``concurrency`` tasks each call ``create_workflow(..., run=True)`` (then ``run_workflow``
  until the instance is over, sending the approval event first where the scenario needs one) for the
  next workflow, until ``n`` are done. Latency is the duration of those calls.
* ``driver``: ``n`` instances are created first (``create_workflow`` at ``concurrency``, or the repo's
  bulk insert), then one ``WorkflowDriver(concurrency=...)`` drives them. Throughput is ``n`` over the
  driving time; latency runs from each instance's creation to its last node's ``run`` (a stride sample).

Each row first runs one workflow per caller (``warm-<i>``, not timed, not counted), as the floor runs
one per connection, so its latency figures are those of the steady state.

With ``backlog`` (``--backlog N``), ``N`` due instances of the scenario's type are created before the
timed part (and outside the CPU and memory probe). Direct mode leaves them queued while it runs its
``n`` workflows; driver mode creates nothing more and times a driver (``async with``) until ``n``
instances have completed out of that queue, so every claim sees at least ``N - n`` due rows (no latency
is sampled: it would be the time spent queued).

:func:`run_direct` and :func:`run_driver` take any service and workflow type, so a user can benchmark
their own workflows the same way (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import asyncflow as af
from asyncflow._held import holds_cancellation, is_held
from asyncflow.cli.worker import settle_collector
from asyncflow.driver import WorkflowDriver
from asyncflow.records import NewWorkflowInstance

from .backends import BenchmarkError, make_lock, open_backend
from .databases import PgAdmin
from .harness import LatencySampler, ResourceProbe, RunMeasurement
from .isolated import print_result, run_module
from .observers import make_observers
from .scenarios import BenchHooks, ScenarioSpec, build_registry, get_scenario

__all__ = [
    "AsyncflowRun",
    "BenchmarkError",
    "run_asyncflow_isolated",
    "run_asyncflow_once",
    "run_direct",
    "run_driver",
]

_TERMINAL = frozenset({"completed", "failed", "canceled"})
_MAX_PASSES = 50
_CREATE_BATCH = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class AsyncflowRun:
    """What one asyncflow row runs."""

    scenario: str
    mode: str  # "direct" | "driver"
    backend: str  # "postgres" | "sqlite" | "memory"
    lock: str  # "local" | "redis" | "database"
    n: int
    concurrency: int
    poll_interval: float = 0.05
    create: str = "service"  # driver mode: "service" (create_workflow) | "bulk" (repo bulk insert)
    pool_size: int | None = None  # PostgreSQL pool: None = concurrency (+4), 0 = SQLAlchemy's default
    timeout_s: float | None = None  # None: 120 s plus 50 ms per workflow (a run below 20 wf/s is stuck)
    observer: str = "none"  # the service's observers: none, noop, prometheus or otel (observers.py)
    visible_after: float | None = None  # the service's visible_after
    backlog: int = 0  # due instances created before the timed part
    backlog_create: str = "bulk"  # "bulk" (repo bulk insert) | "service" (create_workflow)
    gc_freeze: bool = False  # settle_collector() once set up (the backlog loaded), before the timed part

    @property
    def deadline_s(self) -> float:
        return self.timeout_s if self.timeout_s is not None else 120.0 + 0.05 * self.n

    @property
    def process_deadline_s(self) -> float:
        """The subprocess's own limit: the timed part's, plus time to load the backlog (>= 500/s)."""
        return self.deadline_s + self.backlog / 500


def _count_steps(repo: Any) -> list[int]:
    """Count ``repo.apply_step`` calls (the engine's step writes) in ``[0]``, whatever the backend groups.

    The counter keeps the repo's :func:`~asyncflow._held.holds_cancellation` mark: it only delegates, and
    without the mark the engine would run every step in a task of its own (``run_held``), a path the
    measured repo does not take."""
    counter = [0]
    apply_step = repo.apply_step

    async def counted(step: Any) -> Any:
        counter[0] += 1
        return await apply_step(step)

    repo.apply_step = holds_cancellation(counted) if is_held(apply_step) else counted
    return counter


def _approval_event() -> af.NodeExternalEvent:
    return af.NodeExternalEvent(event_ts=1, event_content={"approved": True})


async def _finish(svc: af.WorkflowService, spec: ScenarioSpec | None, instance: Any) -> str:
    """Run passes until the instance is over (approving first if needed); its final status."""
    status = str(instance.status)
    approved = False
    passes = 0
    while status not in _TERMINAL:
        if passes >= _MAX_PASSES:
            raise BenchmarkError(f"instance {instance.id} still {status!r} after {passes} extra passes")
        if spec is not None and spec.approval_node is not None and not approved:
            await svc.add_node_external_event(
                instance.id, spec.approval_node, _approval_event(), timeout=10.0
            )
            approved = True
        instance = await svc.run_workflow(instance.id)
        status = str(instance.status)
        passes += 1
    return status


async def run_direct(
    svc: af.WorkflowService,
    workflow_type: str,
    n: int,
    concurrency: int,
    *,
    spec: ScenarioSpec | None = None,
    sampler: LatencySampler | None = None,
    prefix: str = "bench",
) -> float:
    """Complete ``n`` workflows (``<prefix>-<i>``) with ``concurrency`` concurrent
    ``create_workflow(run=True)`` callers.

    Returns the elapsed seconds. Raises :class:`BenchmarkError` if an instance ends other than
    ``completed``.
    """
    sampler = sampler if sampler is not None else LatencySampler(n)
    indexes = iter(range(n))

    async def worker() -> None:
        for i in indexes:
            start = time.perf_counter()
            instance = await svc.create_workflow(workflow_type, f"{prefix}-{i}", run=True)
            status = await _finish(svc, spec, instance)
            if status != "completed":
                raise BenchmarkError(f"instance {instance.id} of {workflow_type} ended {status!r}")
            if sampler.wants(i):
                sampler.add(time.perf_counter() - start)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for slot in range(min(concurrency, n)):
            group.create_task(worker(), name=f"bench-direct-{slot}")
    return time.perf_counter() - start


async def _create_all(
    svc: af.WorkflowService,
    repo: Any,
    workflow_type: str,
    n: int,
    concurrency: int,
    sampler: LatencySampler | None,
    bulk: bool,
    prefix: str = "bench",
) -> None:
    """Create ``n`` instances ``<prefix>-<i>``: bulk through ``repo`` or by ``concurrency`` callers of
    ``create_workflow``; ``sampler`` (if any) learns when its sampled ones were created."""
    if bulk:
        for first in range(0, n, _CREATE_BATCH):
            batch = range(first, min(n, first + _CREATE_BATCH))
            news = [
                NewWorkflowInstance(
                    workflow_type=workflow_type, business_id=f"{prefix}-{i}", workflow_context={}
                )
                for i in batch
            ]
            ids = await repo.create_workflow_instances(news)
            if sampler is not None:
                now = time.perf_counter()
                for i, instance_id in zip(batch, ids, strict=True):
                    if sampler.wants(i):
                        sampler.started(instance_id, now)
        return
    indexes = iter(range(n))

    async def worker() -> None:
        for i in indexes:
            instance = await svc.create_workflow(workflow_type, f"{prefix}-{i}")
            if sampler is not None and sampler.wants(i):
                sampler.started(instance.id, time.perf_counter())

    async with asyncio.TaskGroup() as group:
        for slot in range(min(concurrency, n)):
            group.create_task(worker(), name=f"{prefix}-create-{slot}")


async def preload_backlog(
    svc: af.WorkflowService, repo: Any, workflow_type: str, count: int, concurrency: int, *, bulk: bool
) -> float:
    """Create ``count`` due instances of ``workflow_type`` (``backlog-<i>``); the seconds it took."""
    start = time.perf_counter()
    await _create_all(svc, repo, workflow_type, count, concurrency, None, bulk, prefix="backlog")
    return time.perf_counter() - start


async def run_driver_backlog(
    svc: af.WorkflowService,
    workflow_type: str,
    n: int,
    concurrency: int,
    *,
    hooks: BenchHooks,
    poll_interval: float = 0.05,
    approval_node: str | None = None,
) -> tuple[float, Any]:
    """Drive an already queued backlog until ``n`` instances completed; ``(seconds, driver.stats)``.

    The driver is then stopped (passes still running finish within its stop grace).
    """
    driver = WorkflowDriver(
        svc, concurrency=concurrency, poll_interval=poll_interval, workflow_types=[workflow_type]
    )
    start = time.perf_counter()
    if approval_node is not None:
        senders = max(1, concurrency // 4)
        await _approve_while_driving(svc, driver, hooks, n, approval_node, senders)
        return time.perf_counter() - start, driver.stats
    enough = asyncio.Event()
    count = 0
    previous = hooks.on_completed

    def completed(instance_id: int, at: float) -> None:
        nonlocal count
        if previous is not None:
            previous(instance_id, at)
        count += 1
        if count >= n:
            enough.set()

    hooks.on_completed = completed
    async with driver:
        await enough.wait()
        elapsed = time.perf_counter() - start
    return elapsed, driver.stats


async def _approve_while_driving(
    svc: af.WorkflowService, driver: WorkflowDriver, hooks: BenchHooks, n: int, node: str, senders: int
) -> None:
    """Drive in the background, approving each instance as its approval node is found waiting."""
    waiting: asyncio.Queue[int | None] = asyncio.Queue()
    done: set[int] = set()
    all_done = asyncio.Event()
    previous = hooks.on_completed

    def completed(instance_id: int, at: float) -> None:
        if previous is not None:
            previous(instance_id, at)
        done.add(instance_id)
        if len(done) >= n:
            all_done.set()

    hooks.on_completed = completed
    hooks.on_waiting = waiting.put_nowait

    async def sender() -> None:
        while (instance_id := await waiting.get()) is not None:
            await svc.add_node_external_event(instance_id, node, _approval_event(), timeout=10.0)

    async with driver, asyncio.TaskGroup() as group:
        for slot in range(senders):
            group.create_task(sender(), name=f"bench-approver-{slot}")
        await all_done.wait()
        for _ in range(senders):
            waiting.put_nowait(None)


async def run_driver(
    svc: af.WorkflowService,
    workflow_type: str,
    n: int,
    concurrency: int,
    *,
    hooks: BenchHooks,
    poll_interval: float = 0.05,
    sampler: LatencySampler | None = None,
    repo: Any = None,
    approval_node: str | None = None,
    workflow_types: tuple[str, ...] = (),
    after_create: Callable[[], Awaitable[None]] | None = None,
) -> tuple[float, float, Any]:
    """Create ``n`` instances, then drive them with one ``WorkflowDriver(concurrency=concurrency)``.

    ``hooks`` must be the ones the workflow's last node reports to. With ``repo`` the instances are
    bulk-inserted. ``after_create`` runs between the two, timed by neither. Returns
    ``(create_seconds, drive_seconds, driver.stats)``.
    """
    sampler = sampler if sampler is not None else LatencySampler(n)
    previous = hooks.on_completed

    def completed(instance_id: int, at: float) -> None:
        if previous is not None:
            previous(instance_id, at)
        sampler.completed(instance_id, at)

    hooks.on_completed = completed
    start = time.perf_counter()
    await _create_all(svc, repo, workflow_type, n, concurrency, sampler, bulk=repo is not None)
    create_s = time.perf_counter() - start
    if after_create is not None:
        await after_create()
    driver = WorkflowDriver(
        svc,
        concurrency=concurrency,
        poll_interval=poll_interval,
        workflow_types=list(workflow_types or (workflow_type,)),
    )
    start = time.perf_counter()
    if approval_node is None:
        await driver.run_until_idle()
    else:
        senders = max(1, min(concurrency, n) // 4)
        await _approve_while_driving(svc, driver, hooks, n, approval_node, senders)
    drive_s = time.perf_counter() - start
    return create_s, drive_s, driver.stats


async def _warm_up(svc: af.WorkflowService, spec: ScenarioSpec, concurrency: int) -> int:
    """Run one workflow per caller (``warm-<i>``, ``create_workflow(run=True)``) before the timed part,
    as the floor runs one per connection: connections opened, statements and the step functions'
    plans prepared, so latency figures are the steady state's. Returns how many completed (the
    count of completed instances leaves them out). Not for the children scenario (its parents need a
    driver): none there."""
    if spec.children:
        return 0
    count = max(1, concurrency)
    await run_direct(svc, spec.workflow_type, count, count, spec=spec, prefix="warm")
    return count


async def _count_completed(svc: af.WorkflowService, workflow_type: str) -> int:
    params = af.QueryWorkflowInstanceParams(workflow_type_in=(workflow_type,), status_in=("completed",))
    return int(await svc.count_workflow_instances(params))


async def _measured(
    run: AsyncflowRun,
    spec: ScenarioSpec,
    svc: af.WorkflowService,
    repo: Any,
    hooks: BenchHooks,
    sampler: LatencySampler,
    extra: dict[str, Any],
) -> tuple[float, float]:
    """The timed part of a run: ``(setup_seconds, measured_seconds)``, bounded by ``run.deadline_s``."""
    try:
        async with asyncio.timeout(run.deadline_s):
            if run.mode == "driver" and run.backlog:
                elapsed, stats = await run_driver_backlog(
                    svc,
                    spec.workflow_type,
                    run.n,
                    run.concurrency,
                    hooks=hooks,
                    poll_interval=run.poll_interval,
                    approval_node=spec.approval_node,
                )
                setup_s = 0.0
                extra["driver_stats"] = {
                    name: getattr(stats, name, None)
                    for name in ("passes", "completed", "failed", "errors", "lock_skips")
                }
            elif run.mode == "direct":
                elapsed = await run_direct(
                    svc, spec.workflow_type, run.n, run.concurrency, spec=spec, sampler=sampler
                )
                setup_s = 0.0
            elif run.mode == "driver":
                setup_s, elapsed, stats = await run_driver(
                    svc,
                    spec.workflow_type,
                    run.n,
                    run.concurrency,
                    hooks=hooks,
                    poll_interval=run.poll_interval,
                    sampler=sampler,
                    repo=repo if run.create == "bulk" else None,
                    approval_node=spec.approval_node,
                    workflow_types=spec.workflow_types,
                )
                extra["driver_stats"] = {
                    name: getattr(stats, name, None)
                    for name in ("passes", "completed", "failed", "errors", "lock_skips")
                }
            else:
                raise ValueError(f"unknown mode {run.mode!r}: direct or driver")
    except TimeoutError:
        raise BenchmarkError(
            f"{run.scenario}/{run.mode} did not finish within {run.deadline_s:.0f} s"
        ) from None
    return setup_s, elapsed


async def run_asyncflow_once(
    run: AsyncflowRun, *, pg_admin: PgAdmin | None = None, redis_url: str | None = None
) -> RunMeasurement:
    """One measured run of an asyncflow row on a fresh database (or file, or memory repo)."""
    spec = get_scenario(run.scenario)
    hooks = BenchHooks()
    registry = build_registry(spec, hooks)
    sampler = LatencySampler(run.n)
    extra: dict[str, Any] = {}
    pool_size = run.concurrency if run.pool_size is None else run.pool_size
    backend = open_backend(run.backend, run.scenario, pg_admin, pool_size=pool_size)
    async with backend as (make_repo, read_commits):
        repo = make_repo()
        lock = make_lock(run.lock, redis_url, repo)
        try:
            svc = af.WorkflowService(
                repo,
                lock,
                registry=registry,
                observers=make_observers(run.observer),
                visible_after=run.visible_after,
            )
            if run.backlog:
                extra["backlog_s"] = round(
                    await preload_backlog(
                        svc,
                        repo,
                        spec.workflow_type,
                        run.backlog,
                        run.concurrency,
                        bulk=run.backlog_create == "bulk",
                    ),
                    3,
                )
            warm = await _warm_up(svc, spec, run.concurrency)
            warm_commits, warm_writes = await read_commits(final=False)
            if run.gc_freeze:  # as asyncflow worker does once it is set up
                settle_collector()
            steps = _count_steps(repo)
            with ResourceProbe() as probe:
                setup_s, elapsed = await _measured(run, spec, svc, repo, hooks, sampler, extra)
            extra["steps"] = steps[0]  # pass steps the engine applied (logical writes; creates not counted)
            completed = await _count_completed(svc, spec.workflow_type) - warm
        finally:
            await repo.aclose()
            if hasattr(lock, "aclose"):
                await lock.aclose()
        commits, write_commits = await read_commits()
    if commits is not None and warm_commits is not None:
        commits -= warm_commits
    if write_commits is not None and warm_writes is not None:
        write_commits -= warm_writes
    if completed != run.n and not (run.mode == "driver" and run.backlog and completed >= run.n):
        raise BenchmarkError(f"{run.scenario}/{run.mode}: {completed} of {run.n} instances completed")
    if run.mode == "driver" and sampler.open_count:
        extra["latency_samples_missing"] = sampler.open_count
    return RunMeasurement(
        n=run.n,
        elapsed_s=elapsed,
        cpu_s=probe.cpu_s,
        peak_rss_bytes=probe.peak_rss_bytes,
        latencies_s=sampler.latencies(),
        commits=commits,
        write_commits=write_commits,
        setup_s=setup_s,
        extra=extra,
    )


async def run_asyncflow_isolated(
    run: AsyncflowRun, *, pg_url: str | None = None, redis_url: str | None = None
) -> RunMeasurement:
    """:func:`run_asyncflow_once` in a subprocess of its own, killed past ``run.deadline_s + 60`` s."""
    args = ["--run", json.dumps(asdict(run))]
    if pg_url:
        args += ["--pg-url", pg_url]
    if redis_url:
        args += ["--redis-url", redis_url]
    pg_admin = PgAdmin(pg_url) if pg_url else None
    return await run_module(
        "benchmarks.asyncflow_runs", args, timeout_s=run.process_deadline_s + 60, pg_admin=pg_admin
    )


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.asyncflow_runs")
    parser.add_argument("--run", required=True, help="an AsyncflowRun as JSON")
    parser.add_argument("--pg-url")
    parser.add_argument("--redis-url")
    args = parser.parse_args(argv)
    run = AsyncflowRun(**json.loads(args.run))
    pg_admin = PgAdmin(args.pg_url) if args.pg_url else None
    print_result(asyncio.run(run_asyncflow_once(run, pg_admin=pg_admin, redis_url=args.redis_url)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
