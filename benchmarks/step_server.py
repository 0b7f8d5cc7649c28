"""The server's CPU per step of PostgreSQL's step function, without the engine around it.

Replays the three steps of a ``linear3`` workflow (the root and ``A`` inserted with the instance
moved to ``running``; ``B`` inserted; ``C`` and ``end`` inserted with the instance ``completed``),
built by the store's own code (``prepared_step`` and ``step_json``) as a pass builds them, against
fresh instances: one asyncpg connection sends them in batches of ``--batch`` through the statement
the repo's group commit uses (``FAST_BATCH_CALL``). It reports the CPU time (user + system, from
``/proc``) of that connection's server process per step. No Python engine runs meanwhile, so the
figure is the function's own (and its triggers', indexes' and commits'), with far less noise than the
server CPU of a whole ``hot_path`` run.

    python -m benchmarks.step_server -n 5000 --repeat 5
    python -m benchmarks.step_server --due-trigger   # with the driver's asyncflow_due_notify installed

Compare two trees by running it in each (the database gets the function and triggers that the
running tree's ``migrate()`` installs). Each round starts after a ``CHECKPOINT`` (full-page writes
then cost every round alike) and autovacuum is off on the two tables (it would land in random
rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncflow as af
from asyncflow.records import Step, TaskInsert
from asyncflow.store._prepare import InstanceRow, prepared_step
from asyncflow.store.postgres import sql as pg
from asyncflow.store.postgres.batches import FAST_BATCH_CALL

from .databases import PgAdmin
from .hot_path import PG_URL, _proc_stat


def _process_cpu_s(pid: int) -> float:
    stat = _proc_stat(pid)
    if stat is None:
        raise RuntimeError(f"server process {pid} is gone")
    return stat[1] / os.sysconf("SC_CLK_TCK")


def _is_local_backend(pid: int) -> bool:
    """``pid`` is a PostgreSQL process of this machine (a server elsewhere, or in a container, is not)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0].startswith("postgres")


def _linear3_steps(instance_id: int, epoch: int) -> list[Step]:
    def node(task_type: str, pre: str | None) -> TaskInsert:
        context: dict[str, Any] = {"out": 1, "workflow_context": {}}
        if pre is not None:
            context["pre_node_context"] = {pre: {"out": 1}}
        return TaskInsert(task_type=task_type, status="completed", node_context=context)

    return [
        Step(
            instance_id=instance_id,
            instance_status="running",
            inserts=(node("root", None), node("A", "root")),
            lease_epoch=epoch,
        ),
        Step(instance_id=instance_id, inserts=(node("B", "A"),), lease_epoch=epoch),
        Step(
            instance_id=instance_id,
            instance_status="completed",
            inserts=(node("C", "B"), node("end", "C")),
            lease_epoch=epoch,
        ),
    ]


async def _round(conn: Any, pid: int, n: int, batch: int, tag: str) -> float:
    """CPU microseconds per step for ``n`` new instances' steps (all first steps, then all second, ...)."""
    rows = [(InstanceRow("linear3", f"{tag}-{i}", "init", "{}", 0, 0), 0) for i in range(n)]
    ids: list[Any] = []
    for start in range(0, n, 1000):
        ids += await pg.create_instances(conn, rows[start : start + 1000])
    now = int(time.time())
    phases = [[pg.step_json(prepared_step(s), now) for s in _linear3_steps(i, 0)] for i in ids]
    payloads = [steps[k] for k in range(3) for steps in phases]
    await conn.execute("CHECKPOINT")
    before = _process_cpu_s(pid)
    for start in range(0, len(payloads), batch):
        await conn.fetch(FAST_BATCH_CALL, "[" + ",".join(payloads[start : start + batch]) + "]")
    cpu_us = (_process_cpu_s(pid) - before) / len(payloads) * 1e6
    done = await conn.fetchval(
        "SELECT count(*) FROM workflow_instance AS w"
        " WHERE w.id = ANY($1::bigint[]) AND w.status = 'completed'"
        " AND (SELECT count(*) FROM task_instance AS t WHERE t.workflow_instance_id = w.id) = 5",
        ids,
    )
    if done != n:  # a step that did not apply raises; this checks what the applied ones wrote
        raise RuntimeError(f"{done} of {n} instances completed with their 5 node rows")
    return cpu_us


