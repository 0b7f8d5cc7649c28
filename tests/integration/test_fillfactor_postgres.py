"""Schema 9's fillfactor on PostgreSQL: which updates of a pass are HOT updates (no index entry written).

Counted with ``pg_stat_get_xact_tuples_updated``/``..._hot_updated`` on the connection that ran the
statements, inside its transaction (the repo joins it): exact per statement, with no statistics flush
to wait for. The driver test reads ``pg_stat_user_tables`` once every session of its engine has ended
(a backend flushes its counters as it exits, before it leaves ``pg_stat_activity``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

import asyncflow as af
from asyncflow.records import NewWorkflowInstance, Step, TaskInsert, TaskUpdate
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine

pytestmark = pytest.mark.postgres

_INSTANCES = 200  # one INSERT: the first pages of the table are packed to the fillfactor
_COUNTS = text(
    "SELECT pg_stat_get_xact_tuples_updated('workflow_instance'::regclass), "
    "pg_stat_get_xact_tuples_hot_updated('workflow_instance'::regclass), "
    "pg_stat_get_xact_tuples_updated('task_instance'::regclass), "
    "pg_stat_get_xact_tuples_hot_updated('task_instance'::regclass)"
)


class Counts:
    """Updates and HOT updates of each table by this connection since the previous call."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self._last = (0, 0, 0, 0)

    async def delta(self) -> dict[str, tuple[int, int]]:
        now = tuple((await self._conn.execute(_COUNTS)).one())
        d = [a - b for a, b in zip(now, self._last, strict=True)]
        self._last = now  # type: ignore[assignment]
        return {"workflow_instance": (d[0], d[1]), "task_instance": (d[2], d[3])}


async def _packed(repo: SQLAlchemyWorkflowRepo, engine: AsyncEngine, fillfactor: int | None) -> int:
    """Migrate (``fillfactor``: set another one on ``workflow_instance`` first), create
    ``_INSTANCES`` instances in one statement; the first one's id (on the first, packed, page)."""
    await repo.migrate()
    if fillfactor is not None:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(f"ALTER TABLE workflow_instance SET (fillfactor = {fillfactor})")
    news = [
        NewWorkflowInstance(workflow_type="wf", business_id=f"b{i}", workflow_context={})
        for i in range(_INSTANCES)
    ]
    ids = await repo.create_workflow_instances(news)
    async with engine.connect() as conn:
        page = (
            await conn.execute(
                text("SELECT (ctid::text::point)[0] FROM workflow_instance WHERE id = :id"), {"id": ids[0]}
            )
        ).scalar()
        pages = (
            await conn.execute(
                text("SELECT pg_relation_size('workflow_instance') / current_setting('block_size')::int")
            )
        ).scalar()
    assert (page, pages >= 3) == (0, True)  # the first row is on page 0, which later rows filled
    return ids[0]


async def test_a_pass_on_a_packed_page_makes_its_updates_that_change_no_indexed_column_hot(
    postgres_url: str,
) -> None:
    """The five updates of a linear workflow's pass, as the driver makes them, on the first page of a
    bulk-loaded table: the claim and the status changes touch indexed columns (``next_run_at``,
    ``status``), so they are not HOT; the leased read (``lease_epoch``) and a step that keeps the
    status and due time are, and so is every node-row update."""
    async with isolated_pg_engine(postgres_url) as engine, SQLAlchemyWorkflowRepo(engine) as repo:
        first = await _packed(repo, engine, None)
        async with engine.connect() as conn, conn.begin(), repo.joined(conn):
            counts = Counts(conn)
            await counts.delta()
            now_ms = int(time.time() * 1000) + 1000
            assert await repo.claim_due_instances(now_ms=now_ms, limit=1, lease_ms=60_000) == [first]
            assert await counts.delta() == {"workflow_instance": (1, 0), "task_instance": (0, 0)}
            state = await repo.load_instance_state(first, lease=True)
            assert state is not None and state[0].lease_epoch == 1
            assert await counts.delta() == {"workflow_instance": (1, 1), "task_instance": (0, 0)}
            node_a = TaskInsert(task_type="A", status="running", node_context={})
            step = Step(instance_id=first, instance_status="running", inserts=(node_a,), lease_epoch=1)
            result = await repo.apply_step(step)
            assert await counts.delta() == {"workflow_instance": (1, 0), "task_instance": (0, 0)}
            a = result.inserted[0]
            node_b = TaskInsert(task_type="B", status="running", node_context={})
            done_a = TaskUpdate(
                id=a.id, expected_version=a.version, status="completed", node_context={"o": 1}
            )
            result = await repo.apply_step(
                Step(instance_id=first, updates=(done_a,), inserts=(node_b,), lease_epoch=1)
            )
            assert await counts.delta() == {"workflow_instance": (1, 1), "task_instance": (1, 1)}
            b = result.inserted[0]
            done_b = TaskUpdate(id=b.id, expected_version=b.version, status="completed")
            result = await repo.apply_step(
                Step(instance_id=first, instance_status="completed", updates=(done_b,), lease_epoch=1)
            )
            assert result.applied
            assert await counts.delta() == {"workflow_instance": (1, 0), "task_instance": (1, 1)}


