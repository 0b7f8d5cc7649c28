"""Lock throughput: acquire + release pairs per second, at concurrency 1 and 32.

Scenarios, all in the same run against the same Redis:

- ``local``: ``LocalWorkflowLock`` (no I/O: the Python cost of ``hold()``).
- ``redis lock``: ``RedisWorkflowLock`` (``SET NX PX`` + Lua compare-and-delete, renewal, re-entrancy
  marker, operation deadlines, cancellation-safe release).
- ``raw SET NX PX + DEL``: plain redis-py, the floor the lock is measured against.
- ``raw SET NX PX + Lua``: plain redis-py with the same compare-and-delete script as the lock.
- ``raw exec SET + Lua``: the same through ``execute_command`` and ``evalsha`` (as the lock sends them):
  the floor for a correct lock with redis-py.

Each concurrent worker uses its own key, so every attempt succeeds. Within a run the scenarios take turns
in short slices (so load from other processes hits them alike); the table shows the median of the runs
with [min-max], and the lock's rate over each floor, computed per run. Run it with::

    python benchmarks/bench_lock.py [--url redis://127.0.0.1:6379/0] [--pairs 4000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio as aioredis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.lock.redis import _RELEASE_LUA, RedisWorkflowLock

PREFIX = "asyncflow:bench:"
TTL = 30.0
OP_TIMEOUT = 2.0

Pair = Callable[[str], Awaitable[None]]


async def measure(pair: Pair, pairs: int, concurrency: int) -> float:
    """Run ``pairs`` acquire+release pairs split over ``concurrency`` workers; return the seconds taken."""
    per_worker = pairs // concurrency

    async def worker(index: int) -> None:
        key = f"w{index}"
        for _ in range(per_worker):
            await pair(key)

    started = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    return time.perf_counter() - started


async def interleaved(
    scenarios: list[tuple[str, Pair, int]], concurrency: int, slices: int
) -> dict[str, float]:
    """One run: every scenario's pairs in ``slices`` slices, taken in turn; returns pairs/s per scenario.

    Interleaving in short slices spreads any load from other processes evenly over the scenarios.
    """
    for _, pair, _ in scenarios:  # warm up: connections, script cache
        await asyncio.gather(*(pair(f"w{index}") for index in range(concurrency)))
    seconds = dict.fromkeys((name for name, _, _ in scenarios), 0.0)
    done = dict.fromkeys(seconds, 0)
    for _ in range(slices):
        for name, pair, pairs in scenarios:
            count = max(concurrency, pairs // slices)
            seconds[name] += await measure(pair, count, concurrency)
            done[name] += count // concurrency * concurrency
    return {name: done[name] / seconds[name] for name in seconds}


async def run(url: str, pairs: int, runs: int, slices: int) -> None:
    local = LocalWorkflowLock()
    lock = RedisWorkflowLock(url, prefix=PREFIX + "lock:", op_timeout=OP_TIMEOUT)
    raw = aioredis.Redis.from_url(url, socket_timeout=OP_TIMEOUT, socket_connect_timeout=OP_TIMEOUT)
    release = raw.register_script(_RELEASE_LUA)
    release_sha = release.sha
    ttl_ms = int(TTL * 1000)

    async def local_pair(key: str) -> None:
        async with local.hold(key, TTL):
            pass

    async def lock_pair(key: str) -> None:
        async with lock.hold(key, TTL):
            pass

    async def raw_del_pair(key: str) -> None:
        name = PREFIX + "raw:" + key
        if not await raw.set(name, secrets.token_hex(16), nx=True, px=ttl_ms):
            raise RuntimeError(f"{name} was taken")
        await raw.delete(name)

    async def raw_exec_lua_pair(key: str) -> None:
        name = PREFIX + "exec:" + key
        token = secrets.token_hex(16)
        if not await raw.execute_command("SET", name, token, "PX", ttl_ms, "NX"):
            raise RuntimeError(f"{name} was taken")
        await raw.evalsha(release_sha, 1, name, token)

    async def raw_lua_pair(key: str) -> None:
        name = PREFIX + "lua:" + key
        token = secrets.token_hex(16)
        if not await raw.set(name, token, nx=True, px=ttl_ms):
            raise RuntimeError(f"{name} was taken")
        await release(keys=[name], args=[token])

    scenarios: list[tuple[str, Pair, int]] = [
        ("local", local_pair, pairs * 10),
        ("redis lock", lock_pair, pairs),
        ("raw SET NX PX + DEL", raw_del_pair, pairs),
        ("raw SET NX PX + Lua", raw_lua_pair, pairs),
        ("raw exec SET + Lua", raw_exec_lua_pair, pairs),
    ]
    results: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(runs):
            for concurrency in (1, 32):
                rates = await interleaved(scenarios, concurrency, slices)
                for name, rate in rates.items():
                    results.setdefault((name, concurrency), []).append(rate)
    finally:
        await lock.aclose()
        await local.aclose()
        await raw.aclose()

    def cell(name: str, concurrency: int) -> str:
        rates = results[(name, concurrency)]
        return f"{statistics.median(rates):>9,.0f} [{min(rates):,.0f}-{max(rates):,.0f}]"

    def ratio(concurrency: int, floor: str) -> str:
        """The lock's rate over the floor's, per run (same slices), as median [min-max]."""
        runs_ = zip(results[("redis lock", concurrency)], results[(floor, concurrency)], strict=True)
        ratios = [lock_rate / floor_rate for lock_rate, floor_rate in runs_]
        return f"{statistics.median(ratios):>9.0%} [{min(ratios):.0%}-{max(ratios):.0%}]"

    print(
        f"Python {platform.python_version()}, redis-py {redis.__version__}, {os.cpu_count()} CPUs, "
        f"{pairs} pairs per Redis run ({pairs * 10} local), median of {runs} [min-max], pairs/s"
    )
    print(f"| {'scenario':<30} | {'c=1':<28} | {'c=32':<28} |")
    print(f"|{'-' * 32}|{'-' * 30}|{'-' * 30}|")
    for name, _, _ in scenarios:
        print(f"| {name:<30} | {cell(name, 1):<28} | {cell(name, 32):<28} |")
    for floor in ("raw SET NX PX + DEL", "raw SET NX PX + Lua", "raw exec SET + Lua"):
        label = f"redis lock / {floor.removeprefix('raw ')}"
        print(f"| {label:<30} | {ratio(1, floor):<28} | {ratio(32, floor):<28} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--url", default=os.environ.get("ASYNCFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--pairs", type=int, default=4000, help="pairs per Redis scenario run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=10, help="interleaving slices per run")
    args = parser.parse_args()
    asyncio.run(run(args.url, args.pairs, args.runs, args.slices))


if __name__ == "__main__":
    main()