@asynccontextmanager
async def server_connection(
    pg_url: str, name: str, tables: tuple[str, ...]
) -> AsyncIterator[tuple[Any, int]]:
    """A fresh database with asyncflow's schema (autovacuum off on ``tables``), one asyncpg connection to
    it, and that connection's server process (on this machine: its CPU time is read from ``/proc``)."""
    import asyncpg

    async with PgAdmin(pg_url).fresh_database(name) as db:
        repo = af.SQLAlchemyWorkflowRepo(db.sqlalchemy_url)
        try:
            await repo.migrate()
        finally:
            await repo.aclose()
        conn = await asyncpg.connect(db.dsn)
        try:
            for table in tables:
                await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            if not _is_local_backend(pid):
                raise RuntimeError(
                    f"server process {pid} is not on this machine (or /proc does not show it): "
                    f"{name} reads its CPU time from /proc"
                )
            yield conn, pid
        finally:
            await conn.close()


async def alternating_rounds(
    names: Sequence[str], repeat: int, one: Callable[[str, int], Awaitable[float]]
) -> dict[str, list[float]]:
    """``repeat`` rounds, each running ``one(name, round)`` for every name in turn, so the machine's noise
    falls on all alike; prints each round's server CPU per instance. The figures by name."""
    figures: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names:
            figures[name].append(await one(name, r))
        line = ", ".join(f"{name} {values[-1]:.1f}" for name, values in figures.items())
        print(f"[{r + 1}] server CPU us/instance: {line}", flush=True)
    return figures


def print_medians(figures: dict[str, list[float]], detail: str) -> None:
    """Each name's median server CPU per instance, with its spread and ``detail`` (the rounds' sizes)."""
    for name, values in figures.items():
        print(
            f"{name:9s} {statistics.median(values):.1f} server CPU us/instance "
            f"[{min(values):.1f}-{max(values):.1f}] ({detail})"
        )


async def main(args: argparse.Namespace) -> list[float]:
    tables = ("workflow_instance", "task_instance")
    async with server_connection(args.pg_url, "step_server", tables) as (conn, pid):
        if args.due_trigger:
            from asyncflow.store.postgres.notify import _FUNCTION_SQL, _TRIGGER_SQL

            await conn.execute(_FUNCTION_SQL)
            await conn.execute(_TRIGGER_SQL)
        await _round(conn, pid, min(args.n, 500), args.batch, "warm")
        figures = []
        for r in range(args.repeat):
            figures.append(await _round(conn, pid, args.n, args.batch, f"r{r}"))
            print(f"[{r + 1}] {figures[-1]:.1f} server CPU us/step", flush=True)
    print(
        f"step function{' + due trigger' if args.due_trigger else ''}: "
        f"{statistics.median(figures):.1f} server CPU us/step [{min(figures):.1f}-{max(figures):.1f}] "
        f"({args.repeat} rounds of {3 * args.n} steps, batches of {args.batch})"
    )
    return figures


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.step_server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-n", type=int, default=5000, help="instances per round (3 steps each)")
    parser.add_argument("--batch", type=int, default=16, help="steps per statement")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--due-trigger", action="store_true", help="install the driver's NOTIFY trigger")
    parser.add_argument("--pg-url", default=PG_URL)
    return parser.parse_args(argv)


if __name__ == "__main__":
    if not os.path.isdir("/proc"):
        sys.exit("step_server reads the server process's CPU time from /proc (Linux, server on this machine)")
    asyncio.run(main(parse(sys.argv[1:])))
