"""create_workflow(unique=, on_duplicate=): the database's unique indexes decide, on every backend;
concurrent creates through several repos (connection pools) leave exactly one instance per key; on
PostgreSQL one refused row in a grouped insert fails none of its neighbours."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import asyncflow as af
from asyncflow.driver import WorkflowDriver
from asyncflow.errors import DuplicateWorkflowError, InvalidStateError, ParamInvalidError
from asyncflow.records import NewWorkflowInstance
from asyncflow.store._prepare import Refused, instance_row
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.postgres import sql as pg_sql
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine
from tests.integration.start_helpers import fake_service, one_node_registry


async def test_active_returns_or_raises_the_running_one_then_allows_a_new_one(engine_repo: Any) -> None:
    service, _ = fake_service(engine_repo, one_node_registry("w"))
    first = await service.create_workflow("w", "order-1", unique="active")
    again = await service.create_workflow("w", "order-1", unique="active", context={"x": 1})
    assert again.id == first.id
    with pytest.raises(DuplicateWorkflowError, match="order-1") as raised:
        await service.create_workflow("w", "order-1", unique="always", on_duplicate="raise")
    assert raised.value.instance_id == first.id
    assert isinstance(raised.value, InvalidStateError)
    await WorkflowDriver(service, poll_interval=0.05).run_until_idle()
    assert (await service.get_workflow_instance(first.id)).status == "completed"
    second = await service.create_workflow("w", "order-1", unique="active")
    assert second.id != first.id
    assert await service.count_workflow_instances() == 2


async def test_always_refuses_a_key_that_ever_had_a_unique_instance(engine_repo: Any) -> None:
    service, _ = fake_service(engine_repo, one_node_registry("w", "v"))
    done = await service.create_workflow("w", "k", unique="active", run=True)
    assert done.status == "completed"
    assert (await service.create_workflow("w", "k", unique="always")).id == done.id
    with pytest.raises(DuplicateWorkflowError) as raised:
        await service.create_workflow("w", "k", unique="always", on_duplicate="raise")
    assert raised.value.instance_id == done.id
    always = await service.create_workflow("w", "k2", unique="always", run=True)
    assert (await service.create_workflow("w", "k2", unique="always")).id == always.id
    assert (await service.create_workflow("w", "k2", unique="active")).id != always.id  # none is active
    other_type = await service.create_workflow("v", "k2", unique="always")
    assert other_type.id != always.id
    assert await service.count_workflow_instances() == 4


async def test_instances_without_unique_take_no_part(engine_repo: Any) -> None:
    service, _ = fake_service(engine_repo, one_node_registry("w"))
    plain = await service.create_workflow("w", "k")
    unique = await service.create_workflow("w", "k", unique="always")
    assert unique.id != plain.id
    another_plain = await service.create_workflow("w", "k")
    assert another_plain.id not in (plain.id, unique.id)
    assert (await service.create_workflow("w", "k", unique="active")).id == unique.id


async def test_bulk_create_gives_the_existing_id_for_a_duplicate(engine_repo: Any) -> None:
    news = [
        NewWorkflowInstance(workflow_type="w", business_id=b, workflow_context={}, unique="active")
        for b in ("a", "b", "a")
    ]
    ids = await engine_repo.create_workflow_instances(news)
    assert ids[0] == ids[2] != ids[1]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"unique": "sometimes"}, "unique must be"),
        ({"unique": True}, "unique must be"),
        ({"unique": "active", "on_duplicate": "ignore"}, "on_duplicate must be"),
        ({"on_duplicate": None}, "on_duplicate must be"),
    ],
)
async def test_bad_unique_arguments_raise_and_write_nothing(kwargs: dict[str, Any], words: str) -> None:
    service, _ = fake_service(MemoryWorkflowRepo(), one_node_registry("w"))
    with pytest.raises(ParamInvalidError, match=words):
        await service.create_workflow("w", "b", **kwargs)
    assert await service.count_workflow_instances() == 0
    with pytest.raises(ParamInvalidError, match="unique must be"):
        await service.repo.create_workflow_instance(
            NewWorkflowInstance(workflow_type="w", business_id="b", workflow_context={}, unique="x")
        )


async def _race(repos: list[Any], keys: int, per_repo: int, mode: str) -> list[int]:
    services = [fake_service(repo, one_node_registry("w"))[0] for repo in repos]
    calls = [
        service.create_workflow("w", f"key-{i % keys}", unique=mode)  # type: ignore[arg-type]
        for service in services
        for i in range(per_repo)
    ]
    return [inst.id for inst in await asyncio.gather(*calls)]


@pytest.mark.parametrize("mode", ["active", "always"])
async def test_concurrent_creates_through_three_pools_leave_one_per_key_postgres(
    postgres_url: str, mode: str
) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        repo = SQLAlchemyWorkflowRepo(engine)
        await repo.migrate()
        # more repos on the same schema, each with an engine and pool of its own (as other processes)
        settings = {"server_settings": {"search_path": await _schema(engine)}}
        others = [SQLAlchemyWorkflowRepo(postgres_url, connect_args=settings) for _ in range(2)]
        try:
            ids = await _race([repo, *others], keys=10, per_repo=100, mode=mode)
            per_key: dict[int, set[int]] = {}
            for i, instance_id in enumerate(ids):
                per_key.setdefault(i % 10, set()).add(instance_id)
            assert all(len(found) == 1 for found in per_key.values()), per_key
            assert await repo.count_workflow_instances(af.QueryWorkflowInstanceParams()) == 10
        finally:
            for other in others:
                await other.aclose()
            await repo.aclose()


async def _schema(engine: Any) -> str:
    async with engine.connect() as conn:
        schema: str = (await conn.exec_driver_sql("SELECT current_schema()")).scalar_one()
    return schema


async def test_concurrent_creates_through_two_repos_leave_one_per_key_sqlite(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/u.db"
    repos = [SQLAlchemyWorkflowRepo(url), SQLAlchemyWorkflowRepo(url)]
    await repos[0].migrate()
    try:
        ids = await _race(repos, keys=5, per_repo=40, mode="active")
        assert len(set(ids)) == 5
        assert await repos[1].count_workflow_instances(af.QueryWorkflowInstanceParams()) == 5
    finally:
        for repo in repos:
            await repo.aclose()


async def test_a_refused_row_fails_none_of_its_neighbours_in_one_postgres_insert(pg_engine: Any) -> None:
    repo = SQLAlchemyWorkflowRepo(pg_engine)
    await repo.migrate()
    try:
        held = await repo.create_workflow_instance(
            NewWorkflowInstance(workflow_type="w", business_id="taken", workflow_context={}, unique="active")
        )
        rows = [
            (
                instance_row(
                    NewWorkflowInstance(workflow_type="w", business_id=b, workflow_context={}, unique=u)
                ),
                1,
            )
            for b, u in (("p1", None), ("taken", "active"), ("u1", "always"), ("u1", "always"), ("p2", None))
        ]
        async with pg_engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            ids = await pg_sql.create_instances(driver, rows)
            await conn.commit()
        assert [isinstance(i, Refused) for i in ids] == [False, True, False, True, False]
        assert ids[1] == Refused(held.id)  # the statement names the instance that refused the row
        assert held.id not in ids
        names = {r.business_id for r in await repo.query_workflow_instances(af.QueryWorkflowInstanceParams())}
        assert names == {"taken", "p1", "u1", "p2"}
        # and through the repo's grouped creates: 40 at once, 10 of them refused
        creates = [
            repo.create_workflow_instance(
                NewWorkflowInstance(
                    workflow_type="w",
                    business_id="taken" if i % 4 == 0 else f"g{i}",
                    workflow_context={},
                    unique="active" if i % 2 == 0 else None,
                )
            )
            for i in range(40)
        ]
        outcomes = await asyncio.gather(*creates, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, DuplicateWorkflowError)]
        assert len(refused) == 10 and all(o.instance_id == held.id for o in refused)
        assert all(not isinstance(o, BaseException) for i, o in enumerate(outcomes) if i % 4)
    finally:
        await repo.aclose()


async def test_a_unique_instance_cannot_restart_while_another_of_its_key_is_active(engine_repo: Any) -> None:
    service, _ = fake_service(engine_repo, one_node_registry("w"))
    first = await service.create_workflow("w", "k", unique="active")
    await service.cancel_workflow_instance(first.id)
    second = await service.create_workflow("w", "k", unique="active")
    assert second.id != first.id
    with pytest.raises(InvalidStateError, match="cannot run again"):
        await service.restart_workflow_instance(first.id)
    with pytest.raises(InvalidStateError, match="cannot run again"):
        await service.restart_workflow_node(first.id, "A", force=True)
    assert (await service.get_workflow_instance(first.id)).status == "canceled"
    await service.cancel_workflow_instance(second.id)
    assert (await service.restart_workflow_instance(first.id)).status == "running"


async def test_concurrent_creates_of_one_key_in_one_service_share_the_leader_s_outcome(
    engine_repo: Any,
) -> None:
    service, _ = fake_service(engine_repo, one_node_registry("w"))
    made = await asyncio.gather(*(service.create_workflow("w", "k", unique="active") for _ in range(20)))
    assert len({inst.id for inst in made}) == 1
    raised = await asyncio.gather(
        *(service.create_workflow("w", "k", unique="active", on_duplicate="raise") for _ in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(e, DuplicateWorkflowError) and e.instance_id == made[0].id for e in raised)
    # a refused leader does not decide for the others: "always" is refused by the (ended) instance,
    # "active" finds no active one and creates
    await service.cancel_workflow_instance(made[0].id)
    always, active = await asyncio.gather(
        service.create_workflow("w", "k", unique="always"), service.create_workflow("w", "k", unique="active")
    )
    assert always.id == made[0].id
    assert active.id != made[0].id
    assert await service.count_workflow_instances() == 2
