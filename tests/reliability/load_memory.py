"""Load: many instances through one ``WorkflowDriver`` on PostgreSQL, with the process's memory sampled.

Issue 8, item 7. The driver runs a 3-node DAG (A, then B and C in parallel) over ``instances`` instances
created up front in a private schema; the resident set size (RSS, after a ``gc.collect()``) is taken
when the number of completed instances crosses each mark, with the number of live Python heap blocks
(``sys.getallocatedblocks()``), which shows a leak of Python objects even when freed arenas keep RSS
flat. Memory must not grow with the number of
completed instances: between two late marks it stays flat.

By hand (the figures in docs/reliability.md)::

    python -m tests.reliability.load_memory --instances 50000 --marks 10000,25000,50000

``test_load.py`` runs a smaller variant in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import NewWorkflowInstance
from asyncflow.registry import Registry
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from asyncflow.worker import NormalTaskWorker

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
MB = 1024 * 1024


@dataclass
class Sample:
    """One mark: instances completed, RSS in MiB, live Python heap blocks, seconds since the start."""

    completed: int
    rss_mb: float
    blocks: int
    seconds: float


@dataclass
class LoadResult:
    instances: int
    baseline_mb: float  # after setup, before the driver ran
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0
    passes: int = 0

    def growth_mb(self, first: int, last: int) -> float:
        """RSS growth between two marks (by index), in MiB."""
        return self.samples[last].rss_mb - self.samples[first].rss_mb

    def growth_blocks(self, first: int, last: int) -> int:
        """Growth of the live Python heap blocks between two marks (by index)."""
        return self.samples[last].blocks - self.samples[first].blocks

    def as_dict(self) -> dict[str, Any]:
        return {
            "instances": self.instances,
            "baseline_mb": round(self.baseline_mb, 1),
            "samples": [
                {
                    "completed": s.completed,
                    "rss_mb": round(s.rss_mb, 1),
                    "python_blocks": s.blocks,
                    "seconds": round(s.seconds, 1),
                }
                for s in self.samples
            ],
            "seconds": round(self.seconds, 1),
            "instances_per_second": round(self.instances / self.seconds, 1) if self.seconds else None,
            "passes": self.passes,
        }


def rss_mb() -> float:
    gc.collect()
    return float(psutil.Process().memory_info().rss) / MB


def dag_registry() -> Registry:
    registry = Registry()
    nodes = (NodeConfig(id="A", next_nodes=("B", "C")), NodeConfig(id="B"), NodeConfig(id="C"))
    registry.load_workflow_config(WorkflowConfig(id="load", name="load", nodes=nodes))

    async def work(ctx: JSONContext) -> None:
        ctx.set(["done"], True)

    for node in ("A", "B", "C"):
        registry.register_workflow_task("load", node, NormalTaskWorker(run=work))
    return registry


@contextlib.asynccontextmanager
async def private_schema(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a fresh schema, dropped afterwards."""
    schema = f"load_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(url)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_async_engine(
        url, connect_args={"server_settings": {"search_path": schema}}, pool_size=10, max_overflow=10
    )
    try:
        yield engine
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


async def run_load(url: str, instances: int, marks: Sequence[int], *, concurrency: int = 64) -> LoadResult:
    """Create ``instances`` instances, drive them all, sample RSS at each mark of completed instances."""
    async with private_schema(url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.create_schema()
        for start in range(0, instances, 5000):
            batch = range(start, min(start + 5000, instances))
            await repo.create_workflow_instances(
                [
                    NewWorkflowInstance(workflow_type="load", business_id=f"l{i}", workflow_context={})
                    for i in batch
                ]
            )
        lock = LocalWorkflowLock()
        svc = WorkflowService(repo, lock, dag_registry())
        driver = WorkflowDriver(svc, concurrency=concurrency, poll_interval=0.2)
        result = LoadResult(instances=instances, baseline_mb=rss_mb())
        pending = sorted(marks)
        started = time.monotonic()
        async with driver:
            while pending:
                await asyncio.sleep(0.05)
                done = driver.stats.completed
                while pending and done >= pending[0]:
                    rss = rss_mb()  # after a gc.collect()
                    result.samples.append(
                        Sample(done, rss, sys.getallocatedblocks(), time.monotonic() - started)
                    )
                    pending.pop(0)
                if driver.stats.completed >= instances:
                    break
        result.seconds = time.monotonic() - started
        result.passes = driver.stats.passes
        async with engine.connect() as conn:
            left = (
                await conn.execute(text("SELECT count(*) FROM workflow_instance WHERE status <> 'completed'"))
            ).scalar_one()
        await lock.aclose()
    assert left == 0, f"{left} instances not completed"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("ASYNCFLOW_TEST_POSTGRES_URL", DEFAULT_URL))
    parser.add_argument("--instances", type=int, default=50_000)
    parser.add_argument("--marks", default="10000,25000,50000")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    marks = [int(m) for m in args.marks.split(",")]
    result = asyncio.run(run_load(args.url, args.instances, marks, concurrency=args.concurrency))
    print(json.dumps(result.as_dict(), indent=2))


if __name__ == "__main__":
    main()
