"""JSONContext: the Go test cases (reference §12 items 1-15) and the port scenarios (§13 items 72-79)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

import pytest

from asyncflow.context import JSONContext, dumps_json, loads_json_object, merge_json_contexts
from asyncflow.errors import ParamInvalidError

LOGGER = "asyncflow.context"


# -- §12 1-9: workflow/json_context_test.go -------------------------------------------------------------


def test_basic_operations() -> None:
    ctx = JSONContext()
    ctx.set(["user", "name"], "alice")
    ctx.set(["user", "age"], 25)
    ctx.set(["user", "active"], True)
    ctx.set(["score"], 98.5)
    assert ctx.get_string("user", "name") == ("alice", True)
    assert ctx.get_int64("user", "age") == (25, True)
    assert ctx.get_bool("user", "active") == (True, True)
    assert ctx.get_float64("score") == (98.5, True)


def test_from_bytes() -> None:
    raw = b'{"workflow_id":12345,"node_event":{"event_ts":1640000000.0,"content":"go"},"name":"wf"}'
    ctx = JSONContext(raw)
    assert ctx.get_int64("workflow_id") == (12345, True)
    assert ctx.get_int64("node_event", "event_ts") == (1640000000, True)
    assert ctx.get_string("node_event", "content") == ("go", True)
    assert ctx.get_string("name") == ("wf", True)


def test_to_bytes_round_trip() -> None:
    ctx = JSONContext()
    ctx.set(["name"], "test")
    ctx.set(["count"], 42)
    decoded = json.loads(ctx.to_bytes())
    assert decoded == {"count": 42, "name": "test"}
    assert type(decoded["count"]) is int


def test_delete_top_level_and_nested() -> None:
    ctx = JSONContext({"a": "1", "b": {"c": "2", "d": "3"}})
    ctx.delete("a")
    ctx.delete("b", "c")
    assert ctx.get_string("a") == ("", False)
    assert ctx.get_string("b", "c") == ("", False)
    assert ctx.get_string("b", "d") == ("3", True)


def test_clone_is_independent() -> None:
    ctx = JSONContext({"key": "original"})
    clone = ctx.clone()
    clone.set(["key"], "changed")
    assert ctx.get_string("key") == ("original", True)
    assert clone.get_string("key") == ("changed", True)


@dataclasses.dataclass
class Person:
    name: str
    age: int
    city: str = ""


def test_unmarshal_into_dataclass() -> None:
    ctx = JSONContext({"name": "bob", "age": 30, "city": "Paris", "extra": [1, 2]})
    assert ctx.unmarshal(Person) == Person(name="bob", age=30, city="Paris")


def test_merge_later_wins() -> None:
    merged = merge_json_contexts(JSONContext({"a": 1, "b": 2}), JSONContext({"b": 3, "c": 4}))
    assert merged.get_int64("a") == (1, True)
    assert merged.get_int64("b") == (3, True)
    assert merged.get_int64("c") == (4, True)


def test_four_level_get_and_three_level_set() -> None:
    # The Go benchmarks (items 8, 9) as correctness checks.
    ctx = JSONContext({"a": {"b": {"c": {"d": "deep"}}}})
    assert ctx.get_string("a", "b", "c", "d") == ("deep", True)
    ctx.set(["x", "y", "z"], 1)
    assert ctx.to_map()["x"] == {"y": {"z": 1}}


# -- §12 10-15: internal/tests/json_context_simple_test.go ----------------------------------------------


def test_simple_create_and_read() -> None:
    ctx = JSONContext('{"name":"test","age":18}')
    assert ctx.get_string("name") == ("test", True)
    assert ctx.get_int64("age") == (18, True)


def test_simple_create_from_map() -> None:
    ctx = JSONContext.from_map({"name": "from-map"})
    assert ctx.get_string("name") == ("from-map", True)


def test_simple_set_and_get() -> None:
    ctx = JSONContext()
    assert ctx.set(["key1"], "value1") is None  # type: ignore[func-returns-value]
    ctx.set(["key2"], 123)
    assert ctx.get_string("key1") == ("value1", True)
    assert ctx.get_int64("key2") == (123, True)


def test_simple_nested_path() -> None:
    ctx = JSONContext()
    ctx.set(["user", "profile", "name"], "carol")
    ctx.set(["user", "profile", "age"], 30)
    assert ctx.get_string("user", "profile", "name") == ("carol", True)
    assert ctx.get_int64("user", "profile", "age") == (30, True)


def test_simple_to_bytes() -> None:
    ctx = JSONContext({"k": "v"})
    data = ctx.to_bytes()
    assert data
    assert JSONContext(data).get_string("k") == ("v", True)


def test_simple_clone() -> None:
    ctx = JSONContext({"k": "v"})
    clone = ctx.clone()
    clone.set(["k"], "other")
    clone.set(["new"], 1)
    assert ctx == {"k": "v"}


# -- §13 72: get ----------------------------------------------------------------------------------------


def test_get_without_keys_is_not_found() -> None:
    assert JSONContext({"a": 1}).get() == (None, False)


@pytest.mark.parametrize("path", [("l", "0"), ("s", "x"), ("n", "x"), ("i", "x"), ("missing",), ("d", "no")])
def test_get_through_non_dict_or_missing_is_not_found(path: tuple[str, ...]) -> None:
    ctx = JSONContext({"l": [{"0": 1}], "s": "str", "n": None, "i": 5, "d": {}})
    assert ctx.get(*path) == (None, False)


def test_get_present_null_is_found() -> None:
    ctx = JSONContext(b'{"a":null,"b":{"c":null}}')
    assert ctx.get("a") == (None, True)
    assert ctx.get("b", "c") == (None, True)
    assert ctx.get_string("a") == ("", False)


def test_get_does_not_traverse_non_dict_mappings() -> None:
    from types import MappingProxyType

    ctx = JSONContext.from_map({"m": MappingProxyType({"x": 1})})
    assert ctx.get("m", "x") == (None, False)


# -- §13 73: typed getters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3.9, (3, True)),
        (-3.9, (-3, True)),
        (2.0, (2, True)),
        (2**62, (2**62, True)),
        (2**63 - 1, (2**63 - 1, True)),
        (-(2**63), (-(2**63), True)),
        (2**63, (0, False)),
        (-(2**63) - 1, (0, False)),
        (1e300, (0, False)),
        (float("nan"), (0, False)),
        (float("inf"), (0, False)),
        (float("-inf"), (0, False)),
        ("123", (0, False)),
        (True, (0, False)),
        (False, (0, False)),
        (None, (0, False)),
        ([1], (0, False)),
        ({"a": 1}, (0, False)),
    ],
)
def test_get_int64(value: Any, expected: tuple[int, bool]) -> None:
    ctx = JSONContext.from_map({"v": value})
    result = ctx.get_int64("v")
    assert result == expected
    assert type(result[0]) is int


def test_get_int64_is_exact_beyond_float_precision() -> None:
    big = 2**62 + 1  # not representable as a float64
    ctx = JSONContext(json.dumps({"v": big}))
    assert ctx.get_int64("v") == (big, True)
    assert JSONContext(ctx.to_bytes()).get("v") == (big, True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (98.5, (98.5, True)),
        (7, (7.0, True)),
        (-(2**62), (float(-(2**62)), True)),
        (10**400, (0.0, False)),
        (True, (0.0, False)),
        ("1.5", (0.0, False)),
        (None, (0.0, False)),
    ],
)
def test_get_float64(value: Any, expected: tuple[float, bool]) -> None:
    result = JSONContext.from_map({"v": value}).get_float64("v")
    assert result == expected
    assert type(result[0]) is float


@pytest.mark.parametrize(("value", "expected"), [(True, (True, True)), (False, (False, True))])
def test_get_bool_accepts_bools(value: bool, expected: tuple[bool, bool]) -> None:
    assert JSONContext({"v": value}).get_bool("v") == expected


@pytest.mark.parametrize("value", [1, 0, "true", None, 1.0, [True]])
def test_get_bool_is_strict(value: Any) -> None:
    assert JSONContext({"v": value}).get_bool("v") == (False, False)


@pytest.mark.parametrize("value", [1, 1.5, True, None, ["s"], {"s": "s"}, b"s"])
def test_get_string_is_strict(value: Any) -> None:
    assert JSONContext.from_map({"v": value}).get_string("v") == ("", False)


def test_typed_getters_missing_give_zero_values() -> None:
    ctx = JSONContext()
    assert ctx.get_string("x") == ("", False)
    assert ctx.get_int64("x") == (0, False)
    assert ctx.get_float64("x") == (0.0, False)
    assert ctx.get_bool("x") == (False, False)
    assert ctx.get_string() == ("", False)


# -- §13 74: set ----------------------------------------------------------------------------------------


def test_set_empty_path_raises() -> None:
    with pytest.raises(ParamInvalidError, match="empty"):
        JSONContext().set([], 1)


def test_set_with_a_bare_string_raises() -> None:
    ctx = JSONContext()
    with pytest.raises(ParamInvalidError, match="bare string"):
        ctx.set("abc", 1)
    assert ctx == {}


def test_set_with_a_non_str_key_raises() -> None:
    ctx = JSONContext()
    with pytest.raises(ParamInvalidError, match="int"):
        ctx.set(["a", 1], 1)  # type: ignore[list-item]
    assert ctx == {}


def test_a_one_key_set_is_the_general_set() -> None:
    class Key(str):
        pass

    for keys in (["a"], ("a",), [Key("a")]):
        ctx = JSONContext({"a": {"old": 1}, "b": 2})
        ctx.set(keys, {"new": 1})
        assert ctx == {"a": {"new": 1}, "b": 2}
    with pytest.raises(ParamInvalidError, match="int"):
        JSONContext().set([1], 1)  # type: ignore[list-item]
    with pytest.raises(ParamInvalidError, match="bare string"):
        JSONContext().set(b"a", 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("blocker", ["scalar", 5, [1, 2], None, True])
def test_set_through_non_dict_replaces_it(blocker: Any) -> None:
    ctx = JSONContext({"a": blocker, "keep": 1})
    ctx.set(["a", "b", "c"], "v")
    assert ctx == {"a": {"b": {"c": "v"}}, "keep": 1}


def test_set_deep_creates_and_preserves_siblings() -> None:
    ctx = JSONContext({"a": {"x": 1}})
    ctx.set(("a", "b", "c", "d"), 4)
    ctx.set(["a", "b", "e"], 5)
    assert ctx == {"a": {"x": 1, "b": {"c": {"d": 4}, "e": 5}}}


def test_set_overwrites_final_key() -> None:
    ctx = JSONContext({"a": {"b": {"deep": 1}}})
    ctx.set(["a", "b"], 2)
    assert ctx.get("a", "b") == (2, True)


def test_set_stores_the_value_by_reference() -> None:
    ctx = JSONContext()
    value = {"list": [1]}
    ctx.set(["v"], value)
    value["list"].append(2)
    assert ctx.get("v", "list") == ([1, 2], True)


def test_set_accepts_any_value_and_serialization_checks_it() -> None:
    ctx = JSONContext()
    ctx.set(["when"], object())
    with pytest.raises(ParamInvalidError, match="object"):
        ctx.to_bytes()


# -- §13 75: delete -------------------------------------------------------------------------------------


def test_delete_missing_or_through_non_dict_is_noop() -> None:
    original = {"a": {"b": 1}, "s": "x", "l": [{"k": 1}]}
    ctx = JSONContext(original)
    ctx.delete()
    ctx.delete("missing")
    ctx.delete("missing", "deeper")
    ctx.delete("a", "missing")
    ctx.delete("s", "x")
    ctx.delete("l", "k")
    ctx.delete("a", "b", "c")
    assert ctx == original


def test_delete_nested() -> None:
    ctx = JSONContext({"a": {"b": {"c": 1, "d": 2}}})
    ctx.delete("a", "b", "c")
    assert ctx == {"a": {"b": {"d": 2}}}


# -- §13 76: clone and merge ----------------------------------------------------------------------------


def test_clone_is_deep() -> None:
    ctx = JSONContext({"a": {"b": [1, {"c": 2}]}})
    clone = ctx.clone()
    clone.to_map()["a"]["b"][1]["c"] = 99
    clone.to_map()["a"]["b"].append(3)
    assert ctx == {"a": {"b": [1, {"c": 2}]}}
    assert clone == {"a": {"b": [1, {"c": 99}, 3]}}


def test_clone_never_fails_on_non_json_values() -> None:
    nested = {"x": 1}
    ctx = JSONContext.from_map({"nan": math.nan, "obj": {1, 2}, "t": (nested,)})
    clone = ctx.clone()
    assert math.isnan(clone.get_float64("nan")[0])
    assert clone.get("obj") == ({1, 2}, True)
    copied_tuple = clone.get("t")[0]
    assert copied_tuple == ({"x": 1},)
    assert copied_tuple[0] is not nested


def test_merge_is_shallow() -> None:
    first = JSONContext({"n": {"a": 1}})
    second = JSONContext({"n": {"b": 2}, "shared": {"s": 1}})
    merged = merge_json_contexts(first, second)
    assert merged == {"n": {"b": 2}, "shared": {"s": 1}}
    merged.to_map()["shared"]["s"] = 2  # nested values are shared with the inputs, as in Go
    assert second.get_int64("shared", "s") == (2, True)
    merged.set(["top"], 1)
    assert "top" not in second and "top" not in first


def test_merge_skips_none_and_handles_no_args() -> None:
    assert merge_json_contexts() == {}
    assert merge_json_contexts(None, JSONContext({"a": 1}), None) == {"a": 1}
    only = JSONContext({"a": 1})
    merged = merge_json_contexts(only)
    assert merged is not only
    merged.set(["b"], 2)
    assert only == {"a": 1}


# -- §13 77: construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "invalid"),
        ("[1,2]", "an array"),
        ('"s"', "a string"),
        ("null", "null"),
        ("12", "a number"),
        ("true", "a boolean"),
        (b"\xff\xfe", "invalid"),
        ('{"a": NaN}', "invalid"),
        ('{"a": Infinity}', "invalid"),
        ("   ", "invalid"),
        ("[" * 100_000 + "]" * 100_000, "invalid"),
    ],
)
def test_bad_text_gives_usable_empty_context_and_warns(
    raw: str | bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ctx = JSONContext(raw)
    assert ctx == {}
    ctx.set(["a"], 1)
    assert ctx.get_int64("a") == (1, True)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert reason in records[0].getMessage()


@pytest.mark.parametrize("raw", [None, b"", "", bytearray()])
def test_none_or_empty_gives_empty_context_silently(
    raw: str | bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        ctx = JSONContext(raw)
    assert ctx == {}
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_construction_from_mapping_copies_deeply() -> None:
    source: dict[str, Any] = {"a": {"b": [1]}}
    ctx = JSONContext(source)
    source["a"]["b"].append(2)
    source["c"] = 3
    assert ctx == {"a": {"b": [1]}}


def test_construction_from_context_copies_deeply() -> None:
    first = JSONContext({"a": {"b": 1}})
    second = JSONContext(first)
    second.set(["a", "b"], 2)
    assert first.get_int64("a", "b") == (1, True)


def test_from_map_wraps_without_copy() -> None:
    source: dict[str, Any] = {"a": 1}
    ctx = JSONContext.from_map(source)
    source["b"] = 2
    ctx.set(["c"], 3)
    assert ctx == {"a": 1, "b": 2, "c": 3}
    assert source == {"a": 1, "b": 2, "c": 3}
    assert ctx.to_map() is source
    assert JSONContext.from_map(None) == {}


def test_bad_argument_types_raise() -> None:
    with pytest.raises(ParamInvalidError, match="list"):
        JSONContext([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ParamInvalidError, match="str"):
        JSONContext.from_map("{}")  # type: ignore[arg-type]


def test_duplicate_keys_last_wins() -> None:
    assert JSONContext('{"a":1,"a":2}') == {"a": 2}


# -- §13 78: serialization ------------------------------------------------------------------------------


def test_to_bytes_is_canonical() -> None:
    ctx = JSONContext({"b": 1, "a": {"z": "é", "y": [1.5, None, True]}, "c": "<&>"})
    assert ctx.to_bytes() == '{"a":{"y":[1.5,null,true],"z":"é"},"b":1,"c":"<&>"}'.encode()
    reordered = JSONContext({"c": "<&>", "a": {"y": [1.5, None, True], "z": "é"}, "b": 1})
    assert reordered.to_bytes() == ctx.to_bytes()
    assert dumps_json(ctx.to_map()) == ctx.to_bytes().decode("utf-8")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(bad: float) -> None:
    ctx = JSONContext()
    ctx.set(["a", "b"], bad)
    with pytest.raises(ParamInvalidError, match="NaN or infinite") as info:
        ctx.to_bytes()
    assert isinstance(info.value.__cause__, ValueError)
    assert ctx.to_bytes_without_error() is None
    with pytest.raises(ParamInvalidError):
        dumps_json({"x": bad})


def test_non_json_values_are_refused() -> None:
    ctx = JSONContext.from_map({"s": {1, 2}})
    with pytest.raises(ParamInvalidError, match="set") as info:
        ctx.to_bytes()
    assert isinstance(info.value.__cause__, TypeError)
    assert ctx.to_bytes_without_error() is None


def test_circular_and_unsortable_are_refused() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    assert JSONContext.from_map(loop).to_bytes_without_error() is None
    with pytest.raises(ParamInvalidError):
        dumps_json({"a": {1: "x", "b": "y"}})


def test_to_bytes_without_error_returns_bytes_when_fine() -> None:
    assert JSONContext({"a": 1}).to_bytes_without_error() == b'{"a":1}'


def test_lone_surrogates_fall_back_to_ascii_escapes() -> None:
    ctx = JSONContext('{"s":"\\ud800","t":"é"}')
    data = ctx.to_bytes()
    assert data == b'{"s":"\\ud800","t":"\\u00e9"}'
    assert JSONContext(data) == ctx
    assert dumps_json(ctx.to_map()).encode("utf-8") == data


def test_loads_json_object() -> None:
    assert loads_json_object(None) == {}
    assert loads_json_object('{"a":[1,{"b":2}]}') == {"a": [1, {"b": 2}]}
    assert loads_json_object(b'{"a":"\xc3\xa9"}') == {"a": "é"}
    assert loads_json_object(memoryview(b'{"a":1}')) == {"a": 1}
    assert loads_json_object("[]") == {}


# -- §13 79: unmarshal ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Address:
    city: str
    zip: str | None = None


@dataclasses.dataclass
class Order:
    id: int
    price: float
    paid: bool
    tags: list[str]
    meta: dict[str, Any]
    address: Address
    note: str | None = None
    untyped: Any = None
    computed: int = dataclasses.field(default=0, init=False)


ORDER = {
    "id": 7,
    "price": 3,
    "paid": False,
    "tags": ["x"],
    "meta": {"k": [1]},
    "address": {"city": "Lyon", "unknown": 1},
    "untyped": {1, 2},
    "computed": 5,
    "ignored": "yes",
}


def test_unmarshal_dataclass_full() -> None:
    ctx = JSONContext.from_map(dict(ORDER))
    order = ctx.unmarshal(Order)
    assert order == Order(
        id=7, price=3.0, paid=False, tags=["x"], meta={"k": [1]}, address=Address(city="Lyon"), untyped={1, 2}
    )
    assert type(order.price) is float
    assert order.computed == 0
    order.meta["k"].append(2)  # the result does not share state with the context
    assert ctx.get("meta", "k") == ([1], True)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("id", "7", "Order.id: expected int"),
        ("id", True, "Order.id: expected int"),
        ("id", 7.5, "Order.id: expected int"),
        ("id", None, "Order.id: expected int"),
        ("price", "3", "Order.price: expected float"),
        ("price", False, "Order.price: expected float"),
        ("paid", 1, "Order.paid: expected bool"),
        ("tags", "x", "Order.tags: expected list"),
        ("meta", [], "Order.meta: expected dict"),
        ("note", 5, "Order.note: expected str"),
        ("address", {"city": 5}, "Order.address.city: expected str"),
        ("address", {}, "missing field 'city'"),
    ],
)
def test_unmarshal_dataclass_type_mismatch(field: str, value: Any, match: str) -> None:
    data = dict(ORDER, **{field: value})
    with pytest.raises(ParamInvalidError, match=match):
        JSONContext.from_map(data).unmarshal(Order)


def test_unmarshal_missing_required_field() -> None:
    with pytest.raises(ParamInvalidError, match="missing field 'age'"):
        JSONContext({"name": "x"}).unmarshal(Person)


def test_unmarshal_optional_none_is_accepted() -> None:
    assert JSONContext(dict(ORDER, note=None)).unmarshal(Order).note is None


def test_unmarshal_plain_class_filters_keywords() -> None:
    class Plain:
        def __init__(self, name: str, *, size: int = 1) -> None:
            self.name = name
            self.size = size

    class Open:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

    plain = JSONContext({"name": "n", "size": 2, "other": 3}).unmarshal(Plain)
    assert (plain.name, plain.size) == ("n", 2)
    assert JSONContext({"a": 1}).unmarshal(Open).kwargs == {"a": 1}
    with pytest.raises(ParamInvalidError, match="Plain") as info:
        JSONContext({"size": 2}).unmarshal(Plain)
    assert isinstance(info.value.__cause__, TypeError)


def test_unmarshal_pydantic_model() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Model(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str
        age: int
        nested: dict[str, int]

    model = JSONContext({"name": "m", "age": 3, "extra": 1, "nested": {"a": 1}}).unmarshal(Model)
    assert (model.name, model.age, model.nested) == ("m", 3, {"a": 1})
    with pytest.raises(ParamInvalidError, match="Model") as info:
        JSONContext({"name": "m", "age": "not a number"}).unmarshal(Model)
    assert isinstance(info.value.__cause__, pydantic.ValidationError)


def test_unmarshal_into_dict() -> None:
    ctx = JSONContext({"a": {"b": 1}})
    result = ctx.unmarshal(dict)
    assert result == {"a": {"b": 1}}
    result["a"]["b"] = 2
    assert ctx.get_int64("a", "b") == (1, True)


# -- dunder and helpers ---------------------------------------------------------------------------------


def test_equality_contains_keys_repr() -> None:
    ctx = JSONContext({"a": 1, "b": {"c": 2}})
    assert ctx == JSONContext({"b": {"c": 2}, "a": 1})
    assert ctx == {"a": 1, "b": {"c": 2}}
    assert ctx != {"a": 1}
    assert ctx != JSONContext()
    assert ctx != "a"
    assert "a" in ctx and "c" not in ctx
    assert sorted(ctx.keys()) == ["a", "b"]
    assert repr(ctx) == "JSONContext({'a': 1, 'b': {'c': 2}})"
    with pytest.raises(TypeError):
        hash(ctx)
    assert bool(JSONContext())  # an empty context is still truthy (no __len__)
