"""A quick, small-footprint measurement of the SQL repo's hot path: ``linear3`` wf/s next to the floor.

Unlike ``python -m benchmarks run`` it keeps PostgreSQL connections few (the repo's pool and the floor
share ``--pool`` connections, so it runs beside other users of a small server) and it can profile a row.

    python -m benchmarks.hot_path --backend postgres,sqlite --rows floor,direct,driver -n 2000 -c 32
    python -m benchmarks.hot_path --backend postgres --rows direct --profile 25
    python -m benchmarks.hot_path --backend postgres --rows direct --profile 40 --profile-sort ncalls
    python -m benchmarks.hot_path --backend postgres --rows direct --profile 5 --profile-callers get_debug
    python -m benchmarks.hot_path --backend postgres --rows driver --analyze -n 4000 --repeat 5

Each ``--repeat`` round runs every row once (rows interleaved); it prints each run, then per row the
median wf/s with [min-max], the median CPU ms per workflow, and ``median / floor median``. On Linux
with the PostgreSQL server on this machine it also reports the server's CPU ms per workflow: the user
and system time the ``postgres`` processes (every backend, the WAL writer, autovacuum) used during the
timed part, from ``/proc``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncflow as af
from asyncflow.cli.worker import settle_collector

from .asyncflow_runs import run_direct, run_driver
from .databases import PgAdmin
from .reference_floor import (
    _NODES,
    _OUTPUT,
    _PG_DDL,
    _PG_INSERT_INSTANCE,
    _PG_INSERT_LAST_NODE,
    _PG_INSERT_NODE,
    run_floor_sqlite,
)
from .scenarios import BenchHooks, build_registry, get_scenario

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


async def _pg_floor(dsn: str, n: int, concurrency: int, connections: int) -> float:
    """``n`` floor workflows, ``concurrency`` in flight over ``connections`` raw asyncpg connections."""
    import asyncpg

    setup = await asyncpg.connect(dsn)
    try:
        await setup.execute(_PG_DDL)
    finally:
        await setup.close()
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    free: asyncio.Queue[Any] = asyncio.Queue()
    for conn in conns:
        free.put_nowait(conn)

    async def run(conn: Any, sql: str, *args: Any) -> Any:
        return await conn.fetchval(sql, *args)

    async def one(index: int) -> None:
        now = int(time.time())
        steps: list[tuple[str, tuple[Any, ...]]] = []
        conn = await free.get()
        try:
            instance_id = await run(conn, _PG_INSERT_INSTANCE, f"floor-{index}", now)
        finally:
            free.put_nowait(conn)
        steps = [(_PG_INSERT_NODE, (instance_id, node, _OUTPUT, now)) for node in _NODES[:-1]]
        steps.append((_PG_INSERT_LAST_NODE, (instance_id, _NODES[-1], _OUTPUT, now)))
        for sql, args in steps:
            conn = await free.get()
            try:
                await run(conn, sql, *args)
            finally:
                free.put_nowait(conn)

    try:
        await asyncio.gather(*(one(-1 - i) for i in range(connections)))  # prepare everywhere
        return await _server_timed(_timed(n, concurrency, one))
    finally:
        for conn in conns:
            await conn.close()


_SERVER_CPU: list[float] = []
"""The server CPU seconds of the last timed part (empty where ``/proc`` shows no ``postgres`` process)."""


def _proc_stat(pid: int | str) -> tuple[str, int] | None:
    """A process's command name and user + system CPU ticks from ``/proc/<pid>/stat`` (``None``: no
    such process here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:  # no /proc, another machine's process, or it ended meanwhile
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return stat[stat.index("(") + 1 : stat.rindex(")")], int(fields[11]) + int(fields[12])  # utime, stime


def _postgres_cpu_s() -> float | None:
    """User + system seconds of every ``postgres`` process on this machine, or ``None`` (no ``/proc``)."""
    if not os.path.isdir("/proc"):
        return None
    ticks, found = 0, False
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        stat = _proc_stat(pid)
        if stat is not None and stat[0].startswith("postgres"):
            ticks += stat[1]
            found = True
    return ticks / os.sysconf("SC_CLK_TCK") if found else None


