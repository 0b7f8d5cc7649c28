"""Driver scenarios: N instances of linear-3 and the diamond driven by one ``WorkflowDriver``.

Reports workflows/s, node steps/s, p50/p99 time from create to completed, CPU per workflow, peak RSS,
the driver's counters, and separately the queries per minute of an idle driver. Each run gets a fresh
PostgreSQL database or SQLite file.

Modes:

* ``backlog``: bulk-insert N due instances, then ``run_until_idle()``. Throughput is N over the driving
  time; create→completed includes the wait in the backlog (so p50 is about half the run).
* ``live``: the driver runs (``async with driver``) while ``concurrency`` producers each create an
  instance (``create_workflow``, which wakes the driver) and wait for it to complete, N in all. This is
  the latency a caller sees with ``concurrency`` workflows in flight.

Examples::

    python benchmarks/bench_driver.py                                   # everything, N = 10,000
    python benchmarks/bench_driver.py --backend postgres --scenario diamond -n 2000 --mode live
    python benchmarks/bench_driver.py --backend postgres --trigger off  # without the NOTIFY trigger
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import event

import asyncflow as af
from asyncflow.driver import WorkflowDriver
from asyncflow.records import NewWorkflowInstance
from asyncflow.store.postgres.notify import install_notify_trigger
from benchmarks.databases import PgAdmin, sqlite_file
from benchmarks.harness import LatencySampler, ResourceProbe, percentile
from benchmarks.scenarios import BenchHooks, build_registry, get_scenario

_BATCH = 1000
_COMPLETED = af.QueryWorkflowInstanceParams(status_in=("completed",))


class Statements:
    """Counts the SQL statements an engine sends (``before_cursor_execute``)."""

    def __init__(self, engine: Any) -> None:
        self.count = 0
        self._engine = engine.sync_engine
        event.listen(self._engine, "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        self.count += 1

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._seen)


@asynccontextmanager
async def fresh_repo(backend: str, pg_url: str, tag: str, trigger: bool) -> AsyncIterator[Any]:
    """A repo on a fresh database with the schema (and on PostgreSQL the NOTIFY trigger if asked)."""
    if backend == "sqlite":
        with sqlite_file(tag) as path:
            repo = af.SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{path}")
            await repo.create_schema()
            try:
                yield repo
            finally:
                await repo.aclose()
        return
    async with PgAdmin(pg_url).fresh_database(tag) as db:
        repo = af.SQLAlchemyWorkflowRepo(db.sqlalchemy_url, pool_size=20, max_overflow=10)
        await repo.create_schema()
        if trigger:
            async with repo.engine.begin() as conn:
                await install_notify_trigger(conn)
        try:
            yield repo
        finally:
            await repo.aclose()


async def run_once(args: argparse.Namespace, backend: str, scenario: str) -> dict[str, Any]:
    spec = get_scenario(scenario)
    hooks = BenchHooks()
    registry = build_registry(spec, hooks)
    n, concurrency = args.n, args.concurrency
    sampler = LatencySampler(n)
    done: dict[int, asyncio.Future[None]] = {}

    def completed(instance_id: int, at: float) -> None:
        sampler.completed(instance_id, at)
        waiter = done.pop(instance_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    hooks.on_completed = completed
    tag = f"drv_{scenario}_{backend}"
    async with fresh_repo(backend, args.pg_url, tag, args.trigger == "on") as repo:
        service = af.WorkflowService(repo, af.LocalWorkflowLock(), registry=registry)
        driver = WorkflowDriver(
            service,
            concurrency=concurrency,
            poll_interval=args.poll_interval,
            listen=args.mode == "live" and args.trigger == "on",  # listen=True installs the trigger
        )
        with ResourceProbe() as probe:
            if args.mode == "backlog":
                for first in range(0, n, _BATCH):
                    batch = range(first, min(n, first + _BATCH))
                    news = [
                        NewWorkflowInstance(
                            workflow_type=spec.workflow_type, business_id=f"b{i}", workflow_context={}
                        )
                        for i in batch
                    ]
                    ids = await repo.create_workflow_instances(news)
                    now = time.perf_counter()
                    for i, instance_id in zip(batch, ids, strict=True):
                        if sampler.wants(i):
                            sampler.started(instance_id, now)
                start = time.perf_counter()
                await driver.run_until_idle()
                for _ in range(60):  # passes that raised (a busy server) are backing off: finish them
                    if await service.count_workflow_instances(_COMPLETED) >= n:
                        break
                    await asyncio.sleep(0.5)
                    await driver.run_until_idle()
                elapsed = time.perf_counter() - start
            else:
                indexes = iter(range(n))
                loop = asyncio.get_running_loop()

                async def producer() -> None:
                    for i in indexes:
                        waiter = loop.create_future()
                        started = time.perf_counter()
                        instance = await service.create_workflow(spec.workflow_type, f"b{i}")
                        done[instance.id] = waiter
                        sampler.started(instance.id, started)
                        await waiter

                start = time.perf_counter()
                async with driver, asyncio.TaskGroup() as group:
                    for slot in range(concurrency):
                        group.create_task(producer(), name=f"bench-producer-{slot}")
                elapsed = time.perf_counter() - start
        finished = await service.count_workflow_instances(_COMPLETED)
    if finished != n:
        raise RuntimeError(f"{scenario}/{backend}: {finished} of {n} instances completed")
    latencies = sampler.latencies()
    return {
        "scenario": scenario,
        "backend": backend,
        "mode": args.mode,
        "n": n,
        "concurrency": concurrency,
        "workflows_per_s": round(n / elapsed, 1),
        "node_steps_per_s": round(n * spec.node_count / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "cpu_ms_per_wf": round(probe.cpu_s * 1000 / n, 2),
        "peak_rss_mib": round(probe.peak_rss_bytes / 2**20, 1),
        "seconds": round(elapsed, 2),
        "driver": driver.stats.as_dict(),
    }


async def idle_queries(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """Statements per minute of a driver with nothing to do (default poll interval 1 s)."""
    async with fresh_repo(backend, args.pg_url, f"drv_idle_{backend}", args.trigger == "on") as repo:
        service = af.WorkflowService(repo, af.LocalWorkflowLock(), registry=af.Registry())
        driver = WorkflowDriver(service, poll_interval=args.idle_poll)
        counter = Statements(repo.engine)
        try:
            async with driver:
                await asyncio.sleep(min(1.0, args.idle_seconds / 4))  # start-up (and LISTEN) first
                counter.count = 0
                await asyncio.sleep(args.idle_seconds)
                seen = counter.count
        finally:
            counter.close()
    return {
        "backend": backend,
        "poll_interval": args.idle_poll,
        "window_s": args.idle_seconds,
        "queries_per_min": round(seen * 60 / args.idle_seconds, 1),
        "listening": backend == "postgres",
    }


async def trigger_cost(args: argparse.Namespace, rounds: int = 6, per_round: int = 400) -> dict[str, Any]:
    """Microseconds per autocommit statement on ``workflow_instance`` without and with the NOTIFY trigger.

    8 connections send, in turn: INSERTs of due rows (they notify), UPDATEs that set ``next_run_at``
    in the future (the trigger's WHEN is false) and UPDATEs that make a row due (they notify). Rounds
    alternate off/on (the trigger is dropped and re-created) so that machine noise hits both alike.
    """
    import asyncpg

    async with PgAdmin(args.pg_url).fresh_database("drv_trigger") as db:
        repo = af.SQLAlchemyWorkflowRepo(db.sqlalchemy_url)
        await repo.create_schema()
        await repo.aclose()
        conns = [await asyncpg.connect(db.dsn) for _ in range(8)]
        samples: dict[str, list[float]] = {}
        try:
            for r in range(rounds):
                on = r % 2 == 1
                if on:
                    await conns[0].execute(_install_sql())
                else:
                    await conns[0].execute(_DROP_SQL)
                ids: list[int] = []
                for kind in ("insert", "update_later", "update_due"):
                    now_ms = int(time.time() * 1000)
                    chunk = per_round // len(conns)
                    start = time.perf_counter()
                    await asyncio.gather(
                        *(
                            _send(conn, kind, range(k * chunk, (k + 1) * chunk), ids, now_ms)
                            for k, conn in enumerate(conns)
                        )
                    )
                    per_statement = (time.perf_counter() - start) / (chunk * len(conns)) * 1e6
                    samples.setdefault(f"{kind}_{'on' if on else 'off'}", []).append(per_statement)
        finally:
            for conn in conns:
                await conn.close()
    return {key: round(sorted(values)[len(values) // 2], 1) for key, values in sorted(samples.items())}


_INSERT = (
    "INSERT INTO workflow_instance (workflow_type, business_id, status, created_at, updated_at,"
    " next_run_at) VALUES ('t', $1, 'init', 0, 0, $2) RETURNING id"
)
_UPDATE = "UPDATE workflow_instance SET next_run_at = $2 WHERE id = $1"


async def _send(conn: Any, kind: str, part: range, ids: list[int], now_ms: int) -> None:
    for i in part:
        if kind == "insert":
            ids.append(await conn.fetchval(_INSERT, f"b{i}", now_ms))
        else:
            await conn.execute(_UPDATE, ids[i], now_ms + 60_000 if kind == "update_later" else now_ms - 1)


_DROP_SQL = (
    "DROP TRIGGER IF EXISTS asyncflow_due_notify ON workflow_instance;"
    "DROP TRIGGER IF EXISTS asyncflow_due_notify_insert ON workflow_instance"
)


def _install_sql() -> str:
    from asyncflow.store.postgres.notify import (
        _FUNCTION_SQL,
        _INSERT_FUNCTION_SQL,
        _INSERT_TRIGGER_SQL,
        _TRIGGER_SQL,
    )

    return f"{_FUNCTION_SQL};\n{_INSERT_FUNCTION_SQL};\n{_DROP_SQL};\n{_TRIGGER_SQL};\n{_INSERT_TRIGGER_SQL}"


def _table(rows: list[dict[str, Any]]) -> str:
    head = "scenario  backend   mode     N       c   wf/s     steps/s  p50 ms    p99 ms    CPU ms/wf  RSS MiB"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['scenario']:<9} {r['backend']:<9} {r['mode']:<8} {r['n']:<7} {r['concurrency']:<3} "
            f"{r['workflows_per_s']:<8} {r['node_steps_per_s']:<8} {r['p50_ms']:<9} {r['p99_ms']:<9} "
            f"{r['cpu_ms_per_wf']:<10} {r['peak_rss_mib']}"
        )
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="postgres,sqlite", help="postgres, sqlite or both (comma list)")
    parser.add_argument("--scenario", default="linear3,diamond", help="linear3, diamond (comma list)")
    parser.add_argument("--mode", default="backlog", choices=("backlog", "live"))
    parser.add_argument("-n", type=int, default=10_000, help="instances per run (default 10,000)")
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--poll-interval", type=float, default=0.05, help="driver poll interval (runs)")
    parser.add_argument("--idle-poll", type=float, default=1.0, help="poll interval of the idle measurement")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle window (0: skip)")
    parser.add_argument("--trigger", default="on", choices=("on", "off"), help="PostgreSQL NOTIFY trigger")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get(
            "ASYNCFLOW_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--trigger-cost", action="store_true", help="only measure the NOTIFY trigger's cost")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.trigger_cost:
        cost = await trigger_cost(args)
        print("µs per statement (median of 3 rounds each, 8 connections):", json.dumps(cost))
        return 0
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    rows = []
    for backend in backends:
        for scenario in (s.strip() for s in args.scenario.split(",") if s.strip()):
            print(f"[{backend} {scenario} {args.mode} n={args.n} c={args.concurrency}] ...", flush=True)
            rows.append(await run_once(args, backend, scenario))
            print(f"    {rows[-1]['workflows_per_s']} wf/s, driver {rows[-1]['driver']}", flush=True)
    idle = [await idle_queries(args, b) for b in backends] if args.idle_seconds > 0 else []
    print(_table(rows))
    for row in idle:
        rate, poll = row["queries_per_min"], row["poll_interval"]
        print(f"idle driver on {row['backend']}: {rate} queries/min (poll {poll} s)")
    if args.json:
        text = json.dumps({"runs": rows, "idle": idle}, indent=2) + "\n"
        await asyncio.to_thread(Path(args.json).write_text, text)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
