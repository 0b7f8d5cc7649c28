"""The ``WorkflowRepo`` contract, run against every implementation: memory, SQLite, PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from asyncflow.clock import FakeClock
from asyncflow.errors import ParamInvalidError, StoreError, UniqueViolationError
from asyncflow.records import (
    InstanceFields,
    InstanceWhere,
    NewWorkflowInstance,
    Pager,
    QueryTaskInstanceParams,
    QueryWorkflowInstanceParams,
    Step,
    TaskFields,
    TaskInsert,
    TaskUpdate,
    TaskWhere,
    WorkflowInstanceRecord,
)
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.protocol import WorkflowRepo
from asyncflow.store.sqlalchemy import SQLAlchemyWorkflowRepo
from tests.conftest import isolated_pg_engine

T0 = 1_700_000_000


PG = pytest.mark.postgres


@pytest.fixture(
    params=[
        "memory",
        "sqlite",  # calls on the backend's own connection, steps grouped
        "sqlite-memory",  # an in-memory database: the same calls on SQLAlchemy's connection
        "sqlite-tx",  # every call inside repo.transaction()
        pytest.param("postgres", marks=PG),  # lanes, grouped steps, creates and reads
        pytest.param("postgres-alone", marks=PG),  # no lanes: no grouping, a connection per call
        pytest.param("postgres-tx", marks=PG),  # every call inside repo.transaction()
    ]
)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class InTransaction:
    """A repo whose every call runs inside its own ``transaction()`` (the repo's in-transaction path)."""

    _OWN = frozenset({"transaction", "aclose", "create_schema", "migrate"})

    def __init__(self, repo: SQLAlchemyWorkflowRepo) -> None:
        self.repo = repo

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.repo, name)
        if name in self._OWN or not callable(attribute):
            return attribute

        async def in_transaction(*args: Any, **kwargs: Any) -> Any:
            async with self.repo.transaction():
                return await attribute(*args, **kwargs)

        return in_transaction


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=float(T0))


@pytest.fixture
def engine_if_postgres(backend: str, request: pytest.FixtureRequest) -> Any:
    # resolved from a sync fixture: an async fixture cannot request another one dynamically
    if backend == "postgres-alone":
        return request.getfixturevalue("pg_engine_without_lanes")
    return request.getfixturevalue("pg_engine") if backend.startswith("postgres") else None


@pytest.fixture
async def pg_engine_without_lanes(postgres_url: str) -> AsyncIterator[Any]:
    """A pool of size 1 (overflow 10): the repo keeps no lanes, so nothing is grouped."""
    async with isolated_pg_engine(postgres_url, pool_size=1, max_overflow=10) as engine:
        yield engine


@pytest.fixture
async def repo(
    backend: str, engine_if_postgres: Any, sqlite_url: str, clock: FakeClock
) -> AsyncIterator[WorkflowRepo]:
    made: Any
    if backend == "memory":
        made = MemoryWorkflowRepo(clock=clock)
    elif backend.startswith("sqlite"):
        made = SQLAlchemyWorkflowRepo("sqlite://" if backend == "sqlite-memory" else sqlite_url, clock=clock)
    else:
        made = SQLAlchemyWorkflowRepo(engine_if_postgres, clock=clock)
    if backend.endswith("-tx"):
        made = InTransaction(made)
    elif backend == "postgres-alone":
        assert made._backend._step_batcher is None  # no grouping on this one
    await made.create_schema()
    try:
        yield made
    finally:
        await made.aclose()


def new(business_id: str = "b", **kw: Any) -> NewWorkflowInstance:
    kw.setdefault("workflow_type", "wf")
    kw.setdefault("workflow_context", {})
    return NewWorkflowInstance(business_id=business_id, **kw)


def task(task_type: str, status: str = "running", **kw: Any) -> TaskInsert:
    kw.setdefault("node_context", {})
    return TaskInsert(task_type=task_type, status=status, **kw)


ALL = QueryWorkflowInstanceParams(page=Pager(no_limit=True))


async def count(repo: WorkflowRepo, **filters: Any) -> int:
    return await repo.count_workflow_instances(QueryWorkflowInstanceParams(**filters))


# ------------------------------------------------------------------------------ create and read


async def test_create_then_get_returns_every_field(repo: WorkflowRepo) -> None:
    made = await repo.create_workflow_instance(
        new("order-1", workflow_type="ship", workflow_context={"k": [1, 2]}, task_id=7, next_run_at=5)
    )
    assert made.id > 0
    expected = WorkflowInstanceRecord(
        id=made.id,
        workflow_type="ship",
        business_id="order-1",
        status="init",
        workflow_context={"k": [1, 2]},
        task_id=7,
        created_at=T0,
        updated_at=T0,
        next_run_at=5,
        version=1,
    )
    assert made == expected
    assert await repo.get_workflow_instance(made.id) == expected
    assert await repo.get_workflow_instance(made.id + 1000) is None


async def test_contexts_are_copied_in_and_out(repo: WorkflowRepo) -> None:
    ctx: dict[str, Any] = {"list": [1], "nested": {"a": 1}}
    made = await repo.create_workflow_instance(new(workflow_context=ctx))
    ctx["list"].append(2)
    made.workflow_context["nested"]["a"] = 99
    read = await repo.get_workflow_instance(made.id)
    assert read is not None and read.workflow_context == {"list": [1], "nested": {"a": 1}}
    read.workflow_context["list"].append(3)
    again = await repo.get_workflow_instance(made.id)
    assert again is not None and again.workflow_context == {"list": [1], "nested": {"a": 1}}


async def test_context_values_round_trip_exactly(repo: WorkflowRepo) -> None:
    ctx = {
        "int": 2**62,
        "big": 2**80,
        "neg": -5,
        "float": 0.1,
        "half": 1.5,
        "tiny": 1e-7,
        "bool": True,
        "none": None,
        "text": 'ünï 🙂 \u202e \u2028 \x01\x1f\x7f \\u0000 back\\slash "quoted"',
        "empty": {},
        "list": [1, "two", [3.5], {"four": False}],
        "ключ 🙂": "key with unicode",
    }
    made = await repo.create_workflow_instance(new(workflow_context=ctx))
    read = await repo.get_workflow_instance(made.id)
    assert read is not None
    assert read.workflow_context == ctx
    assert type(read.workflow_context["int"]) is int and type(read.workflow_context["float"]) is float
    assert made.workflow_context == ctx


