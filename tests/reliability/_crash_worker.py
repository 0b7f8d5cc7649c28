"""A driver process for the crash test (issue 8, item 1); the test SIGKILLs it at random moments.

Run as ``python -m tests.reliability._crash_worker '<json settings>'`` with keys ``url`` (PostgreSQL),
``schema`` (the test's private schema), ``redis_url``, ``prefix`` (Redis key prefix), ``concurrency``
and ``lock_ttl``. It runs the mixed workflow (tests/reliability/helpers.py) with a ``WorkflowDriver`` on
PostgreSQL with the Redis lock, and records every worker call in the side table ``calls``: a ``start``
row when a ``run``/``wait_check`` begins and a ``done`` row when it finished its work and is about to
return success (one INSERT per row, autocommit). It prints ``READY <pid>`` once the driver runs and,
when no instance is left ``init``/``running``, ``DONE <stats>`` and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from asyncflow.driver import WorkflowDriver
from asyncflow.engine.rules import SchedulePolicy
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.database import DatabaseWorkflowLock
from asyncflow.retry import RetryPolicy
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.reliability.helpers import Journal, mixed_registry

SIDE_TABLES = (
    "CREATE TABLE calls (id bigserial PRIMARY KEY, instance_id bigint NOT NULL, node text NOT NULL, "
    "phase text NOT NULL, event text NOT NULL, pid integer NOT NULL, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE completion_log (id bigserial PRIMARY KEY, instance_id bigint NOT NULL, "
    "task_type text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())",
    """CREATE FUNCTION log_completion() RETURNS trigger AS $$
    BEGIN
        IF NEW.status = 'completed' AND (TG_OP = 'INSERT' OR OLD.status <> 'completed') THEN
            INSERT INTO completion_log (instance_id, task_type)
                VALUES (NEW.workflow_instance_id, NEW.task_type);
        END IF;
        RETURN NEW;
    END $$ LANGUAGE plpgsql""",
    "CREATE TRIGGER log_completion AFTER INSERT OR UPDATE ON task_instance "
    "FOR EACH ROW EXECUTE FUNCTION log_completion()",
)
"""The side table of worker calls, and a trigger that logs every transition of a node into completed."""


def engine_for(settings: dict[str, Any], name: str) -> AsyncEngine:
    server = {"search_path": settings["schema"], "application_name": name}
    return create_async_engine(
        settings["url"], connect_args={"server_settings": server}, pool_size=8, max_overflow=8
    )


async def main(settings: dict[str, Any]) -> None:
    pid = os.getpid()
    engine = engine_for(settings, f"asyncflow-crash-{pid}")
    side = engine.execution_options(isolation_level="AUTOCOMMIT")
    insert = text("INSERT INTO calls (instance_id, node, phase, event, pid) VALUES (:i, :n, :p, :e, :pid)")
    rng = random.Random(pid)

    async def hook(node: str, phase: str, moment: str) -> None:
        from asyncflow.worker import current_node

        instance_id = current_node().instance_id
        event = "start" if moment == "start" else "done"
        if moment == "start":
            await asyncio.sleep(rng.uniform(0.0, 0.004))  # some work, so kills land inside workers too
        row = {"i": instance_id, "n": node, "p": phase, "e": event, "pid": pid}
        for attempt in range(100):  # the record must not fail the worker: retry a busy server
            try:
                async with side.connect() as conn:
                    await conn.execute(insert, row)
                return
            except DBAPIError:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.05)

    repo = SQLAlchemyWorkflowRepo(engine)
    lock: Any
    if settings["redis_url"] is None:  # the lock in PostgreSQL itself
        lock = DatabaseWorkflowLock(repo, prefix=settings["prefix"], op_timeout=2.0)
    else:
        from asyncflow.lock.redis import RedisWorkflowLock

        lock = RedisWorkflowLock(settings["redis_url"], prefix=settings["prefix"], op_timeout=2.0)
    schedule = SchedulePolicy(poll_interval=0.1)
    retry = RetryPolicy(initial_interval=0.1, max_interval=0.5)
    svc = WorkflowService(
        repo,
        lock,
        mixed_registry(Journal(), hook=hook),
        lock_ttl=settings["lock_ttl"],
        schedule=schedule,
        retry=retry,
    )
    driver = WorkflowDriver(svc, concurrency=settings["concurrency"], poll_interval=0.1)
    try:
        async with driver:
            print(f"READY {pid}", flush=True)
            while await _left(engine):  # until nothing is left to run (checked every 100 ms)
                await asyncio.sleep(0.1)
        stats = driver.stats
        print(f"DONE {json.dumps({'passes': stats.passes, 'errors': stats.errors})}", flush=True)
    finally:
        await lock.aclose()
        await repo.aclose()
        await engine.dispose()


async def _left(engine: AsyncEngine) -> int:
    query = text("SELECT count(*) FROM workflow_instance WHERE status IN ('init', 'running')")
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())
    except DBAPIError as exc:  # a busy server: ask again later
        logging.getLogger(__name__).warning("counting instances left failed: %s", exc)
        return -1


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR, format="%(process)d %(name)s %(levelname)s %(message)s")
    asyncio.run(main(json.loads(sys.argv[1])))
