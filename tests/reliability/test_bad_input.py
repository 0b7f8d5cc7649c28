"""Issue 8, item 6 (part 2): bad input through the service, on the memory repo, SQLite and PostgreSQL.

Every bad argument of every operation gets its typed error and leaves the stored state exactly as it
was (a snapshot of every row, timestamps and versions included, is compared before and after). Contexts
that are not JSON, 10 MB contexts, business ids shaped like SQL injection, corrupt documents in context
columns, instances of a type this process does not know and rows of nodes the definition does not have
each get a clear typed error or the documented behaviour (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import text

from asyncflow.context import JSONContext
from asyncflow.driver import WorkflowDriver
from asyncflow.engine.rules import SchedulePolicy
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import (
    AsyncflowError,
    ConfigNotFoundError,
    InstanceNotFoundError,
    InvalidStateError,
    ParamInvalidError,
    TaskInstanceNotFoundError,
)
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import (
    InstanceFields,
    InstanceWhere,
    NewWorkflowInstance,
    NodeExternalEvent,
    QueryWorkflowInstanceParams,
    TaskInsert,
)
from asyncflow.registry import Registry
from asyncflow.worker import NormalTaskWorker

from .helpers import ALL_ROWS, MIXED, Journal, mixed_registry, rows_by_type, snapshot

NOT_JSON_CONTEXTS: list[Any] = [
    {"x": math.nan},
    {"x": math.inf},
    {"x": object()},
    {"x": {1, 2}},
    {"x": b"bytes"},
    {"x": 1j},
    {"s": "NUL \x00 inside"},
    {"NUL \x00 key": 1},
    {"s": "lone surrogate \ud800"},
    {1: "a", "b": 2},  # keys that cannot even be sorted
    [1, 2],
    "{}",
    b"{}",
    42,
]
BAD_IDS: list[Any] = [0, -1, -(2**63), True, False, 1.5, "1", None, 2**63]
INJECTIONS = [
    "'; DROP TABLE workflow_instance; --",
    '" OR 1=1 --',
    "x' OR '1'='1",
    "1; DELETE FROM task_instance",
    "%",
    "_",
    "\\",
    "' UNION SELECT id, workflow_type FROM workflow_instance --",
    "$1",
    ":business_id",
    "?",
    "/* */",
    "业务'); --",
]


FAST = SchedulePolicy(poll_interval=0.01, retry_base=0.01, retry_max=0.05)


def service(repo: Any, journal: Journal, **kwargs: Any) -> WorkflowService:
    kwargs.setdefault("schedule", FAST)
    return WorkflowService(repo, LocalWorkflowLock(), mixed_registry(journal), **kwargs)


async def seeded(svc: WorkflowService) -> dict[str, int]:
    """Instances in every state a bad call may meet: init, mid-run, completed, canceled."""
    fresh = await svc.create_workflow(MIXED, "fresh")
    mid = await svc.create_workflow(MIXED, "mid", run=True)  # B pending, C retrying
    done = await svc.create_workflow(MIXED, "done")
    while (await svc.run_workflow(done.id)).status != "completed":
        pass
    canceled = await svc.create_workflow(MIXED, "canceled", run=True)
    await svc.cancel_workflow_instance(canceled.id)
    return {"fresh": fresh.id, "mid": mid.id, "done": done.id, "canceled": canceled.id}


Call = Callable[[], Awaitable[Any]]


def bad_calls(svc: WorkflowService, ids: dict[str, int]) -> list[tuple[str, Call, type[Exception]]]:
    """(what, call, expected error) for every operation and every kind of bad argument."""
    mid, done, fresh = ids["mid"], ids["done"], ids["fresh"]
    missing = 10**12
    ev = NodeExternalEvent(event_ts=1, event_content="ok")
    out: list[tuple[str, Call, type[Exception]]] = []

    def add(what: str, call: Call, error: type[Exception]) -> None:
        out.append((what, call, error))

    for bad in BAD_IDS:
        add(f"run_workflow({bad!r})", lambda b=bad: svc.run_workflow(b), ParamInvalidError)
        add(f"run_pass({bad!r})", lambda b=bad: svc.run_pass(b), ParamInvalidError)
        add(f"get({bad!r})", lambda b=bad: svc.get_workflow_instance(b), ParamInvalidError)
        add(f"cancel({bad!r})", lambda b=bad: svc.cancel_workflow_instance(b), ParamInvalidError)
        add(f"restart({bad!r})", lambda b=bad: svc.restart_workflow_instance(b), ParamInvalidError)
        add(f"restart_node({bad!r})", lambda b=bad: svc.restart_workflow_node(b, "A"), ParamInvalidError)
        add(f"event({bad!r})", lambda b=bad: svc.add_node_external_event(b, "B", ev), ParamInvalidError)
    for bad in (True, 1.5, "1", None, 2**63, -(2**63) - 1):  # task_id is any int64 (0: none)
        add(
            f"create(task_id={bad!r})",
            lambda b=bad: svc.create_workflow(MIXED, "x", task_id=b),
            (ParamInvalidError),
        )
    for op in (
        "run_workflow",
        "get_workflow_instance",
        "cancel_workflow_instance",
        "restart_workflow_instance",
    ):
        add(f"{op}(missing)", lambda op=op: getattr(svc, op)(missing), InstanceNotFoundError)
    add("restart_node(missing)", lambda: svc.restart_workflow_node(missing, "A"), InstanceNotFoundError)
    add("event(missing)", lambda: svc.add_node_external_event(missing, "B", ev), InstanceNotFoundError)
    for ctx in NOT_JSON_CONTEXTS:
        add(
            f"create(context={ctx!r:.40})",
            lambda c=ctx: svc.create_workflow(MIXED, "x", context=c),
            (ParamInvalidError),
        )
        add(
            f"create(run, context={ctx!r:.40})",
            lambda c=ctx: svc.create_workflow(MIXED, "x", context=c, run=True),
            ParamInvalidError,
        )
        add(
            f"restart(context={ctx!r:.40})",
            lambda c=ctx: svc.restart_workflow_instance(ids["canceled"], context=c),
            ParamInvalidError,
        )
    add(
        "context nested 100k deep",
        lambda: svc.create_workflow(MIXED, "x", context=_deep(100_000)),
        (ParamInvalidError),
    )
    for wt in ("", None, 7, b"mixed"):
        add(f"create(type={wt!r})", lambda wt=wt: svc.create_workflow(wt, "x"), ParamInvalidError)
    for wt in ("nope", "mixed'; DROP TABLE workflow_instance; --", "MIXED", " mixed"):
        add(f"create(type={wt!r})", lambda wt=wt: svc.create_workflow(wt, "x"), ConfigNotFoundError)
        add(
            f"create(run, type={wt!r})",
            lambda wt=wt: svc.create_workflow(wt, "x", run=True),
            (ConfigNotFoundError),
        )
    for biz in (None, 1, b"x", "NUL\x00", "\udc80"):
        add(f"create(business_id={biz!r})", lambda b=biz: svc.create_workflow(MIXED, b), ParamInvalidError)
    for node in ("", None, 3):
        add(
            f"restart_node(node={node!r})",
            lambda n=node: svc.restart_workflow_node(mid, n),
            (ParamInvalidError),
        )
        add(
            f"event(node={node!r})",
            lambda n=node: svc.add_node_external_event(mid, n, ev),
            (ParamInvalidError),
        )
    for node in ("nope", "a", "A'; --", "ROOT"):
        add(
            f"restart_node(node={node!r})",
            lambda n=node: svc.restart_workflow_node(mid, n),
            (ParamInvalidError),
        )
        add(
            f"event(node={node!r})",
            lambda n=node: svc.add_node_external_event(mid, n, ev),
            (TaskInstanceNotFoundError),
        )
    add(
        "event on a node not created yet",
        lambda: svc.add_node_external_event(fresh, "B", ev),
        (TaskInstanceNotFoundError),
    )
    add(
        "event on a completed instance",
        lambda: svc.add_node_external_event(done, "B", ev),
        (InvalidStateError),
    )
    add("event on a completed node", lambda: svc.add_node_external_event(mid, "A", ev), InvalidStateError)
    add(
        "event older than the stored one",
        lambda: svc.add_node_external_event(mid, "B", NodeExternalEvent(event_ts=-1)),
        InvalidStateError,
    )
    for content in (math.nan, object(), "\x00", {1: 2, "a": 3}):
        add(
            f"event content {content!r:.20}",
            lambda c=content: svc.add_node_external_event(
                mid, "B", NodeExternalEvent(event_ts=5, event_content=c)
            ),
            ParamInvalidError,
        )
    for event in ({"event_ts": 1}, None, "e"):
        add(f"event={event!r}", lambda e=event: svc.add_node_external_event(mid, "B", e), ParamInvalidError)
    for ts in ("1", 1.0, None, True):
        add(
            f"event_ts={ts!r}",
            lambda t=ts: svc.add_node_external_event(mid, "B", NodeExternalEvent(event_ts=t)),
            ParamInvalidError,
        )
    add(
        "event timeout='1'",
        lambda: svc.add_node_external_event(mid, "B", ev, timeout="1"),
        (ParamInvalidError),
    )
    add("restart a completed instance", lambda: svc.restart_workflow_instance(done), InvalidStateError)
    add(
        "restart a node of a terminal instance",
        lambda: svc.restart_workflow_node(done, "A"),
        (InvalidStateError),
    )
    add("query(params='x')", lambda: svc.query_workflow_instances("x"), ParamInvalidError)
    add("count(params={})", lambda: svc.count_workflow_instances({}), ParamInvalidError)
    add("detail(params=1)", lambda: svc.query_workflow_instance_detail(1), ParamInvalidError)
    add(
        "query(business_id NUL)",
        lambda: svc.query_workflow_instances(QueryWorkflowInstanceParams(business_id="\x00")),
        ParamInvalidError,
    )
    add(
        "query(id_greater_than=2**63)",
        lambda: svc.query_workflow_instances(QueryWorkflowInstanceParams(id_greater_than=2**63)),
        ParamInvalidError,
    )
    add(
        "query(status_in='running')",
        lambda: svc.query_workflow_instances(QueryWorkflowInstanceParams(status_in="running")),
        ParamInvalidError,
    )
    return out


def _deep(depth: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return {"deep": value}


async def test_every_bad_argument_gets_its_typed_error_and_writes_nothing(repo: Any) -> None:
    journal = Journal()
    svc = service(repo, journal)
    ids = await seeded(svc)
    before = await snapshot(repo)
    calls = len(journal.entries)
    problems = []
    checked = 0
    for what, call, expected in bad_calls(svc, ids):
        checked += 1
        try:
            await call()
        except AsyncflowError as exc:
            if not isinstance(exc, expected):
                problems.append(f"{what}: {type(exc).__name__} ({exc}) instead of {expected.__name__}")
            elif not str(exc):
                problems.append(f"{what}: {type(exc).__name__} without a message")
        except Exception as exc:
            problems.append(f"{what}: untyped {type(exc).__name__}: {exc}")
        else:
            problems.append(f"{what}: no error")
        if await snapshot(repo) != before:
            problems.append(f"{what}: the stored state changed")
            before = await snapshot(repo)
    assert not problems, "\n".join(problems)
    assert checked > 150
    assert len(journal.entries) == calls, "no worker ran for a refused call"
    # and the service still works on the same store afterwards
    for instance_id in ids.values():
        while (await svc.run_workflow(instance_id)).status not in ("completed", "canceled"):
            pass


async def test_bad_service_settings_are_refused(repo: Any) -> None:
    lock = LocalWorkflowLock()
    for kwargs in (
        {"lock_ttl": 0},
        {"lock_ttl": -1},
        {"lock_ttl": "30"},
        {"lock_ttl": True},
        {"branch_concurrency": 0},
        {"branch_concurrency": 1.5},
        {"branch_concurrency": True},
    ):
        with pytest.raises(ParamInvalidError):
            WorkflowService(repo, lock, Registry(), **kwargs)


async def test_keys_that_are_json_scalars_become_strings_as_json_dumps_makes_them(repo: Any) -> None:
    """Documented: non-string keys of JSON scalar types are stored as json.dumps writes them."""
    svc = service(repo, Journal())
    inst = await svc.create_workflow(MIXED, "k", context={1: "a", 2: {3: "b"}})
    assert inst.workflow_context == {"1": "a", "2": {"3": "b"}}
    assert (await svc.get_workflow_instance(inst.id)).workflow_context == {"1": "a", "2": {"3": "b"}}
    for keys in ({True: 1}, {None: 1}, {1.5: 1}):
        made = await svc.create_workflow(MIXED, "k", context=keys)
        assert list(made.workflow_context) == [{True: "true", None: "null", 1.5: "1.5"}[next(iter(keys))]]


async def test_integers_beyond_int64_in_contexts_are_kept_exactly(repo: Any) -> None:
    """Documented: JSON numbers have no bound, so contexts keep big integers exactly (only ids and
    counters are int64); an integer too long for Python's JSON (over 4300 digits) is refused."""
    svc = service(repo, Journal())
    values = {"big": 2**63, "small": -(2**63) - 1, "huge": 10**400}
    inst = await svc.create_workflow(MIXED, "big-ints", context=values)
    assert (await svc.get_workflow_instance(inst.id)).workflow_context == values
    while (await svc.run_workflow(inst.id)).status != "completed":
        pass
    assert (await rows_by_type(repo, inst.id))["F"].node_context["workflow_context"] == values
    assert JSONContext(values).get_int64("big") == (0, False)  # but not readable as an int64
    count = await svc.count_workflow_instances()
    with pytest.raises(ParamInvalidError):
        await svc.create_workflow(MIXED, "x", context={"n": 10**5000})
    assert await svc.count_workflow_instances() == count