async def test_tuples_are_stored_as_lists(repo: WorkflowRepo) -> None:
    made = await repo.create_workflow_instance(new(workflow_context={"t": (1, 2)}))
    assert made.workflow_context == {"t": [1, 2]}
    read = await repo.get_workflow_instance(made.id)
    assert read is not None and read.workflow_context == {"t": [1, 2]}


async def test_a_one_megabyte_context_round_trips(repo: WorkflowRepo) -> None:
    chunk = "0123456789abcdefé🙂" * 10
    ctx = {"blob": chunk * (1_000_000 // len(chunk)), "items": [{"i": i, "s": chunk} for i in range(200)]}
    made = await repo.create_workflow_instance(new(workflow_context=ctx))
    read = await repo.get_workflow_instance(made.id)
    assert read is not None and read.workflow_context == ctx


BUSINESS_IDS = [
    "",
    "plain",
    "ünïcödé-业务-🙂",
    "tab\tnewline\ncr\r",
    "ctrl-\x01\x02\x1b\x1f\x7f",
    "\u2028\u2029\u202e\ufeff",
    "quote'\"back\\slash%_",
    "é" * 300,
]


@pytest.mark.parametrize("business_id", BUSINESS_IDS, ids=range(len(BUSINESS_IDS)))
async def test_business_ids_round_trip(repo: WorkflowRepo, business_id: str) -> None:
    await repo.create_workflow_instance(new("other"))
    made = await repo.create_workflow_instance(new(business_id))
    read = await repo.get_workflow_instance(made.id)
    assert read is not None and read.business_id == business_id
    found = await repo.query_workflow_instances(QueryWorkflowInstanceParams(business_id=business_id))
    assert [item.id for item in found] == [made.id]


INVALID_NEW: dict[str, Callable[[], NewWorkflowInstance]] = {
    "nul_business_id": lambda: new("a\x00b"),
    "nul_workflow_type": lambda: new(workflow_type="w\x00"),
    "nul_status": lambda: new(status="init\x00"),
    "nul_context_value": lambda: new(workflow_context={"a": ["x\x00y"]}),
    "nul_context_key": lambda: new(workflow_context={"k\x00": 1}),
    "surrogate_business_id": lambda: new("\ud800"),
    "surrogate_context": lambda: new(workflow_context={"a": "\udfff"}),
    "nan": lambda: new(workflow_context={"a": float("nan")}),
    "inf": lambda: new(workflow_context={"a": [float("inf")]}),
    "not_json": lambda: new(workflow_context={"a": {1, 2}}),
    "object": lambda: new(workflow_context={"a": object()}),
    "mixed_keys": lambda: new(workflow_context={1: "a", "b": 2}),
    "not_a_dict": lambda: new(workflow_context=[1, 2]),  # type: ignore[arg-type]
    "none_context": lambda: new(workflow_context=None),  # type: ignore[arg-type]
    "task_id_too_big": lambda: new(task_id=2**63),
    "task_id_bool": lambda: new(task_id=True),
    "negative_next_run_at": lambda: new(next_run_at=-1),
    "next_run_at_too_big": lambda: new(next_run_at=2**63),
    "task_id_too_small": lambda: new(task_id=-(2**63) - 1),
    "int_workflow_type": lambda: new(workflow_type=1),
    "surrogate_status": lambda: new(status="\ud800"),
}


@pytest.mark.parametrize("make", INVALID_NEW.values(), ids=INVALID_NEW.keys())
async def test_invalid_values_are_refused_alike_and_nothing_is_written(
    repo: WorkflowRepo, make: Callable[[], NewWorkflowInstance]
) -> None:
    with pytest.raises(ParamInvalidError):
        await repo.create_workflow_instance(make())
    with pytest.raises(ParamInvalidError):
        await repo.create_workflow_instances([new("fine"), make()])
    assert await count(repo) == 0


async def test_a_create_with_several_bad_fields_names_the_same_one_everywhere(repo: WorkflowRepo) -> None:
    """Fields are checked in one order (the context before task_id and next_run_at) on every backend."""
    with pytest.raises(ParamInvalidError, match=r"^workflow_context must be a dict"):
        await repo.create_workflow_instance(new(task_id=True, workflow_context=[1]))  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError, match=r"^workflow_context is not JSON"):
        await repo.create_workflow_instance(new(next_run_at=-1, workflow_context={"a": {1}}))
    with pytest.raises(ParamInvalidError, match=r"^business_id"):
        await repo.create_workflow_instance(new("a\x00", status=1))  # type: ignore[arg-type]
    assert await count(repo) == 0


async def test_nul_is_refused_in_every_written_or_filtered_string(repo: WorkflowRepo) -> None:
    made = await repo.create_workflow_instance(new())
    node = await repo.create_task_instance(made.id, task("a"))
    with pytest.raises(ParamInvalidError):
        await repo.create_task_instance(made.id, task("b\x00"))
    with pytest.raises(ParamInvalidError):
        await repo.create_task_instance(made.id, task("b", node_context={"x": "\x00"}))
    with pytest.raises(ParamInvalidError):
        await repo.query_workflow_instances(QueryWorkflowInstanceParams(business_id="a\x00"))
    with pytest.raises(ParamInvalidError):
        await repo.count_workflow_instances(QueryWorkflowInstanceParams(workflow_type_in=["\x00"]))
    with pytest.raises(ParamInvalidError):
        await repo.update_workflow_instances(
            InstanceWhere(ids=(made.id,)), InstanceFields(workflow_context={"a": "\x00"})
        )
    with pytest.raises(ParamInvalidError):
        await repo.update_task_instances(TaskWhere(ids=(node.id,)), TaskFields(status="x\x00"))
    with pytest.raises(ParamInvalidError):
        await repo.apply_step(Step(instance_id=made.id, inserts=(task("c", node_context={"\x00": 1}),)))
    assert [row.task_type for row in await repo.load_task_instances(made.id)] == ["a"]


async def test_bulk_create_returns_ids_in_input_order(repo: WorkflowRepo) -> None:
    assert await repo.create_workflow_instances([]) == []
    news = [new(f"b{i}", workflow_context={"i": i}, task_id=i) for i in range(2500)]
    ids = await repo.create_workflow_instances(news)
    assert len(ids) == len(set(ids)) == 2500
    for index in (0, 1, 999, 1000, 2001, 2499):
        read = await repo.get_workflow_instance(ids[index])
        assert read is not None
        assert (read.business_id, read.workflow_context, read.created_at) == (f"b{index}", {"i": index}, T0)
    assert await count(repo) == 2500


async def test_a_hundred_concurrent_creates_get_distinct_ids(repo: WorkflowRepo) -> None:
    made = await asyncio.gather(
        *(
            repo.create_workflow_instance(new(f"c{i}", workflow_context={"i": i}, task_id=i))
            for i in range(100)
        )
    )
    assert len({item.id for item in made}) == 100
    assert await count(repo) == 100
    for i, item in enumerate(made):  # each caller got the id of its own row
        assert (item.business_id, item.workflow_context, item.task_id) == (f"c{i}", {"i": i}, i)
        assert await repo.get_workflow_instance(item.id) == item


async def test_create_schema_is_idempotent(repo: WorkflowRepo) -> None:
    made = await repo.create_workflow_instance(new())
    await repo.create_schema()
    await repo.create_schema()
    assert await repo.get_workflow_instance(made.id) == made


# ------------------------------------------------------------------------------------- queries

SPECS = [
    ("abc"[i % 3], "" if i == 11 else "xy"[i % 2], ("init", "running", "completed", "failed")[i % 4], i % 3)
    for i in range(12)
]


@pytest.fixture
async def seeded(repo: WorkflowRepo) -> list[WorkflowInstanceRecord]:
    made = []
    for workflow_type, business_id, status, task_id in SPECS:
        made.append(
            await repo.create_workflow_instance(
                new(business_id, workflow_type=workflow_type, status=status, task_id=task_id)
            )
        )
    return made


Filter = Callable[[list[int]], dict[str, Any]]
FILTERS: dict[str, Filter] = {
    "instance_id": lambda ids: {"workflow_instance_id": ids[4]},
    "type_in": lambda ids: {"workflow_type_in": ["a", "c"]},
    "business_id": lambda ids: {"business_id": "x"},
    "business_id_empty": lambda ids: {"business_id": ""},
    "status_in": lambda ids: {"status_in": ["init", "failed"]},
    "id_greater_than": lambda ids: {"id_greater_than": ids[8]},
    "task_id": lambda ids: {"task_id": 2},
    "type_and_status": lambda ids: {"workflow_type_in": ["a", "b"], "status_in": ["init", "running"]},
    "everything": lambda ids: {
        "workflow_type_in": ["a", "b", "c"],
        "business_id": "x",
        "status_in": ["init", "completed"],
        "id_greater_than": ids[0],
        "task_id": 1,
    },
    "nothing_matches": lambda ids: {"workflow_type_in": ["a"], "task_id": 1, "business_id": "y"},
}


def _matches(record: WorkflowInstanceRecord, filters: dict[str, Any]) -> bool:
    checks = {
        "workflow_instance_id": lambda v: record.id == v,
        "workflow_type_in": lambda v: record.workflow_type in v,
        "business_id": lambda v: record.business_id == v,
        "status_in": lambda v: record.status in v,
        "id_greater_than": lambda v: record.id > v,
        "task_id": lambda v: record.task_id == v,
    }
    return all(checks[name](value) for name, value in filters.items())


@pytest.mark.parametrize("name", FILTERS)
async def test_filters_alone_and_anded(
    repo: WorkflowRepo, seeded: list[WorkflowInstanceRecord], name: str
) -> None:
    filters = FILTERS[name]([item.id for item in seeded])
    expected = [item.id for item in seeded if _matches(item, filters)]
    assert len(expected) < len(seeded)
    assert bool(expected) == (name != "nothing_matches")
    params = QueryWorkflowInstanceParams(page=Pager(no_limit=True), **filters)
    assert [item.id for item in await repo.query_workflow_instances(params)] == expected
    assert await repo.count_workflow_instances(params) == len(expected)


async def test_paging_defaults_do_not_touch_the_callers_pager(
    repo: WorkflowRepo, seeded: list[WorkflowInstanceRecord]
) -> None:
    ids = [item.id for item in seeded]
    pager = Pager(page=0, size=0)
    found = await repo.query_workflow_instances(QueryWorkflowInstanceParams(page=pager))
    assert [item.id for item in found] == ids[:10]
    assert (pager.page, pager.size, pager.no_limit) == (0, 0, False)
    default = await repo.query_workflow_instances(QueryWorkflowInstanceParams())
    assert [item.id for item in default] == ids[:10]
    second = await repo.query_workflow_instances(QueryWorkflowInstanceParams(page=Pager(page=2, size=5)))
    assert [item.id for item in second] == ids[5:10]
    size_only = await repo.query_workflow_instances(QueryWorkflowInstanceParams(page=Pager(page=0, size=4)))
    assert [item.id for item in size_only] == ids[:4]
    past_end = await repo.query_workflow_instances(QueryWorkflowInstanceParams(page=Pager(page=9, size=5)))
    assert past_end == []
    every = await repo.query_workflow_instances(
        QueryWorkflowInstanceParams(page=Pager(page=3, no_limit=True))
    )
    assert [item.id for item in every] == ids


@pytest.mark.parametrize("field", ["page", "size"])
async def test_negative_paging_is_refused(repo: WorkflowRepo, field: str) -> None:
    with pytest.raises(ParamInvalidError):
        Pager(**{field: -1})
    pager = Pager()
    object.__setattr__(pager, field, -1)  # bypassing the check must not reach the database
    with pytest.raises(ParamInvalidError):
        await repo.query_workflow_instances(QueryWorkflowInstanceParams(page=pager))
    with pytest.raises(ParamInvalidError):
        await repo.query_task_instances(QueryTaskInstanceParams(page=pager))


async def test_order_is_ascending_id_unless_descending_is_asked(
    repo: WorkflowRepo, seeded: list[WorkflowInstanceRecord]
) -> None:
    ids = [item.id for item in seeded]
    await repo.update_workflow_instances(
        InstanceWhere(ids=(ids[0], ids[5])), InstanceFields(status="running")
    )
    for asc in (None, True):
        pages = []
        for page in (1, 2, 3):
            params = QueryWorkflowInstanceParams(order_by_id_asc=asc, page=Pager(page=page, size=5))
            pages.extend(item.id for item in await repo.query_workflow_instances(params))
        assert pages == ids
    desc = QueryWorkflowInstanceParams(order_by_id_asc=False, page=Pager(page=1, size=5))
    assert [item.id for item in await repo.query_workflow_instances(desc)] == ids[::-1][:5]


async def test_cursor_paging_with_id_greater_than(
    repo: WorkflowRepo, seeded: list[WorkflowInstanceRecord]
) -> None:
    seen: list[int] = []
    cursor = 0
    while True:
        params = QueryWorkflowInstanceParams(id_greater_than=cursor, page=Pager(size=5))
        batch = await repo.query_workflow_instances(params)
        if not batch:
            break
        seen.extend(item.id for item in batch)
        cursor = batch[-1].id
    assert seen == [item.id for item in seeded]


async def test_count_ignores_paging(repo: WorkflowRepo, seeded: list[WorkflowInstanceRecord]) -> None:
    params = QueryWorkflowInstanceParams(page=Pager(page=3, size=1), order_by_id_asc=False)
    assert await repo.count_workflow_instances(params) == len(seeded)
    filtered = QueryWorkflowInstanceParams(status_in=["init"], page=Pager(page=5, size=1))
    assert await repo.count_workflow_instances(filtered) == sum(1 for spec in SPECS if spec[2] == "init")


# --------------------------------------------------------------------------------------- nodes


async def test_node_rows_create_load_and_unique(repo: WorkflowRepo, backend: str, clock: FakeClock) -> None:
    made = await repo.create_workflow_instance(new())
    other = await repo.create_workflow_instance(new())
    root = await repo.create_task_instance(made.id, task("root", "completed", node_context={"r": 1}))
    clock.advance(5)
    node = await repo.create_task_instance(made.id, task("a", fail_count=2, started_at=T0 - 60))
    await repo.create_task_instance(other.id, task("a"))
    assert (root.created_at, root.started_at, root.version, root.fail_count) == (T0, T0, 1, 0)
    assert (node.created_at, node.updated_at, node.started_at, node.fail_count) == (
        T0 + 5,
        T0 + 5,
        T0 - 60,
        2,
    )
    assert await repo.load_task_instances(made.id) == [root, node]
    with pytest.raises(UniqueViolationError) as caught:
        await repo.create_task_instance(made.id, task("a", "init"))
    assert isinstance(caught.value, StoreError)
    if backend != "memory":
        assert caught.value.__cause__ is not None  # the driver's exception
    assert await repo.load_task_instances(made.id) == [root, node]


async def test_load_instance_state_reads_the_instance_with_its_rows(repo: WorkflowRepo) -> None:
    made = await repo.create_workflow_instance(new(workflow_context={"w": [1]}))
    other = await repo.create_workflow_instance(new())
    assert await repo.load_instance_state(made.id) == (made, [])
    rows = [await repo.create_task_instance(made.id, task(t, node_context={"t": t})) for t in ("b", "a")]
    await repo.create_task_instance(other.id, task("a"))
    await repo.update_workflow_instances(InstanceWhere(ids=(made.id,)), InstanceFields(status="running"))
    state = await repo.load_instance_state(made.id)
    assert state == (await repo.get_workflow_instance(made.id), rows)
    assert state is not None and state[0].status == "running" and state[0].version == 2
    state[0].workflow_context["w"].append(2)  # the caller's copy
    state[1][0].node_context["t"] = "changed"
    assert await repo.load_instance_state(made.id) == (await repo.get_workflow_instance(made.id), rows)
    assert await repo.load_instance_state(made.id + other.id + 1000) is None
    with pytest.raises(ParamInvalidError, match="instance_id"):
        await repo.load_instance_state("1")  # type: ignore[arg-type]


async def test_load_instance_state_inside_a_transaction_sees_its_writes(repo: WorkflowRepo) -> None:
    async with repo.transaction():
        made = await repo.create_workflow_instance(new())
        row = await repo.create_task_instance(made.id, task("a"))
        assert await repo.load_instance_state(made.id) == (made, [row])


async def test_concurrent_state_reads_each_get_their_own_records(repo: WorkflowRepo) -> None:
    made = [await repo.create_workflow_instance(new(f"s{i}", workflow_context={"i": i})) for i in range(30)]
    rows = {
        item.id: [await repo.create_task_instance(item.id, task("a", node_context={"i": i}))]
        for i, item in enumerate(made)
    }
    asked = [item.id for item in made] + [made[0].id, made[0].id, 10**9]
    states = await asyncio.gather(*(repo.load_instance_state(i) for i in asked))
    for item, state in zip(made, states, strict=False):
        assert state == (item, rows[item.id])
    assert states[-1] is None
    first, second = states[30], states[31]
    assert first == second == states[0]
    assert first is not None and second is not None
    first[0].workflow_context["i"] = "mine"
    first[1][0].node_context["i"] = "mine"
    assert second == states[0] == (made[0], rows[made[0].id])  # the same instance, asked twice: two copies


async def test_node_row_for_a_missing_instance_is_a_store_error(repo: WorkflowRepo) -> None:
    with pytest.raises(StoreError) as caught:
        await repo.create_task_instance(424242, task("a"))
    assert not isinstance(caught.value, UniqueViolationError)


async def test_query_task_instances_filters(repo: WorkflowRepo) -> None:
    one = await repo.create_workflow_instance(new())
    two = await repo.create_workflow_instance(new())
    rows = [
        await repo.create_task_instance(one.id, task("root", "completed")),
        await repo.create_task_instance(two.id, task("root", "completed")),
        await repo.create_task_instance(one.id, task("a", "running")),
        await repo.create_task_instance(one.id, task("b", "pending")),
        await repo.create_task_instance(two.id, task("a", "failed")),
    ]

    async def ids(**kw: Any) -> list[int]:
        return [row.id for row in await repo.query_task_instances(QueryTaskInstanceParams(**kw))]

    assert await ids() == [row.id for row in rows]
    assert await ids(id=rows[2].id) == [rows[2].id]
    assert await ids(workflow_instance_id=one.id) == [rows[0].id, rows[2].id, rows[3].id]
    assert await ids(task_type="a") == [rows[2].id, rows[4].id]
    assert await ids(status_in=("completed", "pending")) == [rows[0].id, rows[1].id, rows[3].id]
    assert await ids(id_greater_than=rows[2].id) == [rows[3].id, rows[4].id]
    assert await ids(workflow_instance_id=two.id, task_type="a", status_in=("failed",)) == [rows[4].id]
    assert await ids(workflow_instance_id=two.id, status_in=("running",)) == []
    assert await ids(order_by_id_asc=False, page=Pager(size=2)) == [rows[4].id, rows[3].id]
    assert await ids(page=Pager(page=2, size=2)) == [rows[2].id, rows[3].id]
    assert await repo.load_task_instances(two.id) == [rows[1], rows[4]]


# ------------------------------------------------------------------------------------- updates


async def test_instance_update_is_compare_and_set(repo: WorkflowRepo, clock: FakeClock) -> None:
    made = await repo.create_workflow_instance(new(workflow_context={"a": 1}))
    clock.advance(30)
    stale = InstanceWhere(ids=(made.id,), status_in=("running",))
    assert await repo.update_workflow_instances(stale, InstanceFields(status="failed")) == 0
    assert await repo.get_workflow_instance(made.id) == made
    where = InstanceWhere(ids=(made.id,), status_in=("init", "running"))
    fields = InstanceFields(status="running", workflow_context={"b": [2]}, next_run_at=77)
    assert await repo.update_workflow_instances(where, fields) == 1
    read = await repo.get_workflow_instance(made.id)
    assert read is not None
    assert (read.status, read.workflow_context, read.next_run_at) == ("running", {"b": [2]}, 77)
    assert (read.created_at, read.updated_at, read.version) == (T0, T0 + 30, 2)
    assert read.business_id == made.business_id and read.task_id == made.task_id
    clock.advance(1)
    assert (
        await repo.update_workflow_instances(InstanceWhere(ids=(made.id,)), InstanceFields(next_run_at=5))
        == 1
    )
    again = await repo.get_workflow_instance(made.id)
    assert again is not None
    assert (again.status, again.workflow_context, again.next_run_at, again.version) == (
        "running",
        {"b": [2]},
        5,
        3,
    )
    assert again.updated_at == T0 + 31


async def test_instance_update_counts_rows_and_refuses_empty_where_or_fields(repo: WorkflowRepo) -> None:
    ids = [(await repo.create_workflow_instance(new(status=s))).id for s in ("init", "running", "completed")]
    where = InstanceWhere(ids=(*ids, 999_999), status_in=("init", "running"))
    assert await repo.update_workflow_instances(where, InstanceFields(status="canceled")) == 2
    assert await count(repo, status_in=["canceled"]) == 2
    with pytest.raises(ParamInvalidError):
        await repo.update_workflow_instances(InstanceWhere(ids=()), InstanceFields(status="x"))
    with pytest.raises(ParamInvalidError):
        await repo.update_workflow_instances(InstanceWhere(ids=(ids[0],)), InstanceFields())
    assert await count(repo, status_in=["x"]) == 0


async def test_node_update_is_compare_and_set(repo: WorkflowRepo, clock: FakeClock) -> None:
    made = await repo.create_workflow_instance(new())
    node = await repo.create_task_instance(made.id, task("a"))
    other = await repo.create_task_instance(made.id, task("b", "pending"))
    clock.advance(10)
    stale = TaskWhere(ids=(node.id,), version=node.version + 1)
    assert await repo.update_task_instances(stale, TaskFields(status="completed")) == 0
    fields = TaskFields(status="pending", node_context={"n": 1}, fail_count=3, started_at=T0 + 9)
    assert await repo.update_task_instances(TaskWhere(ids=(node.id,), version=node.version), fields) == 1
    assert await repo.update_task_instances(TaskWhere(ids=(node.id,), version=node.version), fields) == 0
    rows = await repo.load_task_instances(made.id)
    assert rows[1] == other
    updated = rows[0]
    assert (updated.status, updated.node_context, updated.fail_count, updated.started_at) == (
        "pending",
        {"n": 1},
        3,
        T0 + 9,
    )
    assert (updated.created_at, updated.updated_at, updated.version) == (T0, T0 + 10, 2)


async def test_node_update_by_instance_and_filters(repo: WorkflowRepo) -> None:
    made = await repo.create_workflow_instance(new())
    other = await repo.create_workflow_instance(new())
    for task_type, status in (("root", "completed"), ("a", "running"), ("b", "pending"), ("c", "running")):
        await repo.create_task_instance(made.id, task(task_type, status))
    await repo.create_task_instance(other.id, task("a", "running"))
    where = TaskWhere(workflow_instance_id=made.id, status_in=("running", "pending"), task_type_in=("a", "b"))
    assert await repo.update_task_instances(where, TaskFields(status="restarting")) == 2
    statuses = {row.task_type: row.status for row in await repo.load_task_instances(made.id)}
    assert statuses == {"root": "completed", "a": "restarting", "b": "restarting", "c": "running"}
    assert [row.status for row in await repo.load_task_instances(other.id)] == ["running"]
    with pytest.raises(ParamInvalidError):
        await repo.update_task_instances(TaskWhere(status_in=("running",)), TaskFields(status="failed"))
    with pytest.raises(ParamInvalidError):
        await repo.update_task_instances(TaskWhere(workflow_instance_id=made.id), TaskFields())
    assert await count(repo) == 2


# ---------------------------------------------------------------------------------------- steps


async def _instance_with_nodes(repo: WorkflowRepo, *nodes: tuple[str, str]) -> tuple[int, dict[str, Any]]:
    made = await repo.create_workflow_instance(new())
    rows = {t: await repo.create_task_instance(made.id, task(t, s)) for t, s in nodes}
    return made.id, rows


async def test_step_applies_everything_together(repo: WorkflowRepo, clock: FakeClock) -> None:
    instance_id, rows = await _instance_with_nodes(repo, ("root", "running"))
    clock.advance(3)
    step = Step(
        instance_id=instance_id,
        instance_status="running",
        next_run_at=1234,
        updates=(
            TaskUpdate(id=rows["root"].id, expected_version=1, status="completed", node_context={"x": 1}),
        ),
        inserts=(task("a", node_context={"from": "root"}), task("b", "init", started_at=T0 - 1)),
    )
    result = await repo.apply_step(step)
    assert result.applied
    assert [(r.task_type, r.status, r.node_context, r.started_at) for r in result.inserted] == [
        ("a", "running", {"from": "root"}, T0 + 3),
        ("b", "init", {}, T0 - 1),
    ]
    loaded = await repo.load_task_instances(instance_id)
    assert loaded[1:] == list(result.inserted)
    assert (loaded[0].status, loaded[0].node_context, loaded[0].version, loaded[0].updated_at) == (
        "completed",
        {"x": 1},
        2,
        T0 + 3,
    )
    instance = await repo.get_workflow_instance(instance_id)
    assert instance is not None
    assert (instance.status, instance.next_run_at, instance.version, instance.updated_at) == (
        "running",
        1234,
        2,
        T0 + 3,
    )


async def _unchanged(repo: WorkflowRepo, instance_id: int, before: list[Any], version: int) -> None:
    instance = await repo.get_workflow_instance(instance_id)
    assert instance is not None and instance.version == version
    assert await repo.load_task_instances(instance_id) == before


STEP_CONFLICTS: dict[str, Callable[[int, dict[str, Any]], Step]] = {
    "instance_status": lambda i, rows: Step(
        instance_id=i, instance_status_in=("running",), inserts=(task("new"),)
    ),
    "missing_instance": lambda i, rows: Step(instance_id=i + 1000),
    "stale_version": lambda i, rows: Step(
        instance_id=i,
        instance_status="running",
        updates=(TaskUpdate(id=rows["a"].id, expected_version=2, status="completed"),),
        inserts=(task("new"),),
    ),
    "row_of_another_instance": lambda i, rows: Step(
        instance_id=i, updates=(TaskUpdate(id=rows["other"].id, expected_version=1, status="failed"),)
    ),
    "same_row_twice": lambda i, rows: Step(
        instance_id=i,
        updates=(
            TaskUpdate(id=rows["a"].id, expected_version=1, status="pending"),
            TaskUpdate(id=rows["a"].id, expected_version=1, status="completed"),
        ),
    ),
    "duplicate_of_existing_row": lambda i, rows: Step(
        instance_id=i,
        instance_status="running",
        updates=(TaskUpdate(id=rows["a"].id, expected_version=1, status="completed"),),
        inserts=(task("new"), task("a")),
        cancel_other_tasks=True,
    ),
    "duplicate_within_step": lambda i, rows: Step(instance_id=i, inserts=(task("new"), task("new"))),
}


@pytest.mark.parametrize("make_step", STEP_CONFLICTS.values(), ids=STEP_CONFLICTS.keys())
async def test_step_with_a_failed_condition_writes_nothing(
    repo: WorkflowRepo, make_step: Callable[[int, dict[str, Any]], Step]
) -> None:
    instance_id, rows = await _instance_with_nodes(repo, ("root", "completed"), ("a", "running"))
    other = await repo.create_workflow_instance(new())
    rows["other"] = await repo.create_task_instance(other.id, task("x"))
    before = await repo.load_task_instances(instance_id)
    result = await repo.apply_step(make_step(instance_id, rows))
    assert not result.applied and result.inserted == ()
    await _unchanged(repo, instance_id, before, version=1)
    assert await repo.load_task_instances(other.id) == [rows["other"]]


class _BigInt(int):
    """An int subclass: takes the checks' slow path (``type(x) is int`` fails), which must refuse it too."""


INVALID_STEP_FIELDS: dict[str, dict[str, Any]] = {
    "nul_instance_status": {"instance_status": "running\x00"},
    "surrogate_instance_status": {"instance_status": "\ud800"},
    "int_instance_status": {"instance_status": 1},
    "negative_next_run_at": {"next_run_at": -1},
    "next_run_at_too_big": {"next_run_at": 2**63},
    "bool_next_run_at": {"next_run_at": True},
    "float_next_run_at": {"next_run_at": 1.5},
    "negative_lease_epoch": {"lease_epoch": -1},
    "lease_epoch_too_big": {"lease_epoch": 2**63},
    "str_lease_epoch": {"lease_epoch": "1"},
    "int_subclass_lease_epoch_too_big": {"lease_epoch": _BigInt(2**63)},
}


@pytest.mark.parametrize("fields", INVALID_STEP_FIELDS.values(), ids=INVALID_STEP_FIELDS.keys())
async def test_invalid_step_fields_are_refused_alike_and_nothing_is_written(
    repo: WorkflowRepo, fields: dict[str, Any]
) -> None:
    """The step's own fields (not its rows'): a typed error naming the field, on every backend."""
    instance_id, _ = await _instance_with_nodes(repo, ("root", "completed"))
    before = await repo.load_task_instances(instance_id)
    step = Step(instance_id=instance_id, inserts=(task("new"),), **fields)
    with pytest.raises(ParamInvalidError, match=f"Step.{next(iter(fields))}"):
        await repo.apply_step(step)
    await _unchanged(repo, instance_id, before, version=1)


class _Name(str):
    """A str subclass: takes the checks' slow path (``type(x) is str`` fails), and is accepted."""


class _Context(dict):  # type: ignore[type-arg]
    """A dict subclass: orjson passes it to json, which decides (accepted)."""


INVALID_STEP_INSERTS: dict[str, Callable[[], TaskInsert]] = {
    "nul_task_type": lambda: task("a\x00"),
    "surrogate_task_type": lambda: task("\ud800"),
    "int_task_type": lambda: task(1),  # type: ignore[arg-type]
    "list_status": lambda: task("a", ["running"]),  # type: ignore[arg-type]
    "nul_status": lambda: task("a", "running\x00"),
    "bool_fail_count": lambda: task("a", fail_count=True),
    "negative_fail_count": lambda: task("a", fail_count=-1),
    "int_subclass_fail_count_too_big": lambda: task("a", fail_count=_BigInt(2**63)),
    "negative_started_at": lambda: task("a", started_at=-1),
    "started_at_too_big": lambda: task("a", started_at=2**63),
    "both_ints_bad": lambda: task("a", fail_count=-1, started_at=-1),
    "bad_int_and_bad_context": lambda: task("a", started_at=1.5, node_context={"a": float("nan")}),
    "nan": lambda: task("a", node_context={"a": float("nan")}),
    "nul_context": lambda: task("a", node_context={"a": "\x00"}),
    "nul_context_key": lambda: task("a", node_context={"\x00": 1}),
    "not_a_dict": lambda: task("a", node_context=[1]),
    "none_context": lambda: task("a", node_context=None),
    "not_json": lambda: task("a", node_context={"a": {1}}),
}


@pytest.mark.parametrize("make", INVALID_STEP_INSERTS.values(), ids=INVALID_STEP_INSERTS.keys())
async def test_a_step_refuses_an_insert_as_create_task_instance_does(
    repo: WorkflowRepo, make: Callable[[], TaskInsert]
) -> None:
    """A step's rows are checked inline (the engine's common case); the error is create's, word for word."""
    instance_id, _ = await _instance_with_nodes(repo, ("root", "completed"))
    before = await repo.load_task_instances(instance_id)
    with pytest.raises(ParamInvalidError) as created:
        await repo.create_task_instance(instance_id, make())
    with pytest.raises(ParamInvalidError) as stepped:
        await repo.apply_step(Step(instance_id=instance_id, inserts=(task("fine"), make())))
    assert str(stepped.value) == str(created.value)
    await _unchanged(repo, instance_id, before, version=1)


ODD_STEP_INSERTS: dict[str, Callable[[], TaskInsert]] = {
    "str_subclass_names": lambda: task(_Name("a"), _Name("running")),
    "non_identifier_names": lambda: task("a b-ü", "run ning"),
    "escaped_backslash_u0000": lambda: task("a", node_context={"a": "\\u0000", "b\\u0000": 1}),
    "dict_subclass_context": lambda: task("a", node_context=_Context(a=1)),
    "int_beyond_orjson": lambda: task("a", node_context={"a": 2**64, "b": [None, 1.5]}),
    "tuple_and_none": lambda: task("a", node_context={"a": (1, 2), "n": None}),
}


@pytest.mark.parametrize("make", ODD_STEP_INSERTS.values(), ids=ODD_STEP_INSERTS.keys())
async def test_a_step_inserts_what_create_task_instance_inserts(
    repo: WorkflowRepo, make: Callable[[], TaskInsert]
) -> None:
    """Values off the inline checks' common case are stored (and returned) as create stores them."""
    created_in, _ = await _instance_with_nodes(repo)
    stepped_in, _ = await _instance_with_nodes(repo)
    created = await repo.create_task_instance(created_in, make())
    result = await repo.apply_step(Step(instance_id=stepped_in, inserts=(make(),)))
    assert result.applied
    [stepped] = result.inserted
    assert await repo.load_task_instances(stepped_in) == [stepped]
    for row in (created, stepped):
        assert (row.task_type, row.status, row.node_context, row.fail_count) == (
            created.task_type,
            created.status,
            created.node_context,
            created.fail_count,
        )
        assert type(row.node_context) is dict


async def test_step_cancels_only_other_non_terminal_rows(repo: WorkflowRepo) -> None:
    instance_id, rows = await _instance_with_nodes(
        repo, ("root", "completed"), ("a", "running"), ("b", "pending"), ("c", "failed"), ("d", "restarting")
    )
    other_id, other_rows = await _instance_with_nodes(repo, ("a", "running"))
    step = Step(
        instance_id=instance_id,
        instance_status="failed",
        updates=(TaskUpdate(id=rows["a"].id, expected_version=1, status="running", fail_count=1),),
        inserts=(task("e", "running"),),
        cancel_other_tasks=True,
    )
    assert (await repo.apply_step(step)).applied
    statuses = {
        row.task_type: (row.status, row.version) for row in await repo.load_task_instances(instance_id)
    }
    assert statuses == {
        "root": ("completed", 1),
        "a": ("running", 2),
        "b": ("canceled", 2),
        "c": ("failed", 1),
        "d": ("canceled", 2),
        "e": ("running", 1),
    }
    assert await repo.load_task_instances(other_id) == [other_rows["a"]]


async def test_cancel_step_without_rows_of_its_own_cancels_every_open_row(repo: WorkflowRepo) -> None:
    instance_id, _ = await _instance_with_nodes(
        repo, ("root", "completed"), ("a", "pending"), ("b", "running")
    )
    step = Step(instance_id=instance_id, instance_status="canceled", cancel_other_tasks=True)
    assert (await repo.apply_step(step)).applied
    rows = await repo.load_task_instances(instance_id)
    assert [(row.status, row.version) for row in rows] == [("completed", 1), ("canceled", 2), ("canceled", 2)]
    instance = await repo.get_workflow_instance(instance_id)
    assert instance is not None and instance.status == "canceled"
    assert not (await repo.apply_step(step)).applied  # canceled is not in the default status condition


async def test_step_with_empty_status_condition_applies_in_any_status(repo: WorkflowRepo) -> None:
    made = await repo.create_workflow_instance(new(status="completed"))
    assert not (await repo.apply_step(Step(instance_id=made.id, instance_status="running"))).applied
    step = Step(instance_id=made.id, instance_status_in=(), instance_status="running")
    assert (await repo.apply_step(step)).applied
    read = await repo.get_workflow_instance(made.id)
    assert read is not None and (read.status, read.version) == ("running", 2)


async def test_failed_step_inside_a_transaction_leaves_it_usable(repo: WorkflowRepo) -> None:
    instance_id, _ = await _instance_with_nodes(repo, ("a", "running"))
    async with repo.transaction():
        first = await repo.create_workflow_instance(new("first"))
        result = await repo.apply_step(Step(instance_id=instance_id, inserts=(task("b"), task("a"))))
        assert not result.applied
        ok = await repo.apply_step(Step(instance_id=instance_id, inserts=(task("b"),)))
        assert ok.applied
        second = await repo.create_workflow_instance(new("second"))
    assert await repo.get_workflow_instance(first.id) == first
    assert await repo.get_workflow_instance(second.id) == second
    assert [row.task_type for row in await repo.load_task_instances(instance_id)] == ["a", "b"]


# --------------------------------------------------------------------------------- transactions


async def test_transaction_commits_and_sees_its_own_writes(repo: WorkflowRepo) -> None:
    async with repo.transaction():
        made = await repo.create_workflow_instance(new())
        assert await repo.get_workflow_instance(made.id) == made
        await repo.update_workflow_instances(InstanceWhere(ids=(made.id,)), InstanceFields(status="running"))
    read = await repo.get_workflow_instance(made.id)
    assert read is not None and read.status == "running"


async def test_transaction_rolls_back_on_error(repo: WorkflowRepo) -> None:
    kept = await repo.create_workflow_instance(new("kept"))
    with pytest.raises(LookupError, match="boom"):
        async with repo.transaction():
            await repo.create_workflow_instance(new("gone"))
            await repo.update_workflow_instances(
                InstanceWhere(ids=(kept.id,)), InstanceFields(status="failed")
            )
            raise LookupError("boom")
    assert await count(repo) == 1
    assert await repo.get_workflow_instance(kept.id) == kept


async def test_transaction_rolls_back_on_cancellation(repo: WorkflowRepo) -> None:
    inside = asyncio.Event()

    async def body() -> None:
        async with repo.transaction():
            await repo.create_workflow_instance(new("gone"))
            inside.set()
            await asyncio.Event().wait()

    runner = asyncio.create_task(body())
    await inside.wait()
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert await count(repo) == 0
    made = await repo.create_workflow_instance(new("after"))  # the store is usable afterwards
    assert await repo.get_workflow_instance(made.id) == made


async def test_nested_transaction_joins_the_outer_one(repo: WorkflowRepo) -> None:
    with pytest.raises(RuntimeError):
        async with repo.transaction():
            async with repo.transaction():
                await repo.create_workflow_instance(new("inner"))
            assert await count(repo) == 1
            raise RuntimeError("outer fails after the inner block ended")
    assert await count(repo) == 0


async def test_tasks_spawned_inside_a_transaction_join_it(repo: WorkflowRepo) -> None:
    with pytest.raises(RuntimeError):
        async with repo.transaction():
            made = await asyncio.gather(*(repo.create_workflow_instance(new(f"s{i}")) for i in range(8)))
            assert len({item.id for item in made}) == 8
            assert await count(repo) == 8
            raise RuntimeError("roll all of them back")
    assert await count(repo) == 0


async def test_a_task_outliving_its_transaction_gets_a_store_error(repo: WorkflowRepo) -> None:
    go = asyncio.Event()

    async def late() -> None:
        await go.wait()
        await repo.create_workflow_instance(new("late"))

    async with repo.transaction():
        straggler = asyncio.create_task(late())
    go.set()
    with pytest.raises(StoreError):
        await straggler
    assert await count(repo) == 0


# ------------------------------------------------------------------------------------ the driver


async def test_claim_takes_due_runnable_instances_oldest_first(repo: WorkflowRepo) -> None:
    made = [
        await repo.create_workflow_instance(new(str(i), next_run_at=due, status=status, workflow_type=wt))
        for i, (due, status, wt) in enumerate(
            [
                (50, "init", "a"),
                (10, "running", "b"),
                (30, "init", "a"),
                (10, "init", "a"),
                (0, "completed", "a"),
                (0, "failed", "a"),
                (1000, "init", "a"),
            ]
        )
    ]
    ids = [item.id for item in made]
    assert await repo.next_due_at() == 10
    assert await repo.next_due_at(["a"]) == 10
    assert await repo.next_due_at(["zzz"]) is None
    assert await repo.claim_due_instances(now_ms=100, limit=0, lease_ms=500) == []
    assert await repo.claim_due_instances(now_ms=100, limit=3, lease_ms=500) == [ids[1], ids[3], ids[2]]
    assert await repo.claim_due_instances(now_ms=100, limit=3, lease_ms=500) == [ids[0]]
    assert await repo.claim_due_instances(now_ms=100, limit=3, lease_ms=500) == []
    claimed = await repo.get_workflow_instance(ids[1])
    assert claimed is not None and (claimed.next_run_at, claimed.version) == (600, 1)
    assert await repo.next_due_at() == 600
    assert await repo.claim_due_instances(now_ms=600, limit=10, lease_ms=500, workflow_types=["b"]) == [
        ids[1]
    ]
    # ids 0, 2 and 3 were leased until 600 (ties go by id), id 6 is due at 1000
    assert await repo.claim_due_instances(now_ms=1000, limit=10, lease_ms=5, workflow_types=["a"]) == [
        ids[0],
        ids[2],
        ids[3],
        ids[6],
    ]


async def test_claim_due_states_claims_in_order_and_hands_over_new_instances(
    repo: WorkflowRepo, request: pytest.FixtureRequest
) -> None:
    """``claim_due_states`` (asyncflow's repos; not in the protocol): the same ids in the same order as
    ``claim_due_instances``, with the record of each new instance (taken to lease epoch 1); PostgreSQL
    inside ``transaction()`` claims without records (the driver never claims there)."""
    dues = [(50, "init", "a"), (10, "running", "b"), (30, "init", "a"), (10, "init", "a")]
    dues.append((1000, "init", "a"))
    made = [
        await repo.create_workflow_instance(new(str(i), next_run_at=due, status=status, workflow_type=wt))
        for i, (due, status, wt) in enumerate(dues)
    ]
    ids = [item.id for item in made]
    await repo.load_instance_state(ids[3], lease=True)  # a pass leased it: not new any more
    claim = repo.claim_due_states  # type: ignore[attr-defined]
    assert await claim(now_ms=100, limit=0, lease_ms=500) == []
    first = await claim(now_ms=100, limit=3, lease_ms=500)
    assert [i for i, _ in first] == [ids[1], ids[3], ids[2]]
    handed = [record is not None for _, record in first]
    if "postgres-tx" in request.node.name:
        assert handed == [False, False, False]
    else:
        assert handed == [True, False, True]
    for instance_id, record in first:
        if record is not None:
            assert record == await repo.get_workflow_instance(instance_id)
            assert (record.lease_epoch, record.version, record.next_run_at) == (1, 1, 600)
    assert await claim(now_ms=100, limit=3, lease_ms=500, workflow_types=["b"]) == []
    assert [i for i, _ in await claim(now_ms=2000, limit=9, lease_ms=5, workflow_types=["a"])] == [
        ids[0],  # due at 50; the others were leased until 600 (ties by id), and one is due at 1000
        ids[2],
        ids[3],
        ids[4],
    ]


async def test_concurrent_claimers_never_share_an_instance(repo: WorkflowRepo) -> None:
    await repo.create_workflow_instances([new(str(i), next_run_at=i) for i in range(60)])
    batches = await asyncio.gather(
        *(repo.claim_due_instances(now_ms=100, limit=7, lease_ms=10_000) for _ in range(12))
    )
    claimed = [i for batch in batches for i in batch]
    assert len(claimed) == len(set(claimed)) == 60
    assert await repo.next_due_at() == 10_100


async def test_next_due_at_is_none_without_runnable_instances(repo: WorkflowRepo) -> None:
    assert await repo.next_due_at() is None
    await repo.create_workflow_instance(new(status="completed"))
    assert await repo.next_due_at() is None
