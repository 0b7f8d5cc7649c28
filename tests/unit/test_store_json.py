"""The store's context encoding: orjson's fast path gives what the standard library gives, refuses what
it refuses, and falls back to it for everything orjson would write differently."""

from __future__ import annotations

import collections
import datetime
import enum
import json
import math
import re
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncflow.errors import ParamInvalidError
from asyncflow.store import _json

pytestmark = pytest.mark.skipif(_json.orjson is None, reason="orjson (a dependency) is not installed")


class Colour(enum.Enum):
    RED = 1
    BLUE = "blue"
    PAIR = (1, 2)
    ODD = object()


class Level(enum.IntEnum):
    LOW = 1


Pair = collections.namedtuple("Pair", "a b")


class Text(str):
    pass


def _cyclic() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"n": value}
    return value


CASES: list[Any] = [
    {"a": 1, "b": [1, 2.5, "x"], "c": {"z": 1, "a": {"y": 2, "b": 3}}},
    {"a": None},
    {"x": math.nan},
    {"x": [1, math.inf]},
    {"x": -math.inf},
    {"x": object()},
    {"x": {1, 2}},
    {"x": b"bytes"},
    {"x": 1j},
    {"x": datetime.datetime(2020, 1, 1)},
    {"x": datetime.date(2020, 1, 1)},
    {"s": "NUL \x00 inside"},
    {"NUL \x00 key": 1},
    {"s": "\\u0000 is text here"},
    {"s": "lone surrogate \ud800"},
    {1: "a", "b": 2},
    {1: "a", 2: {3: "b"}},
    {True: 1},
    {None: 1},
    {1.5: 1},
    {"big": 2**63, "small": -(2**63) - 1, "huge": 10**400},
    {"id": "1234567890123456789012", "n": 12345678901234567},
    {"x": Colour.RED, "y": Colour.BLUE, "z": Colour.PAIR},
    {"x": Colour.ODD},
    {"x": Level.LOW},
    {"x": uuid.UUID(int=5)},
    {"x": Pair(1, 2)},
    {"x": collections.OrderedDict(b=1, a=2)},
    {"x": Text("sub")},
    {Text("key"): 1},
    {"é": "ü", "line": "\u2028", "astral": "\U0001f600", "ctl": "\n\t\x1f"},
    {"f": 1e16, "g": 1e-7, "h": -0.0, "i": 0.1, "j": 1.7976931348623157e308},
    {"x": (1, 2)},
    _cyclic(),
    _deep(300),
]


def _both(value: Any) -> Iterator[tuple[str, Any]]:
    """(``ok``, decoded) or (``refused``, None), with orjson and then without it."""
    saved = _json.orjson
    for fast in (saved, None):
        _json.orjson = fast
        try:
            text = _json.dumps_context(value, "ctx")
        except ParamInvalidError:
            yield "refused", None
        else:
            assert json.loads(text) == _json.copy_context(text)
            yield "ok", _json.copy_context(text)
        finally:
            _json.orjson = saved