async def _server_timed(timed: Awaitable[float]) -> float:
    """``timed``'s seconds; the server CPU it took goes to :data:`_SERVER_CPU` (read while the
    connections are still open: a backend's time leaves ``/proc`` with it)."""
    _SERVER_CPU.clear()
    before = await asyncio.to_thread(_postgres_cpu_s)
    elapsed = await timed
    after = await asyncio.to_thread(_postgres_cpu_s)
    if before is not None and after is not None:
        _SERVER_CPU.append(after - before)
    return elapsed


async def _timed(n: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    indexes = iter(range(n))

    async def worker() -> None:
        for index in indexes:
            await one(index)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(n, concurrency)):
            group.create_task(worker())
    return time.perf_counter() - start


async def _analyze(repo: Any) -> None:
    """``ANALYZE`` the instances table, as autovacuum does to a real backlog before long."""
    from sqlalchemy import text

    async with repo.engine.begin() as conn:
        await conn.execute(text("ANALYZE workflow_instance"))


async def _asyncflow(
    repo: Any, mode: str, n: int, concurrency: int, analyze: bool = False, gc_freeze: bool = False
) -> float:
    spec = get_scenario("linear3")
    hooks = BenchHooks()
    svc = af.WorkflowService(repo, af.LocalWorkflowLock(), registry=build_registry(spec, hooks))
    await run_direct(svc, spec.workflow_type, min(50, n), concurrency, spec=spec)  # warm-up
    if gc_freeze:  # as asyncflow worker does once it is set up
        settle_collector()
    if mode == "direct":
        return await _server_timed(run_direct(svc, spec.workflow_type, n, concurrency, spec=spec))

    async def driven() -> float:
        after = (lambda: _analyze(repo)) if analyze else None
        _, elapsed, stats = await run_driver(
            svc, spec.workflow_type, n, concurrency, hooks=hooks, repo=repo, after_create=after
        )
        if stats.completed != n:
            raise RuntimeError(f"driver completed {stats.completed} of {n}")
        return elapsed

    return await _server_timed(driven())


async def one_run(backend: str, row: str, args: argparse.Namespace, admin: PgAdmin | None) -> float:
    """Seconds for ``args.n`` workflows of one row on a fresh database."""
    if backend == "memory":  # the engine and driver alone: the ceiling any database row can reach
        if row == "floor":
            return 0.0
        return await _asyncflow(af.MemoryWorkflowRepo(), row, args.n, args.c, gc_freeze=args.gc_freeze)
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench.db")
            if row == "floor":
                return (await run_floor_sqlite(path, args.n, args.c)).elapsed_s
            repo = af.SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{path}")
            try:
                await repo.create_schema()
                return await _asyncflow(repo, row, args.n, args.c, args.analyze, args.gc_freeze)
            finally:
                await repo.aclose()
    assert admin is not None
    async with admin.fresh_database("hot_path") as db:
        if args.synchronous_commit != "on":  # this run's database only, before its first session
            await admin.set_database_option(db.name, "synchronous_commit", args.synchronous_commit)
        if row == "floor":
            if args.gc_freeze:
                settle_collector()
            return await _pg_floor(db.dsn, args.n, args.c, min(args.c, args.pool))
        repo = af.SQLAlchemyWorkflowRepo(db.sqlalchemy_url, pool_size=args.pool, max_overflow=4)
        try:
            await repo.create_schema()
            return await _asyncflow(repo, row, args.n, args.c, args.analyze, args.gc_freeze)
        finally:
            await repo.aclose()


async def _retrying(backend: str, row: str, args: argparse.Namespace, admin: PgAdmin | None) -> float:
    """:func:`one_run`, waiting and trying again while the server has no connection slot to spare."""
    for _attempt in range(30):
        try:
            return await one_run(backend, row, args, admin)
        except Exception as error:  # a shared server: other users may hold every connection for a while
            if "too many clients" not in repr(error) and "TooManyConnections" not in repr(error):
                raise
            print(f"    ({backend} {row}: the server is out of connections; retrying in 10 s)")
            await asyncio.sleep(10)
    raise RuntimeError(f"{backend} {row}: no connection slots for 5 minutes")


