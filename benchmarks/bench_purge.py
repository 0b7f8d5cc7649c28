"""Purge while a driver runs: rows deleted per second, and the driver's throughput before, during and
after the purge (PostgreSQL).

On a fresh database: ``--old`` completed ``linear3`` instances (each with its 5 node rows: root, A, B,
C, end) last updated 40 days ago, written with two ``INSERT ... SELECT generate_series`` statements, and
a backlog of ``--backlog`` due ``linear3`` instances (the repo's bulk insert). One ``WorkflowDriver``
(concurrency ``-c``) drives the backlog in the background; completions are counted over a window of
``--window`` seconds before the purge, during ``svc.purge_workflow_instances(older_than=30 days)``
(batches of 500, one transaction each) and over a window after it.

Example::

    python benchmarks/bench_purge.py --old 100000 --backlog 40000 -c 32 --window 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text

import asyncflow as af
from asyncflow.driver import WorkflowDriver
from asyncflow.records import NewWorkflowInstance
from benchmarks.databases import PgAdmin
from benchmarks.scenarios import BenchHooks, build_registry, get_scenario

_NODES = ("root", "A", "B", "C", "end")

_OLD_INSTANCES = text(
    "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, created_at, "
    "updated_at, next_run_at) SELECT 'bench_linear3', 'old' || g, 'completed', '{}'::jsonb, :at, :at, 0 "
    "FROM generate_series(1, :n) AS g"
)
_OLD_NODES = text(
    "INSERT INTO task_instance (workflow_instance_id, task_type, status, node_context, created_at, "
    "updated_at, started_at) SELECT w.id, t.task_type, 'completed', '{\"out\": 1}'::jsonb, :at, :at, :at "
    "FROM workflow_instance AS w CROSS JOIN unnest(CAST(:nodes AS text[])) AS t(task_type) "
    "WHERE w.business_id LIKE 'old%'"
)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = get_scenario("linear3")
    hooks = BenchHooks()
    completions: list[float] = []
    hooks.on_completed = lambda _id, at: completions.append(at)
    registry = build_registry(spec, hooks)
    async with PgAdmin(args.pg_url).fresh_database("purge") as db:
        repo = af.SQLAlchemyWorkflowRepo(db.sqlalchemy_url, pool_size=args.concurrency + 4, max_overflow=4)
        try:
            await repo.migrate()
            long_ago = int(time.time()) - 40 * 86400
            started = time.perf_counter()
            async with repo.engine.begin() as conn:
                await conn.execute(_OLD_INSTANCES, {"at": long_ago, "n": args.old})
                await conn.execute(_OLD_NODES, {"at": long_ago, "nodes": list(_NODES)})
                await conn.execute(text("ANALYZE workflow_instance"))
                await conn.execute(text("ANALYZE task_instance"))
            seed_s = time.perf_counter() - started
            for first in range(0, args.backlog, 1000):
                news = [
                    NewWorkflowInstance(
                        workflow_type=spec.workflow_type, business_id=f"live{i}", workflow_context={}
                    )
                    for i in range(first, min(args.backlog, first + 1000))
                ]
                await repo.create_workflow_instances(news)
            svc = af.WorkflowService(repo, af.LocalWorkflowLock(), registry=registry)
            driver = WorkflowDriver(svc, concurrency=args.concurrency, poll_interval=0.05)

            def done_between(a: float, b: float) -> int:
                return sum(1 for t in completions if a <= t < b)

            async with driver:
                await asyncio.sleep(1.0)  # warm: connections, prepared statements
                before_start = time.perf_counter()
                await asyncio.sleep(args.window)
                purge_start = time.perf_counter()
                deleted = await svc.purge_workflow_instances(older_than=30 * 86400)
                purge_end = time.perf_counter()
                await asyncio.sleep(args.window)
                after_end = time.perf_counter()
            if len(completions) >= args.backlog:
                raise RuntimeError("the backlog ran out: raise --backlog")
            purge_s = purge_end - purge_start
            rows = deleted * (1 + len(_NODES))
            before = done_between(before_start, purge_start) / (purge_start - before_start)
            during = done_between(purge_start, purge_end) / purge_s
            after = done_between(purge_end, after_end) / (after_end - purge_end)
            return {
                "old_instances": args.old,
                "deleted_instances": deleted,
                "seed_s": round(seed_s, 2),
                "purge_s": round(purge_s, 2),
                "instances_per_s": round(deleted / purge_s, 1),
                "rows_per_s": round(rows / purge_s, 1),
                "driver_wf_per_s_before": round(before, 1),
                "driver_wf_per_s_during": round(during, 1),
                "driver_wf_per_s_after": round(after, 1),
                "during_vs_before": round(during / before, 3) if before else None,
                "concurrency": args.concurrency,
            }
        finally:
            await repo.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--old", type=int, default=100_000, help="completed instances to purge")
    parser.add_argument("--backlog", type=int, default=40_000, help="due instances the driver works on")
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("--window", type=float, default=5.0, help="seconds measured before and after")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    results = [asyncio.run(run(args)) for _ in range(args.repeat)]
    for result in results:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
