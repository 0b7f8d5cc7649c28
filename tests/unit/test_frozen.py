"""``quick_init``: a frozen record's cheaper ``__init__`` behaves as the dataclass's own; ``positional``:
the records' positional factories build what their keyword constructors build."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import subprocess
import sys
import typing
from dataclasses import InitVar, dataclass, field
from typing import Any

import pytest

import asyncflow.records as records
from asyncflow._frozen import positional, quick_init
from asyncflow.store import _memory_rows
from asyncflow.worker import NodeInfo

QUICK = [
    records.WorkflowInstanceRecord,
    records.WorkflowInstance,
    records.TaskInstanceRecord,
    records.NewWorkflowInstance,
    records.TaskInsert,
    records.TaskUpdate,
    records.Step,
    records.StepResult,
    NodeInfo,
    _memory_rows.Instance,
    _memory_rows.Task,
]


def _twins(**options: Any) -> tuple[type, type]:
    """The same class twice: as the dataclass makes it, and with ``quick_init``."""

    def make() -> type:
        @dataclass(frozen=True, slots=True, **options)
        class Sample:
            a: int
            b: str = "b"
            c: tuple[int, ...] = ()
            d: dict[str, Any] | None = None

        return Sample

    return make(), quick_init(make())


@pytest.mark.parametrize("options", [{}, {"kw_only": True}])
def test_same_signature_values_and_errors_as_the_dataclass(options: dict[str, Any]) -> None:
    plain, quick = _twins(**options)
    assert inspect.signature(quick) == inspect.signature(plain)
    assert quick.__init__.__qualname__ == plain.__init__.__qualname__
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((), {"a": 1}),
        ((), {"a": 1, "b": "x", "c": (1, 2), "d": {"k": [1]}}),
        ((), {"d": None, "a": 3}),
    ]
    if not options:
        calls += [((1,), {}), ((1, "x", (2,)), {"d": {}})]
    for args, kwargs in calls:
        a, b = plain(*args, **kwargs), quick(*args, **kwargs)
        assert [getattr(b, f) for f in "abcd"] == [getattr(a, f) for f in "abcd"]
        assert repr(b) == repr(a).replace(plain.__qualname__, quick.__qualname__)
    for args, kwargs in [((), {}), ((), {"a": 1, "e": 2}), ((), {"b": "x"}), ((1, 2, 3, 4, 5), {})]:
        with pytest.raises(TypeError) as expected:
            plain(*args, **kwargs)
        with pytest.raises(TypeError) as got:
            quick(*args, **kwargs)
        assert str(got.value) == str(expected.value)
    if options:  # keyword-only stays keyword-only
        with pytest.raises(TypeError, match="positional"):
            quick(1)


def test_the_record_stays_frozen_hashable_and_copyable() -> None:
    _, quick = _twins()
    one = quick(1, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.a = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del one.b  # type: ignore[misc]
    assert one == quick(1, "x") and hash(one) == hash(quick(1, "x")) and one != quick(2, "x")
    assert dataclasses.replace(one, b="y") == quick(1, "y")
    assert copy.deepcopy(one) == one
    assert not hasattr(one, "__dict__")


def test_records_pickle_as_before() -> None:
    record = records.TaskInstanceRecord(
        id=1,
        workflow_instance_id=2,
        task_type="a",
        status="completed",
        node_context={"k": [1, {"x": None}]},
        fail_count=0,
        created_at=5,
        updated_at=6,
        started_at=5,
    )
    assert pickle.loads(pickle.dumps(record)) == record
    assert record.version == 1


@pytest.mark.parametrize("cls", QUICK, ids=lambda c: c.__qualname__)
def test_each_quick_record_takes_its_fields_as_declared(cls: type) -> None:
    """Names, kinds and defaults of ``__init__`` follow the fields (as the dataclass's ``__init__``)."""
    assert cls.__init__.__code__.co_filename == "<string>"  # the quick one, not the dataclass's
    params = list(inspect.signature(cls).parameters.values())
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        kind = inspect.Parameter.KEYWORD_ONLY if f.kw_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert p.kind == kind
        assert p.default == (inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
    values = {f.name: object() for f in fields}
    built = cls(**values)
    assert all(getattr(built, name) is value for name, value in values.items())


def test_refuses_what_it_cannot_rebuild() -> None:
    @dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class Factory:
        a: list[int] = field(default_factory=list)

    @dataclass(frozen=True, slots=True)
    class NotInInit:
        a: int = field(default=0, init=False)

    @dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        b: InitVar[int] = 0

    for cls in (NotFrozen, NoSlots, Factory, NotInInit, PostInit, WithInitVar):
        before = cls.__init__
        with pytest.raises(TypeError, match="quick_init"):
            quick_init(cls)
        assert cls.__init__ is before
        with pytest.raises(TypeError, match="positional"):
            positional(cls)
    with pytest.raises(TypeError, match="quick_init"):
        quick_init(int)
    with pytest.raises(TypeError, match="positional"):
        positional(int)


FACTORIES = {
    "new_instance_record": records.WorkflowInstanceRecord,
    "new_task_record": records.TaskInstanceRecord,
    "new_task_insert": records.TaskInsert,
    "new_task_update": records.TaskUpdate,
    "new_step": records.Step,
    "new_step_result": records.StepResult,
    "new_workflow_instance": records.WorkflowInstance,
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_each_factory_is_typed_with_its_fields_in_order(name: str) -> None:
    """The annotation mypy checks the engine's calls against lists the class's field types in
    declaration order: a field moved, added or retyped without the factory's annotation fails here."""
    cls = FACTORIES[name]
    declared = typing.get_type_hints(records)[name]
    arguments, returned = typing.get_args(declared)
    field_hints = typing.get_type_hints(cls)
    assert returned is cls
    assert arguments == [field_hints[f.name] for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_each_factory_builds_what_the_keyword_constructor_builds(name: str) -> None:
    cls, factory = FACTORIES[name], getattr(records, name)
    names = [f.name for f in dataclasses.fields(cls)]
    values = [object() for _ in names]
    built = factory(*values)
    assert type(built) is cls
    assert all(getattr(built, n) is v for n, v in zip(names, values, strict=True))
    assert built == cls(**dict(zip(names, values, strict=True)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(built, names[0], 1)
    with pytest.raises(TypeError):  # every field is passed: no defaults
        factory(*values[:-1])


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_record_s_factory_fills_a_twin_and_hands_it_the_class(name: str) -> None:
    """The records hold all their slots themselves: their factories fill an instance of a plain twin
    class and assign it the record's class. What comes out copies, pickles and compares as a record."""
    cls, factory = FACTORIES[name], getattr(records, name)
    assert "_twin" in factory.__globals__  # the twin path, not the descriptors
    names = [f.name for f in dataclasses.fields(cls)]
    built = factory(*range(len(names)))
    assert type(built) is cls and not hasattr(built, "__dict__")
    assert copy.copy(built) == built and pickle.loads(pickle.dumps(built)) == built
    assert dataclasses.replace(built, **{names[0]: -1}) == factory(-1, *range(1, len(names)))


def test_a_subclass_s_factory_sets_each_slot_through_its_descriptor() -> None:
    """A class whose slots are split over its bases has no twin (the two layouts would differ): its
    factory stores each field through the slot's descriptor, and builds the same record."""

    @dataclass(frozen=True, slots=True)
    class Base:
        a: int

    @dataclass(frozen=True, slots=True)
    class Sub(Base):
        b: int

    factory = positional(Sub)
    assert "_twin" not in factory.__globals__
    built = factory(1, 2)
    assert type(built) is Sub and built == Sub(1, 2) and (built.a, built.b) == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.a = 3  # type: ignore[misc]


def test_an_audit_hook_that_refuses_class_assignment_gets_the_descriptor_factories() -> None:
    """An audit hook (``sys.addaudithook``, which stays for the life of the process: hence a
    subprocess) that refuses ``__class__`` assignments when asyncflow is imported: the records'
    factories store through the slot descriptors instead, and build the same records."""
    script = """
import sys

def refuse(event, args):
    if event == "object.__setattr__" and args[1] == "__class__":
        raise RuntimeError("no __class__ assignment here")

sys.addaudithook(refuse)
import asyncflow.records as records

assert "_twin" not in records.new_task_record.__globals__
built = records.new_task_insert("a", "running", {}, 0, 0)
assert built == records.TaskInsert(task_type="a", status="running", node_context={})
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_from_record_builds_the_subclass_it_is_called_on() -> None:
    """``WorkflowInstance.from_record`` uses the positional factory for ``WorkflowInstance`` itself
    only: a subclass gets its own constructor, as before."""

    @dataclass(frozen=True, slots=True, kw_only=True)
    class Tagged(records.WorkflowInstance):
        tag: str = "t"

    record = records.WorkflowInstanceRecord(
        id=7,
        workflow_type="w",
        business_id="b",
        status="running",
        workflow_context={"k": 1},
        task_id=3,
        created_at=10,
        updated_at=11,
        parent_id=2,
    )
    plain = records.WorkflowInstance.from_record(record, "definition", status="completed", updated_at=12)
    assert type(plain) is records.WorkflowInstance
    assert (plain.status, plain.updated_at, plain.definition, plain.parent_id) == (
        "completed",
        12,
        "definition",
        2,
    )
    tagged = Tagged.from_record(record)
    assert type(tagged) is Tagged and tagged.tag == "t"
    assert (tagged.id, tagged.status, tagged.updated_at, tagged.workflow_context) == (
        7,
        "running",
        11,
        {"k": 1},
    )


@pytest.mark.parametrize(
    ("row", "record"),
    [
        (_memory_rows.Instance, records.WorkflowInstanceRecord),
        (_memory_rows.Task, records.TaskInstanceRecord),
    ],
    ids=["Instance", "Task"],
)
def test_the_memory_rows_make_their_records_field_by_field(row: type, record: type) -> None:
    """The memory repo's rows pass their fields to the record's positional factory in order: the
    same names in the same order, each value where it belongs (the context read back from its text)."""
    names = [f.name for f in dataclasses.fields(row)]
    assert names == [f.name for f in dataclasses.fields(record)]
    context = "workflow_context" if row is _memory_rows.Instance else "node_context"
    values = {n: object() for n in names}
    values[context] = '{"k": [1]}'
    built = row(**values).record()
    assert type(built) is record
    assert all(getattr(built, n) is v for n, v in values.items() if n != context)
    assert getattr(built, context) == {"k": [1]}
