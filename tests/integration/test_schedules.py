"""Cron schedules: ticks from the service's FakeClock (no sleeping) on every backend, first sight,
catch-up, time zones, exactly once across drivers of separate repos, and ConfigError for bad ones."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import asyncflow as af
from asyncflow.driver import WorkflowDriver
from asyncflow.errors import ConfigError
from asyncflow.records import QueryWorkflowInstanceParams
from asyncflow.schedules import tick_name
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine
from tests.integration.start_helpers import fake_service, one_node_registry

START = datetime(2026, 1, 1, 0, 3, tzinfo=UTC).timestamp()  # a Thursday, 00:03 UTC


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


async def _business_ids(service: af.WorkflowService) -> list[str]:
    found = await service.query_workflow_instances(QueryWorkflowInstanceParams(page=af.Pager(no_limit=True)))
    return [inst.business_id for inst in found]


def _service(repo: Any, *schedules: af.Schedule) -> tuple[af.WorkflowService, Any]:
    registry = one_node_registry("report")
    for schedule in schedules:
        registry.add_schedule(schedule)
    service, clock = fake_service(repo, registry)
    clock.advance(START - clock.time())
    return service, clock


async def test_a_schedule_fires_from_its_next_tick_and_once_per_tick(engine_repo: Any) -> None:
    every10 = af.Schedule(id="ten", workflow_type="report", cron="*/10 * * * *", context={"kind": "x"})
    service, clock = _service(engine_repo, every10)
    driver = WorkflowDriver(service, poll_interval=0.05)
    await driver.run_until_idle()
    assert await _business_ids(service) == []  # first seen at 00:03: no past tick
    clock.advance(7 * 60 + 30)  # 00:10:30
    await driver.run_until_idle()
    await driver.run_until_idle()  # again: the same tick does not fire twice
    [inst] = await service.query_workflow_instances(QueryWorkflowInstanceParams())
    assert inst.business_id == "ten@2026-01-01T00:10:00Z"
    assert inst.workflow_context == {"kind": "x", "schedule": {"id": "ten", "tick": "2026-01-01T00:10:00Z"}}
    assert inst.status == "completed"
    clock.advance(35 * 60)  # 00:45:30, ticks 00:20, 00:30, 00:40 missed: only the latest fires
    await driver.run_until_idle()
    assert await _business_ids(service) == ["ten@2026-01-01T00:10:00Z", "ten@2026-01-01T00:40:00Z"]
    states = await engine_repo.schedule_states()
    assert states["ten"].last_tick == "2026-01-01T00:40:00Z"


async def test_a_schedule_keeps_the_context_it_was_made_with(engine_repo: Any) -> None:
    # The context was validated at creation but not copied: the caller's later changes to its dict
    # reached every later tick (a NaN added afterwards made each tick's insert fail).
    context: dict[str, Any] = {"kind": "x", "to": {"team": ["ops"]}}
    schedule = af.Schedule(id="ten", workflow_type="report", cron="*/10 * * * *", context=context)
    context["kind"] = "changed"
    context["to"]["team"].append("everyone")
    context["bad"] = float("nan")
    service, clock = _service(engine_repo, schedule)
    driver = WorkflowDriver(service, poll_interval=0.05)
    await driver.run_until_idle()
    clock.advance(7 * 60)  # 00:10
    await driver.run_until_idle()
    [inst] = await service.query_workflow_instances(QueryWorkflowInstanceParams())
    assert inst.workflow_context == {
        "kind": "x",
        "to": {"team": ["ops"]},
        "schedule": {"id": "ten", "tick": "2026-01-01T00:10:00Z"},
    }
    assert schedule.context == {"kind": "x", "to": {"team": ["ops"]}}


async def test_catch_up_fires_every_missed_tick_oldest_first(engine_repo: Any) -> None:
    hourly = af.Schedule(id="h", workflow_type="report", cron="0 * * * *", catch_up=True)
    service, clock = _service(engine_repo, hourly)
    driver = WorkflowDriver(service, poll_interval=0.05)
    await driver.run_until_idle()
    clock.advance(4 * 3600)  # 04:03: 01:00 .. 04:00 are due
    await driver.run_until_idle()
    assert await _business_ids(service) == [f"h@2026-01-01T0{h}:00:00Z" for h in range(1, 5)]


async def test_ticks_follow_the_time_zone(engine_repo: Any) -> None:
    new_york = af.Schedule(id="ny", workflow_type="report", cron="0 2 * * *", timezone="America/New_York")
    service, clock = _service(engine_repo, new_york)
    driver = WorkflowDriver(service, poll_interval=0.05)
    await driver.run_until_idle()
    clock.advance(3 * 3600)  # 03:03 UTC = 22:03 in New York: not yet
    await driver.run_until_idle()
    assert await _business_ids(service) == []
    clock.advance(4 * 3600)  # 07:03 UTC = 02:03 EST
    await driver.run_until_idle()
    assert await _business_ids(service) == ["ny@2026-01-01T07:00:00Z"]


async def test_ticks_of_a_repeated_hour_fire_each_at_its_time(engine_repo: Any) -> None:
    # Paris, night of 2024-10-27: 03:00 CEST (01:00 UTC) goes back to 02:00 CET, so 02:00 and 02:30
    # come twice (00:00/00:30 UTC, then 01:00/01:30 UTC); cron fires "*/30 * * * *" at each. Without
    # catch-up, the latest tick was looked up on the first pass of the hour: 02:00 and 02:30 CET
    # never fired (only 00:30 and 02:00 UTC did).
    half_hourly = af.Schedule(id="p", workflow_type="report", cron="*/30 * * * *", timezone="Europe/Paris")
    service, clock = _service(engine_repo, half_hourly)
    clock.advance(datetime(2024, 10, 27, 0, 20, 10, tzinfo=UTC).timestamp() - clock.time())
    driver = WorkflowDriver(service, poll_interval=0.05)
    await driver.run_until_idle()  # first seen at 00:20:10 UTC
    seen: list[tuple[str, list[str]]] = []
    for hour, minute in [(0, 30), (0, 59), (1, 0), (1, 29), (1, 30), (2, 0)]:
        clock.advance(datetime(2024, 10, 27, hour, minute, 10, tzinfo=UTC).timestamp() - clock.time())
        await driver.run_until_idle()
        seen.append(
            (
                f"{hour:02d}:{minute:02d}",
                [b.removeprefix("p@2024-10-27T") for b in await _business_ids(service)],
            )
        )
    assert seen == [
        ("00:30", ["00:30:00Z"]),
        ("00:59", ["00:30:00Z"]),
        ("01:00", ["00:30:00Z", "01:00:00Z"]),
        ("01:29", ["00:30:00Z", "01:00:00Z"]),
        ("01:30", ["00:30:00Z", "01:00:00Z", "01:30:00Z"]),
        ("02:00", ["00:30:00Z", "01:00:00Z", "01:30:00Z", "02:00:00Z"]),
    ]


async def test_a_driver_fires_only_the_schedules_of_its_workflow_types(engine_repo: Any) -> None:
    schedule = af.Schedule(id="m", workflow_type="report", cron="* * * * *")
    service, clock = _service(engine_repo, schedule)
    other = WorkflowDriver(service, poll_interval=0.05, workflow_types=["other"])
    await other.run_until_idle()
    clock.advance(120)
    await other.run_until_idle()
    assert await _business_ids(service) == []
    assert await engine_repo.schedule_states() == {}


async def _exactly_once(repos: list[Any]) -> None:
    schedule = af.Schedule(id="m", workflow_type="report", cron="* * * * *", catch_up=True)
    pairs = [_service(repo, schedule) for repo in repos]
    drivers = [WorkflowDriver(service, poll_interval=0.05) for service, _ in pairs]
    await drivers[0].run_until_idle()  # first seen at 00:03
    for _, clock in pairs:
        clock.advance(30 * 60)  # 30 missed minutes
    await asyncio.gather(*(driver.run_until_idle() for driver in drivers))
    for _, clock in pairs:
        clock.advance(60)
    await asyncio.gather(*(driver.run_until_idle() for driver in drivers))
    names = await _business_ids(pairs[0][0])
    expected = [f"m@2026-01-01T{(3 + i) // 60:02d}:{(3 + i) % 60:02d}:00Z" for i in range(1, 32)]
    assert sorted(names) == expected  # 31 ticks, each exactly once


@pytest.mark.postgres
async def test_three_drivers_on_three_pools_fire_each_tick_exactly_once_postgres(postgres_url: str) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        first = SQLAlchemyWorkflowRepo(engine)
        await first.migrate()
        async with engine.connect() as conn:
            schema = (await conn.exec_driver_sql("SELECT current_schema()")).scalar_one()
        settings = {"server_settings": {"search_path": schema}}
        others = [SQLAlchemyWorkflowRepo(postgres_url, connect_args=settings) for _ in range(2)]
        try:
            await _exactly_once([first, *others])
        finally:
            for repo in (first, *others):
                await repo.aclose()


async def test_two_drivers_on_one_sqlite_file_fire_each_tick_exactly_once(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/s.db"
    repos = [SQLAlchemyWorkflowRepo(url), SQLAlchemyWorkflowRepo(url)]
    await repos[0].migrate()
    try:
        await _exactly_once(repos)
    finally:
        for repo in repos:
            await repo.aclose()


async def _stale_round_after_a_prune(repos: list[Any]) -> list[str]:
    # Driver "b" fires both schedules, "report" only the daily one. Ten days down: in their next
    # rounds "report" fires the daily ticks Jan 1..10 (firing Jan 10 prunes the tick rows before Jan
    # 3) while "b" fires 100 hourly ticks first, then the daily ones from the state it read before
    # all that. A tick already fired must not fire again once its row is pruned.
    hourly = af.Schedule(id="h", workflow_type="b", cron="0 * * * *", catch_up=True)
    daily = af.Schedule(id="d", workflow_type="report", cron="0 2 * * *", catch_up=True)
    pairs = []
    for repo in repos:
        registry = one_node_registry("report", "b")
        registry.add_schedule(hourly)
        registry.add_schedule(daily)
        service, clock = fake_service(repo, registry)
        clock.advance(START - clock.time())
        pairs.append((service, clock))
    both = WorkflowDriver(pairs[0][0], poll_interval=0.05)
    report_only = WorkflowDriver(pairs[1][0], poll_interval=0.05, workflow_types=["report"])
    await both.run_until_idle()  # both first seen on Jan 1 at 00:03
    for _, clock in pairs:
        clock.advance(10 * 86400)
    await asyncio.gather(both.run_until_idle(), report_only.run_until_idle())
    names = await _business_ids(pairs[0][0])
    return sorted(name for name in names if name.startswith("d@"))


_DAILY = [f"d@2026-01-{day:02d}T02:00:00Z" for day in range(1, 11)]


async def test_a_driver_with_an_old_state_does_not_fire_pruned_ticks_again_sqlite(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/s.db"
    repos = [SQLAlchemyWorkflowRepo(url), SQLAlchemyWorkflowRepo(url)]
    await repos[0].migrate()
    try:
        assert await _stale_round_after_a_prune(repos) == _DAILY  # each once
    finally:
        for repo in repos:
            await repo.aclose()


@pytest.mark.postgres
async def test_a_driver_with_an_old_state_does_not_fire_pruned_ticks_again_postgres(
    postgres_url: str,
) -> None:
    async with isolated_pg_engine(postgres_url) as engine:
        first = SQLAlchemyWorkflowRepo(engine)
        await first.migrate()
        async with engine.connect() as conn:
            schema = (await conn.exec_driver_sql("SELECT current_schema()")).scalar_one()
        other = SQLAlchemyWorkflowRepo(
            postgres_url, connect_args={"server_settings": {"search_path": schema}}
        )
        try:
            assert await _stale_round_after_a_prune([first, other]) == _DAILY  # each once
        finally:
            await other.aclose()
            await first.aclose()


async def test_a_driver_with_an_old_state_does_not_fire_pruned_ticks_again_memory() -> None:
    repo = af.MemoryWorkflowRepo()
    assert await _stale_round_after_a_prune([repo, repo]) == _DAILY  # each once


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"cron": "0 2 * *"}, "5 fields"),
        ({"cron": "0 2 * * * *"}, "5 fields"),
        ({"cron": "61 * * * *"}, "invalid cron"),
        ({"cron": "0 25 * * *"}, "invalid cron"),
        ({"cron": None}, "5 fields"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"timezone": ""}, "unknown time zone"),
        ({"id": ""}, "schedule id"),
        ({"id": "a@b"}, "schedule id"),
        ({"workflow_type": ""}, "workflow_type"),
        ({"catch_up": "yes"}, "catch_up"),
        ({"context": {"schedule": 1}}, "'schedule'"),
        ({"context": {"x": object()}}, "not JSON"),
        ({"context": [1]}, "mapping"),
        # what no repo stores: accepted here, such a context failed every tick's insert, and the
        # driver's claim loop (which fires ticks first) then claimed nothing else, ever
        ({"context": {"x": "a\x00b"}}, "NUL"),
        ({"context": {"x\x00": 1}}, "NUL"),
        ({"context": {"x": "\ud800"}}, "not valid Unicode"),
        ({"context": {"x": float("nan")}}, "not JSON"),
        ({"context": {"x": _nested(100)}}, "nested more than 100"),
        ({"id": "s\ud800"}, "schedule id"),
    ],
)
def test_bad_schedules_raise_config_error(kwargs: dict[str, Any], words: str) -> None:
    values: dict[str, Any] = {"id": "s", "workflow_type": "report", "cron": "0 2 * * *", **kwargs}
    with pytest.raises(ConfigError, match=words):
        af.Schedule(**values)


async def test_duplicate_ids_and_unknown_workflow_types_raise_config_error() -> None:
    registry = one_node_registry("report")
    registry.add_schedule(af.Schedule(id="s", workflow_type="report", cron="0 2 * * *"))
    with pytest.raises(ConfigError, match="already added"):
        registry.add_schedule(af.Schedule(id="s", workflow_type="report", cron="0 3 * * *"))
    with pytest.raises(ConfigError, match=r"af\.Schedule"):
        registry.add_schedule({"id": "x"})  # type: ignore[arg-type]
    registry.add_schedule(af.Schedule(id="ghost", workflow_type="ghost", cron="0 2 * * *"))
    assert [s.id for s in registry.schedules] == ["s", "ghost"]
    service, _ = fake_service(af.MemoryWorkflowRepo(), registry)
    driver = WorkflowDriver(service, poll_interval=0.05)
    with pytest.raises(ConfigError, match="'ghost'"):
        await driver.run_until_idle()
    assert not driver.running
    assert await service.count_workflow_instances() == 0


async def test_run_forever_sleeps_until_each_tick_and_fires_it_once() -> None:
    # a FakeClock moves only when the driver sleeps: each sleep runs to the next tick, so ticks
    # follow one another at once, and each must fire exactly once, in order
    every10 = af.Schedule(id="ten", workflow_type="report", cron="*/10 * * * *")
    service, _ = _service(af.MemoryWorkflowRepo(), every10)
    async with WorkflowDriver(service, poll_interval=3600.0):
        for _ in range(500):
            if len(await _business_ids(service)) >= 4:
                break
            await asyncio.sleep(0.01)
    names = await _business_ids(service)
    assert len(names) >= 4
    expected = [
        f"ten@2026-01-01T{(10 * i) // 60:02d}:{(10 * i) % 60:02d}:00Z" for i in range(1, len(names) + 1)
    ]
    assert names == expected


async def _deploy(repo: Any, schedule: af.Schedule, at: datetime) -> tuple[WorkflowDriver, Any]:
    """A process of the app with ``schedule`` started at ``at``: its driver has run one round."""
    registry = one_node_registry("report", "b")
    registry.add_schedule(schedule)
    service, clock = fake_service(repo, registry)
    clock.advance(at.timestamp() - clock.time())
    driver = WorkflowDriver(service, poll_interval=0.05)
    await driver.run_until_idle()
    return driver, clock


_HOURLY = af.Schedule(id="s", workflow_type="report", cron="0 * * * *", catch_up=True)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({}, {"cron": "30 * * * *"}),
        ({}, {"timezone": "Asia/Kolkata"}),  # +05:30: its hours start at :30 UTC
        ({}, {"workflow_type": "b"}),
        ({"catch_up": False}, {}),  # removed, then added again with catch_up=True
    ],
    ids=["cron", "timezone", "workflow_type", "catch_up"],
)
async def test_a_schedule_whose_definition_changed_starts_from_its_next_tick(
    engine_repo: Any, before: dict[str, Any], after: dict[str, Any]
) -> None:
    # Its state (the last tick fired on Jan 1) belonged to the old definition: catching up from it
    # fired ten days of ticks the operator never asked for, the moment the new one was deployed.
    old = replace(_HOURLY, **before)
    driver, clock = await _deploy(engine_repo, old, datetime(2026, 1, 1, 0, 3, tzinfo=UTC))
    clock.advance(3600)
    await driver.run_until_idle()
    assert await _business_ids(driver.service) == ["s@2026-01-01T01:00:00Z"]
    new = replace(_HOURLY, **after)
    deployed = datetime(2026, 1, 11, 0, 3, tzinfo=UTC)
    driver, clock = await _deploy(engine_repo, new, deployed)
    assert await _business_ids(driver.service) == ["s@2026-01-01T01:00:00Z"]  # no tick before it
    clock.advance(3600)
    await driver.run_until_idle()
    [tick] = new.ticks_between(deployed, deployed + timedelta(hours=1))
    assert await _business_ids(driver.service) == ["s@2026-01-01T01:00:00Z", f"s@{tick_name(tick)}"]
    assert (await engine_repo.schedule_states())["s"].last_tick == tick_name(tick)


async def test_an_unchanged_schedule_catches_up_after_a_restart(engine_repo: Any) -> None:
    driver, clock = await _deploy(engine_repo, _HOURLY, datetime(2026, 1, 1, 0, 3, tzinfo=UTC))
    clock.advance(3600)
    await driver.run_until_idle()
    same = replace(_HOURLY, context={"another": "context"})  # the context is not the definition
    driver, _ = await _deploy(engine_repo, same, datetime(2026, 1, 1, 4, 3, tzinfo=UTC))
    assert await _business_ids(driver.service) == [f"s@2026-01-01T0{h}:00:00Z" for h in range(1, 5)]


async def test_old_and_new_processes_of_a_rolling_deploy_each_fire_their_ticks(engine_repo: Any) -> None:
    # While both run, neither takes the schedule back from the other at each tick: the old process,
    # started before the new definition was stored, fires its own ticks from the last tick fired,
    # and the new one fires its ticks from its start (a reset at every tick would fire none).
    start = datetime(2026, 1, 1, 0, 3, tzinfo=UTC)
    old, old_clock = await _deploy(engine_repo, replace(_HOURLY, catch_up=False), start)
    new_schedule = replace(_HOURLY, catch_up=False, cron="30 * * * *")
    new, new_clock = await _deploy(engine_repo, new_schedule, start + timedelta(minutes=7))
    for minutes in (37, 62, 92, 122):  # 00:40, 01:05, 01:35, 02:05
        moment = (start + timedelta(minutes=minutes)).timestamp()
        for driver, clock in ((old, old_clock), (new, new_clock)):
            clock.advance(moment - clock.time())
            await driver.run_until_idle()
    names = await _business_ids(old.service)
    assert names == [f"s@2026-01-01T{t}:00Z" for t in ("00:30", "01:00", "01:30", "02:00")]


async def test_a_schedule_stored_before_fingerprints_keeps_its_state(engine_repo: Any) -> None:
    # a row of schema version 13 or older has no fingerprint: the next driver records its own
    # (it cannot tell whether the definition changed) and catches up from the stored last tick
    if isinstance(engine_repo, af.MemoryWorkflowRepo):
        pytest.skip("a memory repo holds no state from before")
    driver, clock = await _deploy(engine_repo, _HOURLY, datetime(2026, 1, 1, 0, 3, tzinfo=UTC))
    clock.advance(3600)
    await driver.run_until_idle()
    async with engine_repo.engine.begin() as conn:
        await conn.exec_driver_sql("UPDATE asyncflow_schedule SET fingerprint = NULL")
    driver, _ = await _deploy(engine_repo, _HOURLY, datetime(2026, 1, 1, 4, 3, tzinfo=UTC))
    assert await _business_ids(driver.service) == [f"s@2026-01-01T0{h}:00:00Z" for h in range(1, 5)]
    state = (await engine_repo.schedule_states())["s"]
    assert (state.fingerprint, state.last_tick) == (_HOURLY.fingerprint(), "2026-01-01T04:00:00Z")


_REFUSE_BAD = {
    "sqlite": [
        "CREATE TRIGGER refuse_bad BEFORE INSERT ON workflow_instance WHEN NEW.business_id LIKE 'bad@%' "
        "BEGIN SELECT RAISE(ABORT, 'refused by the database'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.business_id LIKE 'bad@%' THEN RAISE EXCEPTION 'refused by the database'; END IF; "
        "RETURN NEW; END $$",
        "CREATE TRIGGER refuse_bad BEFORE INSERT ON workflow_instance "
        "FOR EACH ROW EXECUTE FUNCTION refuse_bad()",
    ],
}
_DROP_REFUSE_BAD = {
    "sqlite": "DROP TRIGGER refuse_bad",
    "postgresql": "DROP TRIGGER refuse_bad ON workflow_instance",
}


async def test_a_tick_the_database_refuses_stops_neither_the_other_schedules_nor_the_claims(
    engine_repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A tick whose instance the database refuses (a rule of its own, here a trigger) raised out of
    # the round: the schedules after it never fired, and the driver's loop, which fires ticks before
    # it claims, retried that round forever and ran no instance at all.
    if isinstance(engine_repo, af.MemoryWorkflowRepo):
        pytest.skip("a memory repo has no rules of its own")
    bad = af.Schedule(id="bad", workflow_type="report", cron="* * * * *")
    good = af.Schedule(id="good", workflow_type="report", cron="* * * * *")
    registry = one_node_registry("report")
    registry.add_schedule(bad)
    registry.add_schedule(good)
    service, clock = fake_service(engine_repo, registry)
    clock.advance(START - clock.time())
    driver = WorkflowDriver(service, poll_interval=0.05)
    await driver.run_until_idle()  # both first seen at 00:03
    async with engine_repo.engine.begin() as conn:
        for statement in _REFUSE_BAD[engine_repo.engine.dialect.name]:
            await conn.exec_driver_sql(statement)
    plain = await service.create_workflow("report", "plain")
    clock.advance(60)  # 00:04: a tick of each
    with caplog.at_level(logging.WARNING, logger="asyncflow.driver"):
        await asyncio.wait_for(driver.run_until_idle(), 10)
    assert await _business_ids(service) == ["plain", "good@2026-01-01T00:04:00Z"]
    assert (await service.get_workflow_instance(plain.id)).status == "completed"
    assert any("bad" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
    async with engine_repo.engine.begin() as conn:
        await conn.exec_driver_sql(_DROP_REFUSE_BAD[engine_repo.engine.dialect.name])
    clock.advance(60)  # the bad schedule's tick is not lost: it fires once the database takes it
    await driver.run_until_idle()
    assert sorted(await _business_ids(service)) == [
        "bad@2026-01-01T00:05:00Z",
        "good@2026-01-01T00:04:00Z",
        "good@2026-01-01T00:05:00Z",
        "plain",
    ]


async def test_a_driver_on_a_database_not_yet_migrated_runs_its_instances_and_fires_after_migrate(
    engine_repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Deployed before `asyncflow migrate` (the database at version 13, without the fingerprint):
    # reading the schedules' state raised out of the round, and the driver, which fires ticks before
    # it claims, retried that round forever and ran no instance until someone migrated.
    if isinstance(engine_repo, af.MemoryWorkflowRepo):
        pytest.skip("a memory repo has no schema")
    async with engine_repo.engine.begin() as conn:
        await conn.exec_driver_sql("ALTER TABLE asyncflow_schedule DROP COLUMN fingerprint")
        await conn.exec_driver_sql("DELETE FROM asyncflow_schema WHERE version = 14")
    service, clock = _service(engine_repo, af.Schedule(id="m", workflow_type="report", cron="* * * * *"))
    plain = await service.create_workflow("report", "plain")
    driver = WorkflowDriver(service, poll_interval=0.05)
    with caplog.at_level(logging.WARNING, logger="asyncflow.driver"):
        await asyncio.wait_for(driver.run_until_idle(), 10)
    assert (await service.get_workflow_instance(plain.id)).status == "completed"
    assert any("migrate()" in r.getMessage() for r in caplog.records)
    await engine_repo.migrate()
    clock.advance(5)  # the schedules are tried again 5 s later: first seen at 00:03:05
    await driver.run_until_idle()
    clock.advance(60)
    await driver.run_until_idle()
    assert await _business_ids(service) == ["plain", "m@2026-01-01T00:04:00Z"]