async def test_ten_megabyte_contexts_run_to_completion_unchanged(repo: Any) -> None:
    """A 10 MB workflow context reaches every node intact, and a worker may add 10 MB more."""
    big = {"blob": "x" * (10 * 1024 * 1024), "nested": {"list": list(range(1000))}}
    registry = Registry()
    registry.load_workflow_config({"id": "big", "nodes": [{"id": "A", "next_nodes": ["B"]}, {"id": "B"}]})

    async def grow(ctx: JSONContext) -> None:
        ctx.set(["added"], "y" * (10 * 1024 * 1024))

    async def read(ctx: JSONContext) -> None:
        assert ctx.get("pre_node_context", "A", "added")[0] == "y" * (10 * 1024 * 1024)

    registry.register_workflow_task("big", "A", NormalTaskWorker(run=grow))
    registry.register_workflow_task("big", "B", NormalTaskWorker(run=read))
    svc = WorkflowService(repo, LocalWorkflowLock(), registry)
    inst = await svc.create_workflow("big", "big", context=big, run=True)
    assert inst.status == "completed"
    stored = await svc.get_workflow_instance(inst.id)
    assert stored.workflow_context == big
    rows = await rows_by_type(repo, inst.id)
    assert rows["B"].node_context["workflow_context"] == big
    assert len(rows["A"].node_context["added"]) == 10 * 1024 * 1024
    assert {row.status for row in rows.values()} == {"completed"}


