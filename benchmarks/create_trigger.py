"""The server's CPU per created instance under the driver's NOTIFY triggers, without the engine around it.

Inserts due instances through the create batch's own statement (one JSON array of rows, as
``create_instances`` sends it), ``--batch`` rows per statement, on one asyncpg connection, with each
of three trigger set-ups in turn: none, the older single row trigger (``AFTER INSERT OR UPDATE OF
next_run_at``, one call of its function per row) and the current ones (the row trigger on updates,
and the statement trigger on inserts, one call per statement). It reports the CPU time (user +
system, from ``/proc``) of that connection's server process per instance. Rounds run the three in
turn, so that the machine's noise falls on all three alike.

    python -m benchmarks.create_trigger --repeat 7
    python -m benchmarks.create_trigger --batch 1 --repeat 7   # single creates
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from asyncflow.store._prepare import InstanceRow
from asyncflow.store.postgres import sql as pg
from asyncflow.store.postgres.notify import (
    _FUNCTION_SQL,
    _INSERT_FUNCTION_SQL,
    _INSERT_TRIGGER_SQL,
    _TRIGGER_SQL,
)

from .bench_driver import _DROP_SQL
from .hot_path import PG_URL
from .step_server import _process_cpu_s, alternating_rounds, print_medians, server_connection

SETUPS = ("none", "row", "statement")
_OLDER = _TRIGGER_SQL.replace("AFTER UPDATE OF", "AFTER INSERT OR UPDATE OF", 1)


async def _set_up(conn: Any, setup: str) -> None:
    await conn.execute(_DROP_SQL)
    if setup == "row":
        await conn.execute(_OLDER)
    elif setup == "statement":
        await conn.execute(_TRIGGER_SQL)
        await conn.execute(_INSERT_TRIGGER_SQL)


async def _round(conn: Any, pid: int, n: int, batch: int, tag: str) -> float:
    """CPU microseconds per instance for ``n`` due creates, ``batch`` per statement."""
    now = int(time.time() * 1000)
    rows = [(InstanceRow("linear3", f"{tag}-{i}", "init", "{}", 0, 0), now) for i in range(n)]
    await conn.execute("CHECKPOINT")
    before = _process_cpu_s(pid)
    created = 0
    for start in range(0, n, batch):
        created += len(await pg.create_instances(conn, rows[start : start + batch]))
    cpu_us = (_process_cpu_s(pid) - before) / n * 1e6
    if created != n:
        raise RuntimeError(f"{created} of {n} instances created")
    await conn.execute("TRUNCATE workflow_instance CASCADE")
    return cpu_us


async def main(args: argparse.Namespace) -> dict[str, list[float]]:
    async with server_connection(args.pg_url, "create_trigger", ("workflow_instance",)) as (conn, pid):
        await conn.execute(_FUNCTION_SQL)
        await conn.execute(_INSERT_FUNCTION_SQL)
        for setup in SETUPS:
            await _set_up(conn, setup)
            await _round(conn, pid, min(args.n, 500), args.batch, f"warm-{setup}")

        async def one(setup: str, r: int) -> float:
            await _set_up(conn, setup)
            return await _round(conn, pid, args.n, args.batch, f"r{r}-{setup}")

        figures = await alternating_rounds(SETUPS, args.repeat, one)
    print_medians(figures, f"{args.repeat} rounds of {args.n}, {args.batch} per statement")
    return figures


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.create_trigger", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-n", type=int, default=16_000, help="instances per round and set-up")
    parser.add_argument("--batch", type=int, default=16, help="instances per statement")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pg-url", default=PG_URL)
    return parser.parse_args(argv)


if __name__ == "__main__":
    if not os.path.isdir("/proc"):
        sys.exit(
            "create_trigger reads the server process's CPU time from /proc (Linux, server on this machine)"
        )
    asyncio.run(main(parse(sys.argv[1:])))
