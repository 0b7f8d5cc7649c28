"""``python -m benchmarks dashboard``: server time of the dashboard's pages on a large PostgreSQL table.

Loads ``-n`` instances (default 100,000; five workflow types, statuses mostly terminal as in a real
database) into a fresh PostgreSQL database with one ``INSERT ... SELECT generate_series``, plus one
instance of a ``--nodes``-node workflow (default 200) with a row per node. Then it times requests to
the mounted dashboard in process (httpx ``ASGITransport``: the app's whole work, no network) and
prints p50/p99 per page. The numbers are for the machine they ran on; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from .databases import PgAdmin
from .harness import percentile

__all__ = ["add_parser", "load_rows", "pages", "run"]

TYPES = ("billing", "shipping", "refund", "signup", "report")
# status by i % 20: mostly completed, some failed/canceled, a few running/init
_STATUS_SQL = (
    "CASE WHEN i % 20 < 14 THEN 'completed' WHEN i % 20 < 16 THEN 'failed' WHEN i % 20 = 16 THEN 'canceled' "
    "WHEN i % 20 < 19 THEN 'running' ELSE 'init' END"
)
BIG_TYPE = "big_dag"


def big_config(nodes: int) -> Any:
    """A layered DAG of ``nodes`` nodes, 10 wide, each layer fully joined to the next's neighbours."""
    from asyncflow.config import NodeConfig, WorkflowConfig

    width = 10
    ids = [f"n{i:03d}" for i in range(nodes)]
    configs = []
    for i, node_id in enumerate(ids):
        layer_next = [ids[j] for j in range((i // width + 1) * width, min((i // width + 2) * width, nodes))]
        nexts = tuple(sorted({layer_next[(i + k) % len(layer_next)] for k in range(2)})) if layer_next else ()
        configs.append(NodeConfig(id=node_id, name=f"Node {i}", next_nodes=nexts))
    return WorkflowConfig(id=BIG_TYPE, name="200 nodes", nodes=tuple(configs))


def make_registry(nodes: int) -> Any:
    from asyncflow.registry import Registry
    from asyncflow.worker import EmptyTaskWorker

    registry = Registry()
    config = big_config(nodes)
    registry.load_workflow_config(config)
    for node in config.nodes:
        registry.register_workflow_task(BIG_TYPE, node.id, EmptyTaskWorker())
    return registry


async def load_rows(engine: Any, n: int, nodes: int) -> int:
    """Insert ``n`` instances and one ``BIG_TYPE`` instance with ``nodes`` node rows; its id."""
    from sqlalchemy import text

    now = int(time.time())
    types = "ARRAY[" + ",".join(f"'{t}'" for t in TYPES) + "]"
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, "
                "task_id, created_at, updated_at, next_run_at, version) "
                f"SELECT ({types})[1 + i % 5], 'order-' || i, "
                f"{_STATUS_SQL}, jsonb_build_object('order', i, 'note', repeat('x', 40)), 0, "
                ":now - (:n - i), :now - (:n - i), 0, 1 FROM generate_series(1, :n) AS i"
            ),
            {"now": now, "n": n},
        )
        big = (
            await conn.execute(
                text(
                    "INSERT INTO workflow_instance (workflow_type, business_id, status, workflow_context, "
                    "task_id, created_at, updated_at, next_run_at, version) "
                    "VALUES (:t, 'big-1', 'running', '{}'::jsonb, 0, :now, :now, 0, 1) RETURNING id"
                ),
                {"t": BIG_TYPE, "now": now},
            )
        ).scalar_one()
        await conn.execute(
            text(
                "INSERT INTO task_instance (workflow_instance_id, task_type, status, node_context, "
                "fail_count, created_at, updated_at, started_at, version) "
                "SELECT :big, 'n' || lpad(i::text, 3, '0'), "
                "CASE WHEN i < :done THEN 'completed' ELSE 'running' END, "
                "jsonb_build_object('out', i, 'note', repeat('y', 200)), 0, :now, :now, :now, 1 "
                "FROM generate_series(0, :last) AS i"
            ),
            {"big": big, "now": now, "done": nodes * 3 // 4, "last": nodes - 1},
        )
        await conn.execute(text("ANALYZE workflow_instance"))
        await conn.execute(text("ANALYZE task_instance"))
    return int(big)


def pages(big: int) -> dict[str, str]:
    """Page name -> path under the mount point."""
    return {
        "list first page": "/wf/",
        "list by status": "/wf/?status=failed",
        "list by type+status": "/wf/?type=shipping&status=canceled",
        "list by type+status (no match)": "/wf/?type=refund&status=canceled",
        "list by business id": "/wf/?business_id=order-54321",
        "list page 50": "/wf/?page=50",
        "api list": "/wf/api/instances",
        f"instance ({big}: big DAG)": f"/wf/instances/{big}",
    }


async def _time(client: Any, path: str, repeat: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        response = await client.get(path)
        response.raise_for_status()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        response = await client.get(path)
        samples.append(time.perf_counter() - start)
        response.raise_for_status()
    return samples


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from sqlalchemy.ext.asyncio import create_async_engine
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from asyncflow.engine.service import WorkflowService
    from asyncflow.lock.local import LocalWorkflowLock
    from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
    from asyncflow.web import dashboard

    admin = PgAdmin(args.pg_url)
    results: dict[str, Any] = {"n": args.n, "nodes": args.nodes, "repeat": args.repeat, "pages": {}}
    async with admin.fresh_database("dashboard") as db:
        engine = create_async_engine(db.sqlalchemy_url, pool_size=5)
        try:
            repo = SQLAlchemyWorkflowRepo(engine)
            await repo.create_schema()
            start = time.perf_counter()
            big = await load_rows(engine, args.n, args.nodes)
            results["load_s"] = round(time.perf_counter() - start, 2)
            print(f"loaded {args.n} instances in {results['load_s']} s", file=sys.stderr)
            svc = WorkflowService(repo, LocalWorkflowLock(), make_registry(args.nodes))
            app = Starlette(routes=[Mount("/wf", dashboard(svc))])
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                for name, path in pages(big).items():
                    samples = await _time(client, path, args.repeat, warmup=5)
                    ms = sorted(s * 1000 for s in samples)
                    row = {
                        "path": path,
                        "p50_ms": round(percentile(ms, 50), 2),
                        "p99_ms": round(percentile(ms, 99), 2),
                        "min_ms": round(ms[0], 2),
                        "max_ms": round(ms[-1], 2),
                    }
                    results["pages"][name] = row
                    print(
                        f"{name:32} p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms", file=sys.stderr
                    )
        finally:
            await engine.dispose()
    return results


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("dashboard", help="time the dashboard's pages on a large PostgreSQL table")
    parser.add_argument("-n", type=int, default=100_000, help="instances to load (default 100000)")
    parser.add_argument("--nodes", type=int, default=200, help="nodes of the big instance (default 200)")
    parser.add_argument("--repeat", type=int, default=100, help="timed requests per page (default 100)")
    parser.add_argument("--pg-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")


def main(args: argparse.Namespace) -> int:
    results = asyncio.run(run(args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)
    print(json.dumps(results["pages"], indent=2))
    return 0