@pytest.mark.parametrize("business_id", INJECTIONS)
async def test_business_ids_shaped_like_sql_injection_are_plain_text(repo: Any, business_id: str) -> None:
    journal = Journal()
    svc = service(repo, journal)
    other = await svc.create_workflow(MIXED, "other")
    inst = await svc.create_workflow(MIXED, business_id, context={"q": business_id})
    while (await svc.run_workflow(inst.id)).status != "completed":
        pass
    found = await svc.query_workflow_instances(QueryWorkflowInstanceParams(business_id=business_id))
    assert [(r.id, r.business_id) for r in found] == [(inst.id, business_id)]
    assert await svc.count_workflow_instances(QueryWorkflowInstanceParams(business_id=business_id)) == 1
    assert (await svc.get_workflow_instance(other.id)).status == "init"
    assert set(await rows_by_type(repo, inst.id)) == ALL_ROWS
    assert (await rows_by_type(repo, inst.id))["A"].node_context["workflow_context"] == {"q": business_id}
    assert await svc.count_workflow_instances() == 2


async def test_an_instance_of_a_type_this_process_does_not_know(repo: Any, caplog: Any) -> None:
    """ConfigNotFoundError for a pass (nothing written); the driver logs it at ERROR, backs the
    instance off and completes the others."""
    journal = Journal()
    svc = service(repo, journal, lock_ttl=5)
    [stranger] = await repo.create_workflow_instances(
        [NewWorkflowInstance(workflow_type="other-service-type", business_id="s", workflow_context={})]
    )
    good = [(await svc.create_workflow(MIXED, f"g{i}")).id for i in range(3)]
    before = await snapshot(repo)
    with pytest.raises(ConfigNotFoundError):
        await svc.run_workflow(stranger)
    assert await snapshot(repo) == before
    detail = await svc.query_workflow_instance_detail(
        QueryWorkflowInstanceParams(workflow_instance_id=stranger)
    )
    assert detail[0].workflow_type == "other-service-type" and detail[0].task_instances == ()
    driver = WorkflowDriver(svc, concurrency=4, poll_interval=0.05, error_backoff_base=30.0)
    with caplog.at_level(logging.ERROR, logger="asyncflow.driver"):
        for _ in range(200):  # bounded: the good ones need a few passes (retry, not-ready poll)
            await driver.run_until_idle()
            await asyncio.sleep(0.01)
            if await _all_completed(svc, good):
                break
    assert await _all_completed(svc, good)
    record = await repo.get_workflow_instance(stranger)
    assert record is not None and record.status == "init"
    assert await repo.load_task_instances(stranger) == []
    assert record.next_run_at > driver.service.clock.time() * 1000 + 20_000, "backed off"
    assert driver.stats.errors >= 1
    assert any("other-service-type" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


async def _all_completed(svc: WorkflowService, ids: list[int]) -> bool:
    return all([(await svc.get_workflow_instance(i)).status == "completed" for i in ids])


async def test_rows_of_nodes_the_definition_does_not_have(repo: Any) -> None:
    """Documented: a row of an unknown node (a node removed from the config) is left alone; a failed
    one fails the instance (as any failed row does)."""
    svc = service(repo, Journal())
    ignored = await svc.create_workflow(MIXED, "ghost-running")
    await repo.create_task_instance(
        ignored.id, TaskInsert(task_type="ghost", status="running", node_context={})
    )
    while (await svc.run_workflow(ignored.id)).status != "completed":
        pass
    rows = await rows_by_type(repo, ignored.id)
    assert rows["ghost"].status == "running" and set(rows) == {*ALL_ROWS, "ghost"}
    failing = await svc.create_workflow(MIXED, "ghost-failed")
    await repo.create_task_instance(
        failing.id, TaskInsert(task_type="ghost", status="failed", node_context={})
    )
    assert (await svc.run_workflow(failing.id)).status == "failed"
    assert set(await rows_by_type(repo, failing.id)) == {"ghost"}


async def test_a_node_status_nobody_knows_stalls_until_the_node_is_restarted(repo: Any) -> None:
    """Documented: a row whose status is not an asyncflow status is never run (nor overwritten); the
    instance waits, polled, until an operator restarts that node or cancels the instance."""
    journal = Journal()
    svc = service(repo, journal)
    inst = await svc.create_workflow(MIXED, "weird")
    await repo.create_task_instance(inst.id, TaskInsert(task_type="A", status="weird", node_context={}))
    for _ in range(3):
        assert (await svc.run_workflow(inst.id)).status == "running"
    rows = await rows_by_type(repo, inst.id)
    assert rows["A"].status == "weird" and set(rows) == {"root", "A"}
    assert journal.entries == []
    await svc.restart_workflow_node(inst.id, "A")
    while (await svc.run_workflow(inst.id)).status != "completed":
        pass
    assert set(await rows_by_type(repo, inst.id)) == ALL_ROWS


async def test_an_instance_status_nobody_knows_runs_no_worker(repo: Any) -> None:
    """An instance whose status is not an asyncflow status (a newer version's, a hand edit) is returned
    unchanged by a pass, like a terminal one: no worker runs for an instance no write could advance."""
    journal = Journal()
    svc = service(repo, journal)
    inst = await svc.create_workflow(MIXED, "bogus")
    await repo.update_workflow_instances(InstanceWhere(ids=(inst.id,)), InstanceFields(status="bogus"))
    before = await snapshot(repo)
    assert (await svc.run_workflow(inst.id)).status == "bogus"
    assert journal.entries == [], "no worker ran"
    assert await snapshot(repo) == before


@pytest.mark.parametrize("backend_sql", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_corrupt_context_documents_read_as_empty_and_the_run_goes_on(
    backend_sql: str, tmp_path: Any, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    """A context column holding invalid JSON (SQLite) or JSON that is not an object (PostgreSQL jsonb)
    reads as ``{}`` with a WARNING naming the column and row; passes go on and complete the instance;
    other instances are untouched."""
    from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
    from tests.conftest import isolated_pg_engine

    if backend_sql == "sqlite":
        sql_repo = SQLAlchemyWorkflowRepo(f"sqlite+aiosqlite:///{tmp_path}/corrupt.db")
        await _corrupt_run(sql_repo, ["'{not json'", "'[1, 2'"], caplog)
        return
    url = request.getfixturevalue("pg_url")
    async with isolated_pg_engine(url) as engine:
        await _corrupt_run(SQLAlchemyWorkflowRepo(engine), ["'[1, 2]'::jsonb", "'\"text\"'::jsonb"], caplog)


async def _corrupt_run(repo: Any, documents: list[str], caplog: pytest.LogCaptureFixture) -> None:
    await repo.create_schema()
    try:
        journal = Journal()
        svc = service(repo, journal)
        bystander = await svc.create_workflow(MIXED, "bystander", context={"keep": 1}, run=True)
        victim = await svc.create_workflow(MIXED, "victim", context={"keep": 2}, run=True)
        before = await snapshot(repo)
        kept = [i for i in before.instances if i.id == bystander.id] + [
            t for t in before.tasks if t.workflow_instance_id == bystander.id
        ]
        rows = await rows_by_type(repo, victim.id)
        assert rows["B"].status == "pending"
        async with repo.engine.begin() as conn:
            await conn.execute(
                text(f"UPDATE workflow_instance SET workflow_context = {documents[0]} WHERE id = :i"),
                {"i": victim.id},
            )
            await conn.execute(
                text(f"UPDATE task_instance SET node_context = {documents[1]} WHERE id = :i"),
                {"i": rows["B"].id},
            )
        with caplog.at_level(logging.WARNING, logger="asyncflow.store._json"):
            while (await svc.run_workflow(victim.id)).status != "completed":
                pass
        warnings = [r.getMessage() for r in caplog.records if r.name == "asyncflow.store._json"]
        assert any(f"row {victim.id}" in m and "workflow_context" in m for m in warnings)
        assert any(f"row {rows['B'].id}" in m and "node_context" in m for m in warnings)
        after = await rows_by_type(repo, victim.id)
        assert set(after) == ALL_ROWS and {r.status for r in after.values()} == {"completed"}
        assert after["F"].node_context["workflow_context"] == {}  # the corrupt document read as {}
        assert journal.done(victim.id, "B", "run") == 1, "a pending node is not run again"
        now = await snapshot(repo)
        assert [i for i in now.instances if i.id == bystander.id] + [
            t for t in now.tasks if t.workflow_instance_id == bystander.id
        ] == kept
    finally:
        await repo.aclose()
