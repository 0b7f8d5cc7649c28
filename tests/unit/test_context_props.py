"""Property tests for JSONContext: serialization round trips, set/get, clone independence."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from asyncflow.context import JSONContext, dumps_json, loads_json_object, merge_json_contexts

keys = st.text(max_size=8)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(keys, json_values, max_size=6)
paths = st.lists(keys, min_size=1, max_size=4)

SETTINGS = settings(max_examples=100, deadline=None)


def _same(a: Any, b: Any) -> bool:
    """Equality that also requires equal types (so 1 != 1.0 and True != 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@SETTINGS
@given(json_objects)
def test_bytes_round_trip_is_exact(obj: dict[str, Any]) -> None:
    ctx = JSONContext(obj)
    data = ctx.to_bytes()
    again = JSONContext(data)
    assert _same(again.to_map(), obj)
    assert again.to_bytes() == data  # canonical: a second pass gives the same bytes
    assert json.loads(data) == obj  # standard JSON that any decoder reads back


@SETTINGS
@given(json_objects)
def test_dumps_and_loads_agree_with_to_bytes(obj: dict[str, Any]) -> None:
    text = dumps_json(obj)
    assert text.encode("utf-8") == JSONContext(obj).to_bytes()
    assert _same(loads_json_object(text), obj)
    assert _same(loads_json_object(text.encode("utf-8")), obj)


@SETTINGS
@given(json_objects, json_objects)
def test_key_order_does_not_change_bytes(a: dict[str, Any], b: dict[str, Any]) -> None:
    merged = {**a, **b}
    reversed_order = dict(reversed(list(merged.items())))
    assert JSONContext(merged).to_bytes() == JSONContext(reversed_order).to_bytes()


@SETTINGS
@given(json_objects, paths, json_values)
def test_set_then_get_returns_the_value(obj: dict[str, Any], path: list[str], value: Any) -> None:
    ctx = JSONContext(obj)
    ctx.set(path, value)
    got, found = ctx.get(*path)
    assert found
    assert got is value
    ctx.delete(*path)
    assert ctx.get(*path) == (None, False)


@SETTINGS
@given(json_objects, paths, json_values)
def test_clone_is_independent(obj: dict[str, Any], path: list[str], value: Any) -> None:
    ctx = JSONContext(obj)
    before = ctx.to_bytes()
    clone = ctx.clone()
    assert _same(clone.to_map(), ctx.to_map())
    clone.set(path, value)
    clone.set([*path, "extra"], [1])
    for nested in _containers(clone.to_map()):
        if isinstance(nested, dict):
            nested["mutated"] = True
        else:
            nested.append("mutated")
    assert ctx.to_bytes() == before


def _containers(value: Any) -> list[Any]:
    found: list[Any] = []
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            found.append(current)
            stack.extend(current.values())
        elif isinstance(current, list):
            found.append(current)
            stack.extend(current)
    return found


@SETTINGS
@given(st.lists(st.none() | json_objects.map(JSONContext), max_size=4))
def test_merge_later_wins(ctxs: list[JSONContext | None]) -> None:
    expected: dict[str, Any] = {}
    for ctx in ctxs:
        if ctx is not None:
            expected.update(ctx.to_map())
    merged = merge_json_contexts(*ctxs)
    assert merged == expected
    for key, value in merged.to_map().items():
        assert value is expected[key]  # shallow: the values themselves are shared


@SETTINGS
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_int64_range_is_exact(n: int) -> None:
    ctx = JSONContext(dumps_json({"n": n}))
    assert ctx.get_int64("n") == (n, True)


@SETTINGS
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-(2.0**62), max_value=2.0**62))
def test_get_int64_truncates_toward_zero(x: float) -> None:
    value, found = JSONContext({"x": x}).get_int64("x")
    assert found
    assert value == int(x)
    assert abs(value) <= abs(x)


@SETTINGS
@given(st.text(max_size=30) | st.binary(max_size=30))
def test_arbitrary_text_never_raises(raw: str | bytes) -> None:
    ctx = JSONContext(raw)
    ctx.set(["k"], 1)
    assert ctx.get_int64("k") == (1, True)
