"""PostgreSQL's node rows without a foreign key (migration 11): what the key did is still done.

A step inserts node rows only after its ``UPDATE`` found and locked the instance row;
``create_task_instance`` inserts only where the instance exists, locking it ``FOR KEY SHARE``; the
statement trigger ``asyncflow_delete_tasks`` deletes the node rows of deleted instances."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import asyncflow as af
from asyncflow.errors import StoreError
from asyncflow.records import QueryTaskInstanceParams, Step
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo

from .pg_hot_helpers import BLOCKED_BY_ME, instance_with, task

pytestmark = pytest.mark.postgres

_FOREIGN_KEYS = text(
    "SELECT conname FROM pg_constraint WHERE contype = 'f' AND conrelid = to_regclass('task_instance')"
)
_FK = "fk_task_instance_workflow_instance_id_workflow_instance"
_WAITING_FOR_LOCKS = text(
    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
)


@pytest.fixture
def repo(pg_repo: SQLAlchemyWorkflowRepo) -> SQLAlchemyWorkflowRepo:
    return pg_repo


async def _node_rows(repo: SQLAlchemyWorkflowRepo) -> list[tuple[int, str]]:
    rows = await repo.query_task_instances(QueryTaskInstanceParams())
    return [(r.workflow_instance_id, r.task_type) for r in rows]


async def test_migration_11_drops_the_key_of_a_version_10_database_and_keeps_its_rows(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    instance_id, _ = await instance_with(repo, "a", "b")
    async with repo.engine.begin() as conn:  # back to version 10: the key, no trigger
        await conn.execute(text("DROP TRIGGER asyncflow_delete_tasks ON workflow_instance"))
        await conn.execute(
            text(
                f"ALTER TABLE task_instance ADD CONSTRAINT {_FK} FOREIGN KEY (workflow_instance_id) "
                "REFERENCES workflow_instance (id) ON DELETE CASCADE"
            )
        )
        await conn.execute(text("DELETE FROM asyncflow_schema WHERE version >= 11"))
        assert (await conn.execute(_FOREIGN_KEYS)).scalars().all() == [_FK]
    await repo.migrate()
    async with repo.engine.connect() as conn:
        assert (await conn.execute(_FOREIGN_KEYS)).scalars().all() == []
        versions = (await conn.execute(text("SELECT max(version) FROM asyncflow_schema"))).scalar()
    assert versions == af.SCHEMA_VERSION
    assert await _node_rows(repo) == [(instance_id, "a"), (instance_id, "b")]
    async with repo.engine.begin() as conn:  # the trigger is back: deleting the instance deletes its rows
        await conn.execute(text("DELETE FROM workflow_instance"))
    assert await _node_rows(repo) == []


async def test_deleting_instances_with_plain_sql_deletes_their_node_rows(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    gone = [await instance_with(repo, "a", "b") for _ in range(3)]
    kept, _ = await instance_with(repo, "a")
    async with repo.engine.begin() as conn:
        await conn.execute(
            text("DELETE FROM workflow_instance WHERE id = ANY(:ids)"), {"ids": [i for i, _ in gone]}
        )
    assert await _node_rows(repo) == [(kept, "a")]


async def test_a_node_insert_waits_for_a_delete_of_its_instance_then_is_refused(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    instance_id, _ = await instance_with(repo, "a")
    async with repo.engine.connect() as other:
        await other.begin()
        await other.execute(text("DELETE FROM workflow_instance WHERE id = :i"), {"i": instance_id})
        insert = asyncio.create_task(repo.create_task_instance(instance_id, task("late")))
        step = asyncio.create_task(repo.apply_step(Step(instance_id=instance_id, inserts=(task("later"),))))
        async with asyncio.timeout(10):  # both wait for the row (an unguarded insert would not)
            while (await other.execute(_WAITING_FOR_LOCKS)).scalar_one() < 2:  # one may queue behind one
                await other.execute(text("SELECT pg_stat_clear_snapshot()"))  # kept per transaction else
                await asyncio.sleep(0.01)
        await other.commit()
    with pytest.raises(StoreError, match=f"no workflow_instance {instance_id} "):
        await insert
    assert not (await step).applied
    assert await _node_rows(repo) == []  # no row outlived its instance


async def test_a_delete_waits_for_a_node_insert_in_flight_then_takes_its_row(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    instance_id, _ = await instance_with(repo)
    async with repo.engine.connect() as writer, repo.engine.connect() as deleter:
        await writer.begin()
        await writer.execute(  # an insert in flight: the same statement create_task_instance runs
            repo._backend.insert_task,
            af.store._statements.task_params(instance_id, af.store._prepare.task_row(task("a")), 1),
        )
        await deleter.begin()
        delete = asyncio.create_task(
            deleter.execute(text("DELETE FROM workflow_instance WHERE id = :i"), {"i": instance_id})
        )
        async with asyncio.timeout(10):
            while not (await writer.execute(BLOCKED_BY_ME)).scalars().all():
                await asyncio.sleep(0.01)
        await writer.commit()
        await delete
        await deleter.commit()
    assert await _node_rows(repo) == []


async def test_the_trigger_deletes_in_the_instances_own_schema_whatever_the_search_path(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    gone, _ = await instance_with(repo, "a", "b")
    kept, _ = await instance_with(repo, "a")
    async with repo.engine.connect() as conn:
        schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
        await conn.execute(text("SET search_path = pg_catalog"))  # no task_instance on this path
        await conn.execute(text(f'DELETE FROM "{schema}".workflow_instance WHERE id = :i'), {"i": gone})
        await conn.commit()
        await conn.execute(text(f'SET search_path = "{schema}"'))  # as the pool hands it out
        await conn.commit()
    assert await _node_rows(repo) == [(kept, "a")]


async def test_a_repeatable_read_delete_older_than_a_node_insert_fails_instead_of_orphaning_it(
    repo: SQLAlchemyWorkflowRepo,
) -> None:
    import asyncpg

    instance_id, _ = await instance_with(repo, "a")
    async with repo.engine.connect() as other:
        await other.execution_options(isolation_level="REPEATABLE READ")
        await other.begin()
        await other.execute(text("SELECT count(*) FROM workflow_instance"))  # the snapshot is taken
        await repo.create_task_instance(instance_id, task("b"))  # commits after that snapshot
        with pytest.raises(DBAPIError) as caught:
            await other.execute(text("DELETE FROM workflow_instance WHERE id = :i"), {"i": instance_id})
        assert isinstance(caught.value.orig.__cause__, asyncpg.SerializationError)  # type: ignore[union-attr]
        await other.rollback()
    assert await _node_rows(repo) == [(instance_id, "a"), (instance_id, "b")]
    assert await repo.get_workflow_instance(instance_id) is not None
