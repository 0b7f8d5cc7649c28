"""Retry back-off (RetryPolicy): the delays a FakeClock sees, per-node policies from JSON config,
``default_fail_max_count`` and the deprecated SchedulePolicy retry fields."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

import asyncflow as af
from asyncflow.clock import FakeClock
from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver
from asyncflow.errors import ConfigError, ParamInvalidError
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.registry import Registry
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.worker import NormalTaskWorker


async def failing(ctx: JSONContext) -> None:
    raise RuntimeError("flaky")


def registry(nodes: list[dict[str, Any]]) -> Registry:
    reg = Registry()
    reg.load_workflow_config(json.dumps({"id": "w", "name": "w", "nodes": nodes}))
    for node in nodes:
        reg.register_workflow_task("w", node["id"], NormalTaskWorker(run=failing))
    return reg


async def observed_delays(service: af.WorkflowService, clock: FakeClock, passes: int) -> list[float]:
    """Run ``passes`` driver rounds; after each, the back-off until the instance is due again."""
    instance = await service.create_workflow("w", "b")
    driver = WorkflowDriver(service, concurrency=2, poll_interval=1.0)
    delays = []
    for _ in range(passes):
        await driver.run_until_idle()  # one pass, then nothing is due until the back-off ends
        record = await service.repo.get_workflow_instance(instance.id)
        if record.status != "running":
            delays.append(math.nan)
            break
        exact = record.next_run_at / 1000 - clock.time()
        delays.append(round(exact, 3))
        # Land a tenth of a millisecond past the due time: advancing by the rounded delay could stop a
        # float hair short of it (next_run_at is whole ms), leaving the instance not yet due.
        clock.advance(exact + 0.0001)
    return delays


def test_delay_formula_cap_and_jitter() -> None:
    policy = af.RetryPolicy(initial_interval=0.5, backoff=3.0, max_interval=10.0, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 10_000)] == [0.5, 1.5, 4.5, 10.0, 10.0, 10.0]
    jittered = af.RetryPolicy(initial_interval=4.0, max_interval=100.0, jitter=0.25)
    rng = random.Random(7)
    delays = [jittered.delay(1, rng) for _ in range(200)]
    assert all(3.0 <= d <= 5.0 for d in delays) and len(set(delays)) > 100
    assert af.RetryPolicy(initial_interval=4.0, max_interval=4.0, jitter=0.5).delay(9) <= 4.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"initial_interval": -1}, "initial_interval must not be negative"),
        ({"backoff": 0.5}, "backoff must be at least 1"),
        ({"max_interval": math.inf}, "max_interval must be a finite number"),
        ({"jitter": 1.0}, "jitter must be below 1"),
        ({"jitter": True}, "jitter must be a finite number"),
        ({"initial_interval": "1"}, "initial_interval must be a finite number"),
        ({"max_interval": 10**400}, "max_interval must be a finite number"),  # was OverflowError
    ],
)
def test_retry_policy_refuses_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ParamInvalidError, match=match):
        af.RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retry_policy_is_frozen_and_keyword_only() -> None:
    policy = af.RetryPolicy()
    with pytest.raises(AttributeError):
        policy.backoff = 3.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        af.RetryPolicy(1.0)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("retry", "match"),
    [
        ({"initial_interval": 1, "bogus": 2}, r"workflow 'w': node 'A': retry has unknown key\(s\) 'bogus'"),
        ({"backoff": "2"}, r"workflow 'w': node 'A': retry.backoff must be a finite number"),
        ([1, 2], r"workflow 'w': node 'A': retry must be a RetryPolicy or an object"),
        ({"backoff": 10**400}, r"workflow 'w': node 'A': retry.backoff must be a finite number"),
    ],
)
def test_config_retry_errors_name_workflow_and_node(retry: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        WorkflowConfig.from_dict({"id": "w", "nodes": [{"id": "A", "retry": retry}]})
    assert info.value.nodes == ("A",)


def test_config_retry_round_trips() -> None:
    config = WorkflowConfig.from_dict({"id": "w", "nodes": [{"id": "A", "retry": {"initial_interval": 5}}]})
    assert config.nodes[0].retry == af.RetryPolicy(initial_interval=5)
    assert config.nodes[0].to_dict()["retry"] == {
        "initial_interval": 5,
        "backoff": 2.0,
        "max_interval": 60.0,
        "jitter": 0.1,
    }
    assert "retry" not in NodeConfig("B").to_dict()  # the Go shape when unset
    assert NodeConfig("C", retry=af.RetryPolicy(jitter=0)).retry == af.RetryPolicy(jitter=0)


async def test_service_policy_delays_grow_and_cap() -> None:
    clock = FakeClock()
    service = af.WorkflowService(
        MemoryWorkflowRepo(),
        LocalWorkflowLock(),
        registry([{"id": "A"}]),
        retry=af.RetryPolicy(initial_interval=2.0, backoff=3.0, max_interval=50.0, jitter=0.0),
        clock=clock,
    )
    assert await observed_delays(service, clock, 5) == [2.0, 6.0, 18.0, 50.0, 50.0]


async def test_node_retry_replaces_the_service_policy() -> None:
    clock = FakeClock()
    node_retry = {"initial_interval": 5, "backoff": 1, "max_interval": 60, "jitter": 0}
    service = af.WorkflowService(
        MemoryWorkflowRepo(),
        LocalWorkflowLock(),
        registry([{"id": "A", "retry": node_retry}]),
        retry=af.RetryPolicy(initial_interval=1.0, jitter=0.0),
        clock=clock,
    )
    assert await observed_delays(service, clock, 3) == [5.0, 5.0, 5.0]


async def test_jitter_stays_within_its_relative_band() -> None:
    clock = FakeClock()
    service = af.WorkflowService(
        MemoryWorkflowRepo(),
        LocalWorkflowLock(),
        registry([{"id": "A"}]),
        retry=af.RetryPolicy(initial_interval=10.0, backoff=1.0, jitter=0.2),
        clock=clock,
    )
    delays = await observed_delays(service, clock, 6)
    assert all(8.0 <= d <= 12.0 for d in delays) and len(set(delays)) > 1


@pytest.mark.parametrize(("node_limit", "failures"), [(None, 3), (0, None), (2, 2)])
async def test_default_fail_max_count_applies_only_when_unset(
    node_limit: int | None, failures: int | None
) -> None:
    clock = FakeClock()
    service = af.WorkflowService(
        MemoryWorkflowRepo(),
        LocalWorkflowLock(),
        registry([{"id": "A", "fail_max_count": node_limit}]),
        retry=af.RetryPolicy(initial_interval=1.0, jitter=0.0),
        default_fail_max_count=3,
        clock=clock,
    )
    delays = await observed_delays(service, clock, 5)
    if failures is None:  # 0: no limit, whatever the default
        assert len(delays) == 5 and not any(math.isnan(d) for d in delays)
    else:  # the N-th counted failure fails the workflow
        assert len(delays) == failures and math.isnan(delays[-1])
        (instance,) = await service.repo.query_workflow_instances(af.QueryWorkflowInstanceParams())
        assert instance.status == "failed"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"retry": 1.0}, "retry must be a RetryPolicy"),
        ({"default_fail_max_count": -1}, "must not be negative"),
    ],
)
def test_service_refuses_bad_retry_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ParamInvalidError, match=match):
        af.WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), Registry(), **kwargs)


async def test_deprecated_schedule_retry_fields_still_work() -> None:
    with pytest.warns(DeprecationWarning, match="retry_base/retry_max/retry_jitter are deprecated"):
        schedule = af.SchedulePolicy(retry_base=3.0, retry_max=10.0, retry_jitter=0.0)
    with pytest.warns(DeprecationWarning, match="retry_delay is deprecated"):
        assert schedule.retry_delay(2) == 6.0
    clock = FakeClock()
    service = af.WorkflowService(
        MemoryWorkflowRepo(), LocalWorkflowLock(), registry([{"id": "A"}]), schedule=schedule, clock=clock
    )
    assert service.retry == af.RetryPolicy(initial_interval=3.0, max_interval=10.0, jitter=0.0)
    assert await observed_delays(service, clock, 3) == [3.0, 6.0, 10.0]
    explicit = af.RetryPolicy(jitter=0.0)
    assert (
        af.WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), schedule=schedule, retry=explicit).retry
        is explicit
    )


async def test_polls_events_and_restarts_of_a_sibling_do_not_cut_a_back_off_short(
    engine_repo: Any, local_lock: Any
) -> None:
    """A node's back-off is its own: the passes a sibling's wait check asks for every poll interval, an
    event for the sibling and a restart of the sibling do not retry it before its delay (they did:
    the instance's due time is the earliest of its nodes', and every pass retried every node, so a
    60 s back-off with ``fail_max_count`` 3 failed the instance after 2 s of polling)."""
    clock = FakeClock()
    attempts: list[float] = []

    async def flaky(ctx: JSONContext) -> None:
        attempts.append(clock.time())
        raise RuntimeError("card network down")

    async def decided(ctx: JSONContext) -> None:
        if not ctx.get(af.NODE_EVENT, "event_content")[1]:
            raise af.TaskNotReady("waiting for the manager")

    reg = Registry()
    reg.load_workflow_config(
        {
            "id": "w",
            "nodes": [
                {"id": "A", "retry": {"initial_interval": 60, "jitter": 0}, "fail_max_count": 3},
                {"id": "W"},
            ],
        }
    )
    reg.register_workflow_task("w", "A", NormalTaskWorker(run=flaky))
    reg.register_workflow_task("w", "W", NormalTaskWorker(run=lambda ctx: None, wait_check=decided))
    service = af.WorkflowService(engine_repo, local_lock, reg, clock=clock)
    driver = WorkflowDriver(service, poll_interval=1.0)
    instance = await service.create_workflow("w", "b")
    start = clock.time()
    for _ in range(10):  # W's wait check is polled every second
        await driver.run_until_idle()
        clock.advance(1.0)
    await service.add_node_external_event(instance.id, "W", af.NodeExternalEvent(1, {}))  # not decisive
    await driver.run_until_idle()
    await service.restart_workflow_node(instance.id, "W")
    await driver.run_until_idle()
    assert [t - start for t in attempts] == [0.0]
    assert (await service.get_workflow_instance(instance.id)).status == "running"
    record = await engine_repo.get_workflow_instance(instance.id)
    assert record.next_run_at == int((start + 60) * 1000)  # W's next poll comes first, A's stays due then
    clock.advance(start + 60 - clock.time())
    await driver.run_until_idle()
    assert [t - start for t in attempts] == [0.0, 60.0]  # the second attempt, after the full delay
    rows = {row.task_type: row for row in await engine_repo.load_task_instances(instance.id)}
    assert rows["A"].fail_count == 2 and rows["A"].status == "running"
    await service.restart_workflow_node(instance.id, "A")  # documented: runs again now, count reset
    await driver.run_until_idle()
    assert [t - start for t in attempts] == [0.0, 60.0, 60.0]
    rows = {row.task_type: row for row in await engine_repo.load_task_instances(instance.id)}
    assert rows["A"].fail_count == 1
    assert (await service.get_workflow_instance(instance.id)).status == "running"