@pytest.mark.parametrize(("fillfactor", "hot"), [(None, 1), (100, 0)])
async def test_without_the_fillfactor_a_packed_page_has_no_room_for_a_hot_update(
    postgres_url: str, fillfactor: int | None, hot: int
) -> None:
    """The leased read of an instance on a packed page: HOT with schema 9's fillfactor (the page kept
    room), not at fillfactor 100 (the page has no room and nothing dead to prune, so the new version
    goes to another page and every index gets an entry)."""
    async with isolated_pg_engine(postgres_url) as engine, SQLAlchemyWorkflowRepo(engine) as repo:
        first = await _packed(repo, engine, fillfactor)
        async with engine.connect() as conn, conn.begin(), repo.joined(conn):
            counts = Counts(conn)
            await counts.delta()
            assert await repo.load_instance_state(first, lease=True) is not None
            assert (await counts.delta())["workflow_instance"] == (1, hot)


def _linear_registry() -> af.Registry:
    """``lin``: A → B → C, each node a no-op."""
    registry = af.Registry()
    nodes = (
        af.NodeConfig(id="A", name="A", next_nodes=("B",)),
        af.NodeConfig(id="B", name="B", next_nodes=("C",)),
        af.NodeConfig(id="C", name="C"),
    )
    registry.load_workflow_config(af.WorkflowConfig(id="lin", name="lin", nodes=nodes))

    async def run(ctx: Any) -> None:
        return None

    for node in ("A", "B", "C"):
        registry.register_workflow_task("lin", node, af.NormalTaskWorker(run=run))
    return registry


async def _table_counts(postgres_url: str, application_name: str, schema: str) -> tuple[int, int]:
    """``(n_tup_upd, n_tup_hot_upd)`` of the schema's ``workflow_instance`` once no session named
    ``application_name`` is left (each flushed its counters as it exited)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    admin = create_async_engine(postgres_url)
    try:
        async with admin.connect() as conn:
            for _ in range(1000):  # a bound, not a timing: sessions end within milliseconds
                left = (
                    await conn.execute(
                        text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                        {"name": application_name},
                    )
                ).scalar()
                await conn.rollback()
                if left == 0:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the engine's sessions did not end")
            row = (
                await conn.execute(
                    text(
                        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                        "WHERE schemaname = :schema AND relname = 'workflow_instance'"
                    ),
                    {"schema": schema},
                )
            ).one()
            return int(row[0]), int(row[1])
    finally:
        await admin.dispose()


async def test_a_driver_running_linear_workflows_makes_some_instance_updates_hot(postgres_url: str) -> None:
    """120 linear workflows (A → B → C) through a driver on a migrated database, counted in
    ``pg_stat_user_tables``: each instance is updated four times (the claim and three steps: its pass
    starts from the row the claim returned, with no leased read of its own); at most one of them can be
    HOT (the step that completes A and inserts B changes no indexed column), and some are: the first
    claim takes 4 rows of the first, packed, page and keeps their new versions there, and those plus
    the next step's (8 versions of about 140 bytes) fit in the fifth of the page the fillfactor left
    free, pruned or not.

    At fillfactor 100 this workload gets as many HOT updates (the claim, never HOT, moves each row to a
    page with room, and pruning frees the dead versions of a run this slow): the difference shows on a
    packed page (the test above) and with many passes at once (benchmarks/README.md)."""
    n = 120
    name = f"af_ff_{uuid.uuid4().hex[:8]}"
    async with isolated_pg_engine(postgres_url, application_name=name) as engine:
        async with SQLAlchemyWorkflowRepo(engine) as repo:
            await repo.migrate()
            service = af.WorkflowService(repo, af.LocalWorkflowLock(), registry=_linear_registry())
            news = [
                NewWorkflowInstance(workflow_type="lin", business_id=f"b{i}", workflow_context={})
                for i in range(n)
            ]
            await repo.create_workflow_instances(news)
            driver = af.WorkflowDriver(service, concurrency=4, poll_interval=0.05)
            await driver.run_until_idle()
            assert (driver.stats.completed, driver.stats.passes) == (n, n)
            async with engine.connect() as conn:
                schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
        await engine.dispose()  # every session ends, publishing its counters
        updated, hot = await _table_counts(postgres_url, name, schema)
    assert updated == 4 * n
    assert 0 < hot <= n