def _same(a: Any, b: Any) -> bool:
    """Equality that also requires equal types (so 1 != 1.0 and True != 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def _case_id(value: Any) -> str:
    """The case's repr without object addresses: the same id in every process (pytest-xdist's workers
    must collect the same tests)."""
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))[:40]


@pytest.mark.parametrize("value", CASES, ids=_case_id)
def test_orjson_and_json_accept_refuse_and_read_back_alike(value: Any) -> None:
    fast, slow = _both(value)
    assert fast[0] == slow[0]
    assert _same(fast[1], slow[1])


def test_the_types_beyond_json_are_stored_as_their_json_form() -> None:
    text = _json.dumps_context({"c": Colour.BLUE, "l": Level.LOW, "u": uuid.UUID(int=5)}, "ctx")
    assert json.loads(text) == {"c": "blue", "l": 1, "u": "00000000-0000-0000-0000-000000000005"}
    for refused in ({"x": Colour.ODD}, {"x": datetime.datetime(2020, 1, 1)}, {"x": math.nan}):
        with pytest.raises(ParamInvalidError):
            _json.dumps_context(refused, "ctx")


def test_big_integers_read_back_exactly_not_as_floats() -> None:
    value = {"big": 2**64 + 1, "list": [-(2**70)], "nested": {"k": 10**30}}
    text = _json.dumps_context(value, "ctx")
    assert _same(_json.copy_context(text), value)
    # text from elsewhere (a row written by another version): 19 digits take json's reader too
    assert _same(_json.copy_context('{"n":18446744073709551617}'), {"n": 18446744073709551617})


class _Spy:
    """orjson, counting its ``dumps`` and ``loads`` calls."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def dumps(self, *args: Any, **kwargs: Any) -> bytes:
        self.calls.append("dumps")
        result: bytes = self.real.dumps(*args, **kwargs)
        return result

    def loads(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("loads")
        return self.real.loads(*args, **kwargs)


def test_the_fast_path_is_taken_for_plain_contexts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of it: a plain context is encoded and read back by orjson alone."""
    spy = _Spy(_json.orjson)
    monkeypatch.setattr(_json, "orjson", spy)
    plain = {"b": [1, 2.5, "x"], "a": {"z": True, "y": "é"}}
    text = _json.dumps_context(plain, "ctx")
    assert text == json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert _json.copy_context(text) == plain
    assert spy.calls == ["dumps", "loads"]
    spy.calls.clear()
    _json.copy_context('{"n":12345678901234567890}')  # 20 digits: json reads it
    assert spy.calls == []
    text, plain = _json.encode_context({"id": "12345678901234567890", "n": 2**63}, "ctx")
    assert plain and _json.copy_context(text, plain) == {"id": "12345678901234567890", "n": 2**63}
    assert spy.calls == ["dumps", "loads"]  # orjson wrote it: no big integer in it, orjson reads it
    text, plain = _json.encode_context({"n": 2**64}, "ctx")
    assert not plain and _json.copy_context(text, plain) == {"n": 2**64}  # json wrote and reads it


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([Colour.RED, Colour.BLUE, Level.LOW, uuid.UUID(int=7)])
)
keys = st.text(max_size=8) | st.integers() | st.booleans()
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=6))
def test_any_context_is_encoded_and_read_back_alike_with_and_without_orjson(value: dict[Any, Any]) -> None:
    fast, slow = _both(value)
    assert fast[0] == slow[0]
    assert _same(fast[1], slow[1])


def test_a_context_deeper_than_orjson_reads_is_read_back_by_json() -> None:
    """json writes (and reads) what nests deeper than orjson's limit, when the recursion limit allows."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        deep: dict[str, Any] = {}
        for _ in range(1100):
            deep = {"a": deep}
        text, plain = _json.encode_context(deep, "ctx")
        assert not plain
        assert _json.copy_context(text, plain) == deep
        assert _json.copy_context(text, True) == deep  # even if told orjson wrote it
    finally:
        sys.setrecursionlimit(old)


STORED_TEXTS = [
    '{"a": 1, "b": [1.5, -0.0, 1e16, 2.5e-300], "c": {"d": null, "e": true}}',
    '{"n": 9223372036854775807, "m": -9223372036854775808}',
    '{"n": 12345678901234567890123}',  # beyond 64 bits: json keeps it exact
    '{"f": 0.1000000000000000055511151231257827}',
    '{"x": NaN, "y": Infinity, "z": -Infinity}',  # json reads these; orjson refuses them
    '{"s": "\\ud800 lone surrogate", "t": "\\u00e9\\u0000"}',
    '{"k": 1, "k": 2}',  # a duplicate key: the last wins
    '  {"spaced" : [ 1 , 2 ] }  ',
]


@pytest.mark.parametrize("text", STORED_TEXTS)
def test_stored_text_reads_as_json_reads_it(text: str) -> None:
    """What another writer stored (SQLite hands back text) reads as ``json.loads`` reads it."""
    read = _json.loads_context(text, "workflow_context", 1)
    assert _same(read, json.loads(text))
    assert read is not _json.loads_context(text, "workflow_context", 1)  # a fresh dict per read


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "a JSON list"),
        ('"a string"', "a JSON str"),
        ("3", "a JSON int"),
    ],
)
def test_stored_text_that_is_not_an_object_reads_as_an_empty_context(
    text: str, warning: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert _json.loads_context(text, "node_context", 7) == {}
    assert warning in caplog.text and "node_context of row 7" in caplog.text


def test_stored_text_deeper_than_orjson_reads_is_read_by_json() -> None:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        text = '{"a": ' * 1100 + "{}" + "}" * 1100
        assert _json.loads_context(text, "node_context", 1) == json.loads(text)
    finally:
        sys.setrecursionlimit(old)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6), st.booleans())
def test_any_stored_object_reads_as_json_reads_it(value: dict[str, Any], compact: bool) -> None:
    text = json.dumps(value, separators=(",", ":") if compact else None)  # NaN and infinities included
    assert _same(_json.loads_context(text, "workflow_context", 1), json.loads(text))