async def main(args: argparse.Namespace) -> None:
    admin = PgAdmin(args.pg_url)
    rows = [(b, r) for b in args.backend.split(",") for r in args.rows.split(",")]
    results: dict[tuple[str, str], list[tuple[float, float, float | None]]] = {row: [] for row in rows}
    for round_ in range(args.repeat):
        for backend, row in rows:
            profile = cProfile.Profile() if args.profile and row != "floor" else None
            cpu = time.process_time()
            if profile is not None:
                profile.enable()
            elapsed = await _retrying(backend, row, args, admin)
            if profile is not None:
                profile.disable()
            if not elapsed:
                continue
            cpu = time.process_time() - cpu
            rate = args.n / elapsed
            server = _SERVER_CPU[0] / args.n * 1000 if backend == "postgres" and _SERVER_CPU else None
            results[(backend, row)].append((rate, cpu / args.n * 1000, server))
            print(
                f"[{round_ + 1}] {backend:7s} {row:7s} {rate:8.1f} wf/s  {cpu / args.n * 1000:.2f} CPU ms/wf"
                + ("" if server is None else f"  server {server:.3f} CPU ms/wf")
            )
            if profile is not None:
                out = io.StringIO()
                stats = pstats.Stats(profile, stream=out).sort_stats(args.profile_sort)
                stats.print_stats(args.profile)
                if args.profile_callers:
                    stats.print_callers(args.profile_callers)
                print(out.getvalue())
    summary: dict[str, dict[str, Any]] = {}
    for (backend, row), runs in results.items():
        rates = sorted(r for r, _, _ in runs)
        servers = [s for _, _, s in runs if s is not None]
        summary[f"{backend}/{row}"] = {
            "median": statistics.median(rates),
            "min": rates[0],
            "max": rates[-1],
            "cpu_ms": statistics.median([c for _, c, _ in runs]),
            "server_cpu_ms": statistics.median(servers) if servers else None,
        }
    for key, value in summary.items():
        backend = key.split("/")[0]
        floor = summary.get(f"{backend}/floor")
        ratio = f"  {value['median'] / floor['median']:.0%} of floor" if floor and "floor" not in key else ""
        server = value["server_cpu_ms"]
        print(
            f"{key:16s} {value['median']:8.1f} wf/s [{value['min']:.1f}-{value['max']:.1f}] "
            f"{value['cpu_ms']:.2f} CPU ms/wf{ratio}"
            + ("" if server is None else f"  server {server:.3f} CPU ms/wf")
        )
    if args.json:
        text = json.dumps({"args": vars(args), "summary": summary}, indent=2)
        await asyncio.to_thread(_write_text, args.json, text)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hot_path", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="postgres,sqlite")
    parser.add_argument("--rows", default="floor,direct,driver")
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("-c", type=int, default=32)
    parser.add_argument("--pool", type=int, default=20, help="PostgreSQL connections (repo pool, floor)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pg-url", default=PG_URL)
    parser.add_argument("--profile", type=int, default=0, help="print the top N cProfile entries per run")
    parser.add_argument(
        "--profile-sort",
        default="tottime",
        choices=("tottime", "cumulative", "ncalls", "pcalls", "filename", "name"),
        help="the order of those entries",
    )
    parser.add_argument(
        "--profile-callers", default="", help="also print who called the functions this regex matches"
    )
    parser.add_argument(
        "--analyze",
        action="store_true",
        help="ANALYZE the driver row's bulk-loaded backlog before its timed part (claims see statistics)",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="tune the collector before each timed part, as asyncflow worker does (settle_collector())",
    )
    parser.add_argument(
        "--synchronous-commit",
        default="on",
        choices=("on", "off"),
        help="PostgreSQL: the run's database commits without waiting for its WAL flush (off): tells "
        "whether a row is bound by commit latency or by CPU; not a setting to run production with",
    )
    parser.add_argument("--json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
