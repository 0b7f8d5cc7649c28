"""Ints too long for Python to write as text (over 4,300 digits) in bad input get the intended typed error.

Formatting such an int into the error's message (``f"{value}"``, ``{value!r}``) raised ``ValueError``
("Exceeds the limit (4300 digits) for integer string conversion") instead: every entry point below
refused the value, then failed while saying why. Messages now name such an int by its number of digits
(``asyncflow._text.shown``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from asyncflow._text import shown
from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.driver import DriverConfig
from asyncflow.errors import AsyncflowError, ConfigError, ParamInvalidError
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import NodeExternalEvent, Pager, QueryWorkflowInstanceParams
from asyncflow.registry import Registry
from asyncflow.retry import RetryPolicy
from asyncflow.schedules import Schedule

from .helpers import MIXED, Journal, service, snapshot

HUGE = 10**5000
"""5,001 digits: beyond ``sys.get_int_max_str_digits()`` (4,300), so ``str(HUGE)`` raises ValueError."""


def test_shown_writes_a_long_int_as_its_number_of_digits() -> None:
    assert shown(HUGE) == "an int of 5001 digits"
    assert shown(HUGE - 1) == "an int of 5000 digits"  # log10 rounds up to 5000 just below 10**5000
    assert shown(-HUGE) == "a negative int of 5001 digits"
    assert shown(2**256 - 1) == repr(2**256 - 1)  # 78 digits: still written out
    assert shown(2**63) == "9223372036854775808"
    assert shown("x") == "'x'"
    assert shown([HUGE]) == "a list too long to write"


def _node(**fields: Any) -> Callable[[], object]:
    return lambda: NodeConfig(**{"id": "a", **fields})


def _workflow(**node: Any) -> dict[str, Any]:
    return {"id": "w", "name": "w", "nodes": [{"id": "a", **node}]}


CONFIG_CALLS: list[tuple[str, Callable[[], object]]] = [
    ("NodeConfig(fail_max_count=HUGE)", _node(fail_max_count=HUGE)),
    ("NodeConfig(fail_max_count=-HUGE)", _node(fail_max_count=-HUGE)),
    ("NodeConfig(max_wait_time_ts=HUGE)", _node(max_wait_time_ts=HUGE)),
    ("NodeConfig(id=HUGE)", lambda: NodeConfig(HUGE)),  # type: ignore[arg-type]
    ("NodeConfig(name=HUGE)", _node(name=HUGE)),
    ("NodeConfig(next_nodes=HUGE)", _node(next_nodes=HUGE)),
    ("NodeConfig(next_nodes=[HUGE])", _node(next_nodes=[HUGE])),
    ("NodeConfig(join=HUGE)", _node(join=HUGE)),
    ("NodeConfig(retry=HUGE)", _node(retry=HUGE)),
    ("WorkflowConfig(id=HUGE)", lambda: WorkflowConfig(id=HUGE, name="w", nodes=())),  # type: ignore[arg-type]
    ("WorkflowConfig(name=HUGE)", lambda: WorkflowConfig(id="w", name=HUGE, nodes=())),  # type: ignore[arg-type]
    ("from_dict(id=HUGE)", lambda: WorkflowConfig.from_dict({"id": HUGE})),
    ("from_dict(fail_max_count=HUGE)", lambda: WorkflowConfig.from_dict(_workflow(fail_max_count=HUGE))),
    ("load_workflow_config(...)", lambda: Registry().load_workflow_config(_workflow(max_wait_time_ts=HUGE))),
    ("Schedule(id=HUGE)", lambda: Schedule(id=HUGE, workflow_type="w", cron="* * * * *")),  # type: ignore[arg-type]
    ("Schedule(workflow_type=HUGE)", lambda: Schedule(id="s", workflow_type=HUGE, cron="* * * * *")),  # type: ignore[arg-type]
    ("Schedule(cron=HUGE)", lambda: Schedule(id="s", workflow_type="w", cron=HUGE)),  # type: ignore[arg-type]
    ("Schedule(catch_up=HUGE)", lambda: Schedule(id="s", workflow_type="w", cron="* * * * *", catch_up=HUGE)),  # type: ignore[arg-type]
    ("Schedule(timezone=HUGE)", lambda: Schedule(id="s", workflow_type="w", cron="* * * * *", timezone=HUGE)),  # type: ignore[arg-type]
]

PARAM_CALLS: list[tuple[str, Callable[[], object]]] = [
    ("RetryPolicy(backoff=HUGE)", lambda: RetryPolicy(backoff=HUGE)),
    ("RetryPolicy(jitter=HUGE)", lambda: RetryPolicy(jitter=HUGE)),
    ("RetryPolicy(initial_interval=-HUGE)", lambda: RetryPolicy(initial_interval=-HUGE)),
    ("RetryPolicy.from_dict(max_interval=-HUGE)", lambda: RetryPolicy.from_dict({"max_interval": -HUGE})),
    ("Pager(page=-HUGE)", lambda: Pager(page=-HUGE)),
    ("Pager(size=-HUGE)", lambda: Pager(size=-HUGE)),
    ("Query(business_id=HUGE)", lambda: QueryWorkflowInstanceParams(business_id=HUGE)),  # type: ignore[arg-type]
    ("Query(workflow_type_in=[HUGE])", lambda: QueryWorkflowInstanceParams(workflow_type_in=(HUGE,))),  # type: ignore[arg-type]
    ("Query(status_in=[HUGE])", lambda: QueryWorkflowInstanceParams(status_in=(HUGE,))),  # type: ignore[arg-type]
    ("Query(page=HUGE)", lambda: QueryWorkflowInstanceParams(page=HUGE)),  # type: ignore[arg-type]
    ("DriverConfig(concurrency=-HUGE)", lambda: DriverConfig(concurrency=-HUGE)),
    ("DriverConfig(listen=HUGE)", lambda: DriverConfig(listen=HUGE)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("what", "call", "expected"),
    [(what, call, ConfigError) for what, call in CONFIG_CALLS]
    + [(what, call, ParamInvalidError) for what, call in PARAM_CALLS],
    ids=[what for what, _ in CONFIG_CALLS + PARAM_CALLS],
)
def test_a_long_int_in_a_config_or_parameter_gets_the_typed_error(
    what: str, call: Callable[[], object], expected: type[Exception]
) -> None:
    with pytest.raises(expected) as caught:
        call()
    assert str(caught.value)  # the message was built
    assert "5001 digits" in str(caught.value) or "too long to write" in str(caught.value), what


async def test_a_long_int_given_to_the_service_gets_the_typed_error_and_writes_nothing(repo: Any) -> None:
    svc = service(repo, Journal())
    mid = await svc.create_workflow(MIXED, "mid", run=True)
    before = await snapshot(repo)
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("create(type=HUGE)", lambda: svc.create_workflow(HUGE, "x")),
        ("create(business_id=HUGE)", lambda: svc.create_workflow(MIXED, HUGE)),
        ("create(task_id=HUGE)", lambda: svc.create_workflow(MIXED, "x", task_id=HUGE)),
        ("create(task_id=-HUGE)", lambda: svc.create_workflow(MIXED, "x", task_id=-HUGE)),
        ("create(unique=HUGE)", lambda: svc.create_workflow(MIXED, "x", unique=HUGE)),
        ("create(on_duplicate=HUGE)", lambda: svc.create_workflow(MIXED, "x", on_duplicate=HUGE)),
        ("run_workflow(HUGE)", lambda: svc.run_workflow(HUGE)),
        ("get(-HUGE)", lambda: svc.get_workflow_instance(-HUGE)),
        ("cancel(HUGE)", lambda: svc.cancel_workflow_instance(HUGE)),
        ("restart_node(mid, HUGE)", lambda: svc.restart_workflow_node(mid.id, HUGE)),
        (
            "event(node=HUGE)",
            lambda: svc.add_node_external_event(mid.id, HUGE, NodeExternalEvent(event_ts=1)),
        ),
        (
            "event(event_ts=HUGE)",
            lambda: svc.add_node_external_event(mid.id, "B", NodeExternalEvent(event_ts=HUGE)),
        ),
        (
            "query(workflow_instance_id=HUGE)",
            lambda: svc.query_workflow_instances(QueryWorkflowInstanceParams(workflow_instance_id=HUGE)),
        ),
        ("purge(limit=-HUGE)", lambda: svc.purge_workflow_instances(older_than=0, limit=-HUGE)),
        (
            "purge(workflow_types=[HUGE])",
            lambda: svc.purge_workflow_instances(older_than=0, workflow_types=[HUGE]),
        ),
        ("purge(statuses=[HUGE])", lambda: svc.purge_workflow_instances(older_than=0, statuses=[HUGE])),
        ("run_pass(wait_interval=HUGE)", lambda: svc.run_pass(mid.id, wait_interval=HUGE)),
        ("wait_for_workflow(HUGE)", lambda: svc.wait_for_workflow(HUGE, timeout=0)),
    ]
    problems = []
    for what, call in calls:
        try:
            await call()
        except AsyncflowError as exc:
            if not isinstance(exc, ParamInvalidError) or not str(exc):
                problems.append(f"{what}: {type(exc).__name__} ({exc})")
        except Exception as exc:
            problems.append(f"{what}: untyped {type(exc).__name__}: {str(exc)[:120]}")
        else:
            problems.append(f"{what}: no error")
    assert not problems, "\n".join(problems)
    assert await snapshot(repo) == before


def test_json_text_with_an_integer_too_long_to_read_gets_the_typed_error() -> None:
    """json raises a plain ValueError for it (not JSONDecodeError): worded once, as the typed error."""
    text = '{"id": "w", "nodes": [{"id": "a", "fail_max_count": 1' + "0" * 5000 + "}]}"
    with pytest.raises(ConfigError, match=r"^workflow config holds an integer of more than 4300 digits"):
        WorkflowConfig.from_json(text)


BEYOND_FLOAT = 10**400
"""Writable as text, but beyond a float: ``math.isfinite`` and ``float()`` raised OverflowError."""


async def test_a_number_of_seconds_beyond_a_float_gets_the_typed_error(repo: Any) -> None:
    from asyncflow.engine.rules import SchedulePolicy
    from asyncflow.lock.database import DatabaseWorkflowLock
    from asyncflow.lock.postgres import PostgresAdvisoryLock
    from asyncflow.lock.redis import RedisWorkflowLock

    svc = service(repo, Journal())
    before = await snapshot(repo)
    calls: list[tuple[str, Callable[[], Any]]] = []
    for sign, big in (("BIG", BEYOND_FLOAT), ("-BIG", -BEYOND_FLOAT)):
        calls += [
            (f"SchedulePolicy(poll_interval={sign})", lambda b=big: SchedulePolicy(poll_interval=b)),
            (f"DriverConfig(poll_interval={sign})", lambda b=big: DriverConfig(poll_interval=b)),
            (f"WorkflowService(lock_ttl={sign})", lambda b=big: service(repo, Journal(), lock_ttl=b)),
            (
                f"WorkflowService(visible_after={sign})",
                lambda b=big: service(repo, Journal(), visible_after=b),
            ),
            (f"hold(ttl={sign})", lambda b=big: LocalWorkflowLock().hold("k", b)),
            (
                f"DatabaseWorkflowLock(op_timeout={sign})",
                lambda b=big: DatabaseWorkflowLock(repo, op_timeout=b),
            ),
            (
                f"RedisWorkflowLock(op_timeout={sign})",
                lambda b=big: RedisWorkflowLock("redis://x", op_timeout=b),
            ),
            (
                f"PostgresAdvisoryLock(op_timeout={sign})",
                lambda b=big: PostgresAdvisoryLock("postgresql+asyncpg://x/y", op_timeout=b),
            ),
            (f"create(start_in={sign})", lambda b=big: svc.create_workflow(MIXED, "x", start_in=b)),
            (f"purge(older_than={sign})", lambda b=big: svc.purge_workflow_instances(older_than=b)),
        ]
    problems = []
    for what, call in calls:
        try:
            result = call()
            if hasattr(result, "__await__"):
                await result
        except ParamInvalidError as exc:
            assert str(exc)
        except Exception as exc:
            problems.append(f"{what}: {type(exc).__name__}: {str(exc)[:120]}")
        else:
            problems.append(f"{what}: no error")
    assert not problems, "\n".join(problems)
    assert await snapshot(repo) == before
