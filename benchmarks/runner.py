"""The benchmark matrix: which rows to run, in which order, and what to do when a service is missing.

Repeats are interleaved (round-robin over the rows) so a passing disturbance on the machine spreads
over every row instead of sinking one. A row whose service or package is missing is skipped with the
reason; a row that fails is reported as failed; neither stops the other rows.
"""

from __future__ import annotations

import itertools
import logging
import os
import shlex
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import report
from .databases import PgAdmin, check_postgres, check_redis, sqlite_file
from .harness import RunMeasurement
from .observers import observers_unavailable
from .reference_dbos import DBOS_SHAPES, dbos_version, run_dbos_once
from .reference_floor import run_floor_postgres, run_floor_sqlite

log = logging.getLogger(__name__)

__all__ = [
    "ALL_SCENARIOS",
    "EXTRA_SCENARIOS",
    "SLOW_SCENARIOS",
    "BenchOptions",
    "asyncflow_unavailable",
    "run_benchmarks",
    "scenario_unavailable",
]

ALL_SCENARIOS = ("linear3", "linear3-wait", "diamond", "approval", "branch")
SLOW_SCENARIOS = ("slow2",)
"""Named only, never part of ``--scenario all``: a node that works for 2 s (``visible_after``'s writes)."""
EXTRA_SCENARIOS = ("fanout-children",)
"""Scenarios run only when named (``--scenario fanout-children``), never by ``all`` or ``none``: a
``fanout-children`` workflow is 20 child workflows, so its rows take about 20 times as long."""
_ENGINE_NAMES = (
    "Registry",
    "WorkflowService",
    "SQLAlchemyWorkflowRepo",
    "MemoryWorkflowRepo",
    "LocalWorkflowLock",
)
_MAX_FAILURES = 2  # a row that failed this often is not tried again in this run
# nodes run per workflow; fanout-children: the parent's node (DBOS: its workflow) + 20 children x 3
_NODE_COUNTS = {
    "linear3": 3,
    "linear3-wait": 3,
    "diamond": 6,
    "approval": 3,
    "branch": 3,
    "slow2": 3,
    "fanout-children": 61,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchOptions:
    """Everything the runner needs (the CLI's parsed arguments)."""

    scenarios: tuple[str, ...]
    modes: tuple[str, ...] = ("direct",)
    backends: tuple[str, ...] = ("postgres",)
    locks: tuple[str, ...] = ("local",)
    n: int = 2000
    concurrencies: tuple[int, ...] = (32,)
    repeat: int = 3
    references: tuple[str, ...] = ("dbos", "floor")
    pg_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    redis_url: str = "redis://127.0.0.1:6379/0"
    poll_interval: float = 0.05
    create: str = "service"
    pool_size: int | None = None
    dbos_launch: str = "bounded"
    observers: tuple[str, ...] = ("none",)
    visible_after: tuple[str, ...] = ("none",)  # the service's visible_after: "none" or seconds
    backlogs: tuple[int, ...] = (0,)  # due instances pre-loaded before the timed part (a row per value)
    backlog_create: str = "bulk"  # how: "bulk" (the repo's bulk insert) or "service" (create_workflow)
    gc_freeze: bool = False  # asyncflow rows: settle_collector() once set up, before the timed part
    command: str = field(default_factory=lambda: "python -m benchmarks " + shlex.join(sys.argv[1:]))


def asyncflow_unavailable(mode: str = "direct") -> str | None:
    """``None`` if the asyncflow engine can be benchmarked in ``mode``, else why not."""
    try:
        import asyncflow
    except ImportError as exc:
        return f"asyncflow is not importable: {exc}"
    missing = [name for name in _ENGINE_NAMES if not hasattr(asyncflow, name)]
    if missing:
        return f"asyncflow does not export {', '.join(missing)} yet"
    if mode == "driver":
        try:
            from asyncflow.driver import WorkflowDriver  # noqa: F401
        except ImportError as exc:
            return f"asyncflow has no WorkflowDriver yet ({exc})"
    return None


def scenario_unavailable(scenario: str, mode: str = "driver", backlog: int = 0) -> str | None:
    """``None`` if asyncflow has a workflow for ``scenario`` (:mod:`benchmarks.scenarios`) in ``mode``,
    else why not."""
    from .scenarios import SCENARIOS

    spec = SCENARIOS.get(scenario)
    if spec is None:
        return f"no asyncflow workflow for scenario {scenario!r}"
    if spec.children and (mode != "driver" or backlog):
        return "child workflows need a driver to run them: driver mode only, without --backlog"
    return None


@dataclass(slots=True)
class _Row:
    key: report.RowKey
    run: Callable[[], Awaitable[RunMeasurement]]
    runs: list[RunMeasurement] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _plan(
    options: BenchOptions, pg: PgAdmin | None, services: dict[str, str], skipped: dict[str, str]
) -> list[_Row]:
    """The rows to run; rows that cannot run go into ``skipped`` (label -> reason)."""
    rows: list[_Row] = []

    def skip(label: str, reason: str) -> None:
        skipped[label] = reason

    wants_floor = "floor" in options.references and (not options.scenarios or "linear3" in options.scenarios)
    dbos_shapes = [
        s
        for s in DBOS_SHAPES
        if s in options.scenarios or (not options.scenarios and s not in EXTRA_SCENARIOS)
    ]
    for c in options.concurrencies:
        for backend in options.backends:
            if backend == "postgres" and pg is None:
                skip(f"every postgres row, c={c}", services["postgres"])
                continue
            if wants_floor and backend in ("postgres", "sqlite"):
                key = report.RowKey("floor", "linear3", "raw", backend, None, options.n, c, 3)
                rows.append(_Row(key, _floor_runner(key, pg)))
            if "dbos" in options.references:
                for shape in dbos_shapes:
                    key = report.RowKey("dbos", shape, options.dbos_launch, backend, None, options.n, c,
                                        _NODE_COUNTS[shape])  # fmt: skip
                    if backend not in ("postgres", "sqlite"):
                        continue  # the DBOS reference needs a database
                    elif dbos_version() is None:
                        skip(key.label(), "dbos is not installed: pip install 'asyncflow[bench]'")
                    else:
                        rows.append(_Row(key, _dbos_runner(key, pg, options.dbos_launch)))
            for scenario in options.scenarios:
                for mode in options.modes:
                    for lock in options.locks:
                        for observer, visible, backlog in itertools.product(
                            options.observers, options.visible_after, options.backlogs
                        ):
                            shown = None if options.observers == ("none",) else observer
                            va = None if options.visible_after == ("none",) else visible
                            key = report.RowKey("asyncflow", scenario, mode, backend, lock, options.n, c,
                                                _NODE_COUNTS[scenario], shown, va, backlog)  # fmt: skip
                            reason = (
                                scenario_unavailable(scenario, mode, backlog)
                                or asyncflow_unavailable(mode)
                                or observers_unavailable(observer)
                            )
                            if reason:
                                skip(key.label(), reason)
                            elif lock == "redis" and "redis" in services:
                                skip(key.label(), services["redis"])
                            else:
                                rows.append(_Row(key, _asyncflow_runner(key, options)))
    return rows


def _floor_runner(key: report.RowKey, pg: PgAdmin | None) -> Callable[[], Awaitable[RunMeasurement]]:
    async def run() -> RunMeasurement:
        if key.backend == "sqlite":
            with sqlite_file("floor") as path:
                return await run_floor_sqlite(path, key.n, key.concurrency)
        assert pg is not None
        async with pg.fresh_database("floor") as db:
            return await run_floor_postgres(db.dsn, key.n, key.concurrency, admin=pg, database=db.name)

    return run


def _dbos_runner(
    key: report.RowKey, pg: PgAdmin | None, launch: str
) -> Callable[[], Awaitable[RunMeasurement]]:
    async def run() -> RunMeasurement:
        if key.backend == "sqlite":
            with sqlite_file(f"dbos_{key.scenario}") as path:
                return await run_dbos_once(
                    key.scenario, key.n, key.concurrency, launch=launch, sqlite_path=path
                )
        assert pg is not None
        return await run_dbos_once(key.scenario, key.n, key.concurrency, admin=pg, launch=launch)

    return run


def _asyncflow_runner(key: report.RowKey, options: BenchOptions) -> Callable[[], Awaitable[RunMeasurement]]:
    async def run() -> RunMeasurement:
        from .asyncflow_runs import AsyncflowRun, run_asyncflow_isolated

        assert key.lock is not None
        spec = AsyncflowRun(
            scenario=key.scenario,
            mode=key.mode,
            backend=key.backend,
            lock=key.lock,
            n=key.n,
            concurrency=key.concurrency,
            poll_interval=options.poll_interval,
            create=options.create,
            pool_size=options.pool_size,
            observer=key.observer or "none",
            visible_after=None if key.visible_after in (None, "none") else float(key.visible_after),
            backlog=key.backlog,
            backlog_create=options.backlog_create,
            gc_freeze=options.gc_freeze,
        )
        pg_url = options.pg_url if key.backend == "postgres" else None
        redis_url = options.redis_url if key.lock == "redis" else None
        return await run_asyncflow_isolated(spec, pg_url=pg_url, redis_url=redis_url)

    return run


async def run_benchmarks(options: BenchOptions, *, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the matrix and return the JSON payload (``results``, ``skipped``, ``environment``, ...)."""
    load_at_start = _load_average()
    unavailable: dict[str, str] = {}
    pg: PgAdmin | None = None
    pg_version: str | None = None
    redis_version: str | None = None
    if "postgres" in options.backends or "dbos" in options.references:
        reason = await check_postgres(options.pg_url)
        if reason is None:
            pg = PgAdmin(options.pg_url)
            pg_version = await pg.server_version()
        else:
            unavailable["postgres"] = reason
            progress(f"skipping PostgreSQL rows: {reason}")
    if "redis" in options.locks:
        reason = await check_redis(options.redis_url)
        if reason is None:
            redis_version = await _redis_version(options.redis_url)
        else:
            unavailable["redis"] = reason
            progress(f"skipping Redis-lock rows: {reason}")
    skipped: dict[str, str] = {}
    rows = _plan(options, pg, unavailable, skipped)
    for label, reason in skipped.items():
        progress(f"skip {label}: {reason}")
    for attempt in range(options.repeat):
        for row in rows:
            if len(row.failures) >= _MAX_FAILURES:
                continue
            progress(f"[{attempt + 1}/{options.repeat}] {row.key.label()} ...")
            try:
                measurement = await row.run()
            except Exception as exc:  # one failing row must not sink the others; reported below
                log.debug("row %s failed", row.key.label(), exc_info=True)
                row.failures.append(describe_error(exc))
                progress(f"    FAILED: {row.failures[-1]}")
                continue
            row.runs.append(measurement)
            cpu_ms = measurement.cpu_s / measurement.n * 1000
            wfs = measurement.workflows_per_s
            progress(f"    {wfs:,.1f} wf/s, {cpu_ms:.2f} CPU ms/wf, {measurement.elapsed_s:.2f} s")
    results = []
    for row in rows:
        if row.runs:
            results.append(report.aggregate(row.key, row.runs))
            results[-1]["failed_runs"] = len(row.failures)
    report.attach_ratios(results)
    skipped_list = [{"row": label, "reason": reason} for label, reason in skipped.items()]
    skipped_list += [
        {
            "row": row.key.label(),
            "reason": f"{len(row.failures)} of {len(row.failures) + len(row.runs)} runs failed: "
            + "; ".join(dict.fromkeys(row.failures)),
        }
        for row in rows
        if row.failures
    ]
    env = report.environment(postgres=pg_version, redis=redis_version)
    env["machine"]["load_average_1m"] = {"start": load_at_start, "end": _load_average()}
    return {
        "schema": report.JSON_SCHEMA_VERSION,
        "generated_at": report.now_iso(),
        "command": options.command,
        "environment": env,
        "results": results,
        "skipped": skipped_list,
    }


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, or of the distinct leaf errors of an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return " | ".join(dict.fromkeys(_leaf_errors(exc)))
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and not isinstance(cause, BaseExceptionGroup):
        text += f" (from {type(cause).__name__}: {cause})"
    return text


def _leaf_errors(group: BaseExceptionGroup[BaseException]) -> list[str]:
    leaves: list[str] = []
    for inner in group.exceptions:
        if isinstance(inner, BaseExceptionGroup):
            leaves += _leaf_errors(inner)
        else:
            leaves.append(describe_error(inner))
    return leaves


def _load_average() -> float | None:
    """The 1-minute load average (other work on the machine disturbs every figure)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


async def _redis_version(url: str) -> str | None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0)
    try:
        info = await client.info("server")
        return str(info.get("redis_version"))
    finally:
        await client.aclose()


def parse_list(value: str, allowed: Sequence[str], name: str) -> tuple[str, ...]:
    """``"a,b"`` → ``("a", "b")``, ``"all"`` → every allowed value, ``"none"`` → ``()``."""
    if value == "all":
        return tuple(a for a in allowed if a not in SLOW_SCENARIOS)
    if value in ("none", ""):
        return ()
    items = tuple(item.strip() for item in value.split(",") if item.strip())
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise ValueError(f"unknown {name}: {', '.join(unknown)} (choose from {', '.join(allowed)}, all)")
    return items
