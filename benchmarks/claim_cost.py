"""The server's CPU per claimed instance: the driver's claim function against the statement it replaced.

Loads ``-n`` due instances (one bulk ``INSERT``, then ``VACUUM ANALYZE``, as a table with statistics
has), then claims them all, ``--batch`` per call, on one asyncpg connection, in two ways in turn:

* ``function``: ``asyncflow_claim_v1`` (migration 13), whose two statements are planned once per
  session (``plan_cache_mode = force_generic_plan``);
* ``statement``: the claim as one statement of its own, as before migration 13 (what a database
  without the function still gets: ``CLAIM_STATEMENT_TYPED``). PostgreSQL keeps custom plans for it
  once the table has statistics, so it is planned again on every call;
* ``function+read``: the function, then the passes' leased read of the claimed instances (one
  statement for the batch, as the driver's batched reads make it);
* ``states``: ``asyncflow_claim_states_v1``, the claim that hands the new instances' rows over.

It reports the CPU time (user + system, from ``/proc``) of that connection's server process per
claimed instance. Rounds run the two in turn, so that the machine's noise falls on both alike.

    python -m benchmarks.claim_cost --repeat 5
    python -m benchmarks.claim_cost --batch 4 --repeat 5   # a driver refilling a few slots at a time
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from asyncflow.store.postgres import sql as pg

from .hot_path import PG_URL
from .step_server import _process_cpu_s, alternating_rounds, print_medians, server_connection

WAYS = ("function", "statement", "function+read", "states")
"""``function+read``: the claim function, then the leased read (``load_states(lease=True)``) of the
claimed instances, as a driver's passes read them when nothing is handed over (a shared lock);
``states``: ``asyncflow_claim_states_v1``, which hands the rows of new instances over with their first
lease epoch (a driver on ``LocalWorkflowLock``: no read of their own). The last two compare what a
driver spends on the server per instance before its first step."""


async def _claim(conn: Any, way: str, now: int, batch: int) -> int:
    if way == "states":
        handed = await pg.claim_due_states(conn, now_ms=now, limit=batch, lease_ms=60_000, types=["linear3"])
        if any(record is None for _, record in handed):
            raise RuntimeError("states: a new instance was not handed over")
        return len(handed)
    if way == "function+read":
        ids = await pg.claim_due(conn, now_ms=now, limit=batch, lease_ms=60_000, types=["linear3"])
        if ids:
            await pg.load_states(conn, ids, lease=True)
        return len(ids)
    function = way == "function"
    claimed = await pg.claim_due(
        conn, now_ms=now, limit=batch, lease_ms=60_000, types=["linear3"], function=function
    )
    return len(claimed)


async def _round(conn: Any, pid: int, way: str, n: int, batch: int) -> float:
    """CPU microseconds per instance for claiming ``n`` due instances, ``batch`` per call."""
    now = int(time.time() * 1000)
    await conn.execute("TRUNCATE workflow_instance")
    await conn.execute(
        "INSERT INTO workflow_instance (workflow_type, business_id, status, created_at, updated_at, "
        "next_run_at) SELECT 'linear3', 'b-' || i, 'init', $1::bigint, $1::bigint, "
        "$1::bigint - $2::bigint + i FROM generate_series(1, $2::bigint) i",
        now,
        n,
    )
    await conn.execute("VACUUM ANALYZE workflow_instance")
    await conn.execute("CHECKPOINT")
    before = _process_cpu_s(pid)
    claimed = 0
    for _ in range(-(-n // batch)):
        claimed += await _claim(conn, way, now, batch)
    cpu_us = (_process_cpu_s(pid) - before) / n * 1e6
    if claimed != n:
        raise RuntimeError(f"{way}: {claimed} of {n} instances claimed")
    return cpu_us


async def main(args: argparse.Namespace) -> dict[str, list[float]]:
    async with server_connection(args.pg_url, "claim_cost", ("workflow_instance",)) as (conn, pid):
        for way in WAYS:  # warm-up: the function's and the statement's plans, the catalog caches
            await _round(conn, pid, way, min(args.n, 500), args.batch)

        async def one(way: str, _round_number: int) -> float:
            return await _round(conn, pid, way, args.n, args.batch)

        figures = await alternating_rounds(WAYS, args.repeat, one)
        plans = await conn.fetchrow(
            "SELECT custom_plans, generic_plans FROM pg_prepared_statements WHERE statement = $1",
            pg.CLAIM_STATEMENT_TYPED,
        )
        if plans is not None:  # PostgreSQL 14+ counts them
            print(f"the statement's plans on this connection: {plans[0]} custom, {plans[1]} generic")
    print_medians(figures, f"{args.repeat} rounds of {args.n}, {args.batch} per claim")
    return figures


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.claim_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-n", type=int, default=32_000, help="instances per round and way")
    parser.add_argument("--batch", type=int, default=16, help="instances per claim")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pg-url", default=PG_URL)
    return parser.parse_args(argv)


if __name__ == "__main__":
    if not os.path.isdir("/proc"):
        sys.exit("claim_cost reads the server process's CPU time from /proc (Linux, server on this machine)")
    asyncio.run(main(parse(sys.argv[1:])))
