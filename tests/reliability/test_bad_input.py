"""Issue 8, item 6 (part 2): bad input a user hands the service, on the memory repo, SQLite and PostgreSQL.

Every bad argument of every operation gets its typed error and leaves the stored state exactly as it
was (a snapshot of every row, timestamps and versions included, is compared before and after).
Contexts that are not JSON, 10 MB contexts and business ids shaped like SQL injection get a typed
error or the documented behaviour (docs/reliability.md). Bad data from the database: test_bad_stored_data.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from asyncflow._json_depth import MAX_JSON_DEPTH
from asyncflow.context import JSONContext
from asyncflow.engine.service import WorkflowService
from asyncflow.errors import (
    AsyncflowError,
    ConfigNotFoundError,
    InstanceNotFoundError,
    InvalidStateError,
    ParamInvalidError,
    StoreError,
    TaskInstanceNotFoundError,
)
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.records import (
    NewWorkflowInstance,
    NodeExternalEvent,
    QueryWorkflowInstanceParams,
    TaskInsert,
)
from asyncflow.registry import Registry
from asyncflow.worker import NormalTaskWorker

from .helpers import ALL_ROWS, MIXED, Journal, rows_by_type, service, snapshot

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
    for depth in (MAX_JSON_DEPTH, 500):  # {"deep": [...]} is one level more than the list
        add(
            f"create(context nested {depth + 1} deep)",
            lambda d=depth: svc.create_workflow(MIXED, "x", context=_deep(d)),
            ParamInvalidError,
        )
        add(
            f"create(JSONContext nested {depth + 1} deep)",
            lambda d=depth: svc.create_workflow(MIXED, "x", context=JSONContext.from_map(_deep(d))),
            ParamInvalidError,
        )
        add(
            f"restart(context nested {depth + 1} deep)",
            lambda d=depth: svc.restart_workflow_instance(ids["canceled"], context=_deep(d)),
            ParamInvalidError,
        )
        add(
            f"event content nested {depth + 1} deep",
            lambda d=depth: svc.add_node_external_event(
                mid, "B", NodeExternalEvent(event_ts=5, event_content=_deep(d))
            ),
            ParamInvalidError,
        )
    for ts in (2**63, 2**70, -(2**63) - 1):  # read back as int64: a later, older ts would be let in
        add(
            f"event_ts={ts!r}",
            lambda t=ts: svc.add_node_external_event(mid, "B", NodeExternalEvent(event_ts=t)),
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
    # the pass ran (wrote its nodes) before wait_interval was used, then raised TypeError/ValueError/
    # OverflowError (or ParamInvalidError for a due time beyond int64)
    for wait in ("1", math.nan, math.inf, -1, 1e300, True):
        add(
            f"run_pass(wait_interval={wait!r})",
            lambda w=wait: svc.run_pass(mid, wait_interval=w),
            ParamInvalidError,
        )
    for names in (5, b"mixed"):  # 5 raised TypeError (not iterable); bytes gave ("109", "105", ...)
        add(
            f"query(workflow_type_in={names!r})",
            lambda n=names: svc.query_workflow_instances(QueryWorkflowInstanceParams(workflow_type_in=n)),
            ParamInvalidError,
        )
        add(
            f"query(status_in={names!r})",
            lambda n=names: svc.query_workflow_instances(QueryWorkflowInstanceParams(status_in=n)),
            ParamInvalidError,
        )
    for name in ("NUL\x00", "\udc80"):  # PostgreSQL alone refused them (a raw driver error in StoreError)
        add(
            f"purge(workflow_types=[{name!r}])",
            lambda n=name: svc.purge_workflow_instances(older_than=0, workflow_types=[MIXED, n]),
            ParamInvalidError,
        )
    return out


def test_none_type_and_status_filters_are_no_filter_as_documented() -> None:
    # the docstring: "Empty sequences and None mean no filter" (None raised TypeError)
    assert QueryWorkflowInstanceParams(workflow_type_in=None, status_in=None) == QueryWorkflowInstanceParams()  # type: ignore[arg-type]


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
        {"lock_ttl": math.inf},
        {"lock_ttl": math.nan},
        {"lock_ttl": 0.0001},
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


async def test_contexts_at_the_depth_limit_run_to_completion(repo: Any) -> None:
    """MAX_JSON_DEPTH levels are accepted everywhere a context comes in, and the engine runs them."""
    svc = service(repo, Journal())
    at_limit = _deep(MAX_JSON_DEPTH - 1)
    inst = await svc.create_workflow(MIXED, "deep", context=at_limit, run=True)
    await svc.add_node_external_event(inst.id, "B", NodeExternalEvent(event_ts=1, event_content=at_limit))
    while (await svc.run_workflow(inst.id)).status == "running":
        pass
    done = await svc.get_workflow_instance(inst.id)
    assert done.status == "completed"
    assert done.workflow_context == at_limit


async def test_a_node_row_of_a_missing_instance_is_refused_and_not_written(repo: Any) -> None:
    """Every backend refuses it with the same StoreError: SQLite's and the memory repo's foreign key,
    PostgreSQL's guarded insert (it has no foreign key since migration 11)."""
    kept = await repo.create_workflow_instance(
        NewWorkflowInstance(workflow_type="wf", business_id="b", workflow_context={})
    )
    row = TaskInsert(task_type="a", status="running", node_context={})
    with pytest.raises(StoreError, match=f"create_task_instance failed: no workflow_instance {kept.id + 1} "):
        await repo.create_task_instance(kept.id + 1, row)
    assert await repo.load_task_instances(kept.id + 1) == []
    made = await repo.create_task_instance(kept.id, row)  # the instance that exists takes it
    assert await repo.load_task_instances(kept.id) == [made]
