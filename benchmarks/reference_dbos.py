"""DBOS Transact reference rows: the ``linear3``, ``diamond`` and ``branch`` shapes as DBOS workflows of
steps (``branch``: step A, then step B for an even input or step C for an odd one, then step D: a plain
``if``, as a DBOS user would write it; DBOS records no skipped step), and ``fanout-children``: a parent
workflow that starts 20 child workflows of the ``linear3`` shape with ``DBOS.start_workflow_async``
(each start a checkpointed step, so a recovered parent does not start them twice) and awaits them all.

``approval`` is asyncflow's ``A → approve → B`` with DBOS's durable messaging: step A, then
``DBOS.recv_async("approval", timeout_seconds=60)`` (a checkpointed receive: the workflow waits for a
message on that topic), then the ``approve`` step and step B. The approver is the benchmark, from
outside the workflow, and it approves each workflow once that workflow waits, as asyncflow's harness
does: just before its ``recv`` the workflow tells the benchmark (an in-process callback, not
checkpointed, like asyncflow's ``BenchHooks.waiting`` called from the approval node's wait check) and
the benchmark then sends ``{"approved": True}`` with ``DBOS.send_async(workflow_id, message,
"approval")``. In ``bounded`` mode the task that started the workflow sends it (as asyncflow's direct
mode, whose caller sends the event once its ``create_workflow(run=True)`` returned with ``approve``
waiting) and then awaits the result; in ``queue`` mode ``max(1, c // 4)`` sender tasks send to each
workflow as it reports waiting (as asyncflow's driver mode). The send is inside the timed section; a
workflow whose message is not ``{"approved": True}`` fails, and only a workflow that returned the
expected result counts.

DBOS keeps process-global state (one launched instance per process), so every measured run happens in
a fresh subprocess (``python -m benchmarks.reference_dbos``) on a fresh PostgreSQL database that DBOS
uses as its system database. The subprocess times itself (wall, CPU, peak RSS, per-workflow latency)
and reads the database's commit counter before and after; the parent only creates and drops the
database and parses the result line.

The system database is PostgreSQL (``sys_db_pool_size = max(20, c + 4)``) or, for the SQLite rows, a
fresh SQLite file (DBOS 2+ supports one; its commits are not counted).

Launch modes: ``bounded`` (the default, the fastest measured) keeps ``concurrency`` workflows in flight
with ``DBOS.start_workflow_async`` and awaits each handle; ``queue`` enqueues all ``n`` on a DBOS queue
with ``worker_concurrency = concurrency`` and awaits every handle.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import sys
import time
from collections.abc import Callable
from typing import Any

from .databases import PgAdmin
from .harness import LatencySampler, ResourceProbe, RunMeasurement
from .isolated import print_result, run_module

__all__ = ["DBOS_SHAPES", "DbosUnavailableError", "dbos_version", "run_dbos_once"]

DBOS_SHAPES = ("linear3", "diamond", "approval", "branch", "fanout-children")
FANOUT_CHILDREN = 20
"""Child workflows (each a ``linear3``) one ``fanout-children`` parent starts and awaits."""
LAUNCH_MODES = ("bounded", "queue")
APPROVAL_TOPIC = "approval"
APPROVAL_MESSAGE = {"approved": True}  # asyncflow's approval event carries the same content
APPROVAL_TIMEOUT_S = 60.0


class DbosUnavailableError(RuntimeError):
    """The ``dbos`` package is not installed (``pip install 'asyncflow[bench]'``)."""


def dbos_version() -> str | None:
    """The installed DBOS Transact version, or ``None``."""
    if importlib.util.find_spec("dbos") is None:
        return None
    try:
        return importlib.metadata.version("dbos")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def run_dbos_once(
    shape: str,
    n: int,
    concurrency: int,
    *,
    admin: PgAdmin | None = None,
    launch: str = "bounded",
    timeout_s: float = 1800.0,
    sqlite_path: str | None = None,
) -> RunMeasurement:
    """One measured DBOS run of ``n`` workflows of ``shape`` in a subprocess, on a fresh database.

    The system database is a fresh PostgreSQL database of ``admin``'s server or, with ``sqlite_path``
    (a file that does not exist yet), a SQLite file; commits are counted on PostgreSQL only.
    """
    if shape not in DBOS_SHAPES:
        raise ValueError(f"DBOS reference shapes are {DBOS_SHAPES}, got {shape!r}")
    if launch not in LAUNCH_MODES:
        raise ValueError(f"DBOS launch modes are {LAUNCH_MODES}, got {launch!r}")
    if dbos_version() is None:
        raise DbosUnavailableError("dbos is not installed: pip install 'asyncflow[bench]'")
    if sqlite_path is not None:
        args = [
            "--shape", shape, "-n", str(n), "-c", str(concurrency), "--launch", launch,
            "--dsn", f"sqlite:///{sqlite_path}",
        ]  # fmt: skip
        return await run_module("benchmarks.reference_dbos", args, timeout_s=timeout_s)
    if admin is None:
        raise ValueError("run_dbos_once needs admin (PostgreSQL) or sqlite_path")
    async with admin.fresh_database(f"dbos_{shape}") as db:
        args = [
            "--shape", shape, "-n", str(n), "-c", str(concurrency), "--launch", launch,
            "--database", db.name, "--dsn", db.dsn, "--admin-url", admin.url,
        ]  # fmt: skip
        return await run_module("benchmarks.reference_dbos", args, timeout_s=timeout_s)


# -- the subprocess ------------------------------------------------------------------------------------

_on_waiting: list[Callable[[int, str], object]] = []
"""The benchmark's callback (set while a run is timed): ``(input, workflow_id)`` of an ``approval``
workflow about to wait for its message."""


def _define_workflows() -> dict[str, Any]:
    """The shapes as DBOS async workflows of async steps with tiny outputs."""
    from dbos import DBOS as dbos

    @dbos.step()
    async def step(x: int) -> int:
        return x + 1

    @dbos.workflow()
    async def linear3(x: int) -> int:
        a = await step(x)
        b = await step(a)
        return await step(b)

    @dbos.workflow()
    async def diamond(x: int) -> int:
        a = await step(x)
        branches = await asyncio.gather(step(a), step(a), step(a), step(a))
        return await step(sum(branches))

    @dbos.step()
    async def step_b(x: int) -> int:
        return x + 1

    @dbos.step()
    async def step_c(x: int) -> int:
        return x + 2

    @dbos.workflow()
    async def branch(x: int) -> int:
        a = await step(x)
        chosen = await (step_b(a) if x % 2 == 0 else step_c(a))
        return await step(chosen)

    @dbos.workflow()
    async def fanout_children(x: int) -> int:
        handles = [
            await dbos.start_workflow_async(linear3, FANOUT_CHILDREN * x + k) for k in range(FANOUT_CHILDREN)
        ]
        return sum([await handle.get_result() for handle in handles])

    @dbos.workflow()
    async def approval(x: int) -> int:
        a = await step(x)
        workflow_id = dbos.workflow_id
        assert workflow_id is not None
        for waiting in _on_waiting:
            waiting(x, workflow_id)
        message = await dbos.recv_async(APPROVAL_TOPIC, timeout_seconds=APPROVAL_TIMEOUT_S)
        if message != APPROVAL_MESSAGE:
            raise RuntimeError(f"DBOS approval workflow {x} received {message!r}")
        b = await step(a)  # the approve node's run
        return await step(b)

    return {
        "linear3": linear3,
        "diamond": diamond,
        "approval": approval,
        "branch": branch,
        "fanout-children": fanout_children,
    }


def _expected(shape: str, x: int) -> int:
    if shape == "fanout-children":  # the children's (FANOUT_CHILDREN * x + k) + 3, summed
        return sum(FANOUT_CHILDREN * x + k + 3 for k in range(FANOUT_CHILDREN))
    if shape == "branch":
        return x + 3 if x % 2 == 0 else x + 4
    return x + 3 if shape in ("linear3", "approval") else 4 * (x + 2) + 1


async def _timed(dbos: Any, workflow: Any, args: argparse.Namespace) -> tuple[ResourceProbe, list[float]]:
    n, concurrency = args.n, args.c
    sampler = LatencySampler(n)
    approval = args.shape == "approval"
    loop = asyncio.get_running_loop()
    with ResourceProbe() as probe:
        if args.launch == "bounded":
            counter = iter(range(n))
            waiting: dict[int, asyncio.Future[str]] = {}

            def report_waiting(x: int, workflow_id: str) -> None:
                future = waiting.pop(x, None)
                if future is not None and not future.done():
                    future.set_result(workflow_id)

            if approval:
                _on_waiting[:] = [lambda x, wid: loop.call_soon_threadsafe(report_waiting, x, wid)]

            async def worker() -> None:
                for i in counter:
                    start = time.perf_counter()
                    if approval:
                        waits = waiting[i] = loop.create_future()
                    handle = await dbos.start_workflow_async(workflow, i)
                    if approval:  # once it waits, as asyncflow's direct-mode caller sends its event
                        workflow_id = await asyncio.wait_for(waits, APPROVAL_TIMEOUT_S)
                        await dbos.send_async(workflow_id, APPROVAL_MESSAGE, APPROVAL_TOPIC)
                    result = await handle.get_result()
                    if result != _expected(args.shape, i):
                        raise RuntimeError(f"DBOS workflow {i} returned {result!r}")
                    if sampler.wants(i):
                        sampler.add(time.perf_counter() - start)

            async with asyncio.TaskGroup() as group:
                for _ in range(min(concurrency, n)):
                    group.create_task(worker())
        else:
            queue = await dbos.register_queue_async(
                "asyncflow_bench", worker_concurrency=concurrency, polling_interval_sec=0.01
            )
            to_approve: asyncio.Queue[str | None] = asyncio.Queue()
            if approval:
                _on_waiting[:] = [lambda _x, wid: loop.call_soon_threadsafe(to_approve.put_nowait, wid)]

            async def sender() -> None:  # as asyncflow's driver-mode approvers
                while (workflow_id := await to_approve.get()) is not None:
                    await dbos.send_async(workflow_id, APPROVAL_MESSAGE, APPROVAL_TOPIC)

            senders = [
                asyncio.create_task(sender())
                for _ in range(max(1, min(concurrency, n) // 4) if approval else 0)
            ]
            starts = []
            handles = []
            for i in range(n):
                starts.append(time.perf_counter())
                handles.append(await queue.enqueue_async(workflow, i))

            async def wait(i: int) -> None:
                result = await handles[i].get_result()
                if result != _expected(args.shape, i):
                    raise RuntimeError(f"DBOS workflow {i} returned {result!r}")
                if sampler.wants(i):
                    sampler.add(time.perf_counter() - starts[i])

            try:
                await asyncio.gather(*(wait(i) for i in range(n)))
            finally:
                for _ in senders:
                    to_approve.put_nowait(None)
            await asyncio.gather(*senders)
    _on_waiting.clear()
    return probe, sampler.latencies()


def _subprocess_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reference_dbos")
    parser.add_argument("--shape", choices=DBOS_SHAPES, required=True)
    parser.add_argument("-n", type=int, required=True)
    parser.add_argument("-c", type=int, required=True)
    parser.add_argument("--launch", choices=LAUNCH_MODES, default="bounded")
    parser.add_argument("--database", default=None, help="PostgreSQL: the database, to count commits")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--admin-url", default=None)
    args = parser.parse_args(argv)
    postgres = args.admin_url is not None and args.database is not None

    from dbos import DBOS

    pool_size = max(20, args.c + 4)
    setup_start = time.perf_counter()
    DBOS(
        config={
            "name": "asyncflow_bench",
            "system_database_url": args.dsn,
            "sys_db_pool_size": pool_size,
            "log_level": "WARNING",
        }
    )
    workflows = _define_workflows()
    DBOS.launch()
    admin = PgAdmin(args.admin_url) if postgres else None

    async def measure() -> tuple[int, ResourceProbe, list[float]]:
        before = await admin.xact_commit(args.database, wait_idle=False) if admin is not None else 0
        probe, latencies = await _timed(DBOS, workflows[args.shape], args)
        return before, probe, latencies

    setup_s = time.perf_counter() - setup_start
    before, probe, latencies = asyncio.run(measure())
    DBOS.destroy()
    after = asyncio.run(admin.xact_commit(args.database)) if admin is not None else None
    print_result(
        RunMeasurement(
            n=args.n,
            elapsed_s=probe.wall_s,
            cpu_s=probe.cpu_s,
            peak_rss_bytes=probe.peak_rss_bytes,
            latencies_s=latencies,
            commits=None if after is None else after - before,  # SQLite: not counted
            setup_s=setup_s,
            extra={"launch": args.launch, "sys_db_pool_size": pool_size},
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(_subprocess_main(sys.argv[1:]))
