"""Issue 8, item 6 (part 1): bad input a user hands over without a database.

* Configs in the Go JSON shape, drawn by hypothesis with every field sometimes of a wrong type, out of
  range, missing or unknown, over small random graphs: ``Registry.load_workflow_config`` accepts one
  exactly when an oracle written here (independently of asyncflow) says it is valid, raises
  ``ConfigError`` otherwise, and a refused config never changes what the registry holds.
* JSON config text that is not JSON, or not an object: ``ConfigError``.
* ``JSONContext`` paths and values: ``set`` raises ``ParamInvalidError`` exactly for bad paths and leaves
  the context unchanged; serializing raises ``ParamInvalidError`` exactly for values that are not JSON.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncflow.config import INT64_MAX
from asyncflow.context import JSONContext
from asyncflow.errors import ConfigError, ParamInvalidError
from asyncflow.registry import Registry
from asyncflow.worker import BaseTaskWorker

NAMES = ["A", "B", "C", "D"]
NODE_KEYS = {"id", "name", "next_nodes", "fail_max_count", "max_wait_time_ts"}
MISSING = object()  # a key left out of the dict

# Values that are of a wrong type for some field, or out of range.
ODD = st.sampled_from([None, True, False, -1, 1.5, "1", [], {}, [1], 2**63, -(2**63), math.nan])


@st.composite
def valid_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config: 1-4 uniquely named nodes, edges only forward in a random order (a DAG)."""
    ids = draw(st.permutations(NAMES))[: draw(st.integers(1, len(NAMES)))]
    nodes = []
    for i, node_id in enumerate(ids):
        later = ids[i + 1 :]
        nxt = draw(st.lists(st.sampled_from(later), unique=True, max_size=len(later))) if later else []
        node: dict[str, Any] = {"id": node_id, "name": draw(st.text(max_size=3))}
        if nxt or draw(st.booleans()):
            node["next_nodes"] = nxt if nxt or draw(st.booleans()) else None
        for key in ("fail_max_count", "max_wait_time_ts"):
            if draw(st.booleans()):
                node[key] = draw(st.one_of(st.none(), st.integers(0, 10), st.just(INT64_MAX)))
        nodes.append(node)
    return {"id": "wf", "name": draw(st.text(max_size=3)), "nodes": nodes}


NODE_FIELDS = ["id", "name", "next_nodes", "fail_max_count", "max_wait_time_ts"]


@st.composite
def configs(draw: st.DrawFn) -> Any:
    """A valid config with 0-2 mutations, each of which may (or may not) make it invalid."""
    config = draw(valid_configs())
    for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
        config = _mutate(draw, config)
    return config


def _mutate(draw: st.DrawFn, config: Any) -> Any:
    if not isinstance(config, dict):
        return config
    nodes = config.get("nodes")
    kind = draw(st.integers(0, 11))
    if kind == 0:  # not an object at all
        return draw(st.sampled_from([None, [], "wf", 3]))
    if kind == 1:  # a workflow-level field
        key = draw(st.sampled_from(["id", "name", "nodes", "extra"]))
        value = draw(st.one_of(ODD, st.just(MISSING), st.just("")))
        if value is MISSING:
            config.pop(key, None)
        else:
            config[key] = value
        return config
    if not isinstance(nodes, list) or not nodes:
        return config
    index = draw(st.integers(0, len(nodes) - 1))
    node = nodes[index]
    if kind == 2:  # an entry that is not an object
        nodes[index] = draw(st.sampled_from([None, "A", 1, ["A"]]))
        return config
    if not isinstance(node, dict):
        return config
    if kind == 3:  # a node field of a wrong type or out of range, or left out
        key = draw(st.sampled_from(NODE_FIELDS))
        value = draw(st.one_of(ODD, st.just(MISSING)))
        if value is MISSING:
            node.pop(key, None)
        else:
            node[key] = value
    elif kind == 4:  # an unknown key (Go matches keys case-insensitively; asyncflow does not)
        node[draw(st.sampled_from(["Id", "next", "extra", "failMaxCount"]))] = 1
    elif kind == 5:  # a reserved, empty or duplicate id
        node["id"] = draw(st.sampled_from(["root", "end", "", *NAMES]))
    elif kind in (6, 7, 8, 9):  # an edge: unknown, to root/end, repeated, self-loop, or backwards
        target = draw(st.sampled_from(["Z", "root", "end", node.get("id"), *NAMES]))
        nxt = node.get("next_nodes")
        node["next_nodes"] = [*(nxt if isinstance(nxt, list) else []), target]
    elif kind == 10:  # a list of next nodes with a non-string in it
        node["next_nodes"] = [draw(st.sampled_from([1, None, ["A"]]))]
    else:  # a negative or too large count
        node[draw(st.sampled_from(["fail_max_count", "max_wait_time_ts"]))] = draw(
            st.sampled_from([-1, 2**63, -(2**63)])
        )
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count_ok(value: Any) -> bool:
    return value is None or (_is_int(value) and 0 <= value <= INT64_MAX)


def _storable(text: str) -> bool:
    """No NUL and no lone surrogate: text every database stores (docs/reliability.md)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def oracle(config: Any) -> bool:
    """Is this config valid? Written from SEMANTICS.md and docs/differences.md, not from the code."""
    if not isinstance(config, dict) or set(config) - {"id", "name", "nodes"}:
        return False
    wid, name, nodes = config.get("id", ""), config.get("name", ""), config.get("nodes", [])
    if not isinstance(wid, str) or not isinstance(name, str) or not isinstance(nodes, list):
        return False
    if not wid or not nodes or not _storable(wid) or not _storable(name):
        return False
    graph: dict[str, list[str]] = {}
    for node in nodes:
        if not isinstance(node, dict) or set(node) - NODE_KEYS:
            return False
        node_id, node_name = node.get("id", ""), node.get("name", "")
        nxt = node.get("next_nodes")
        if not isinstance(node_id, str) or not isinstance(node_name, str):
            return False
        if nxt is None:
            nxt = []
        if not isinstance(nxt, list) or not all(isinstance(n, str) for n in nxt):
            return False
        if not all(_storable(text) for text in (node_id, node_name, *nxt)):
            return False
        if not _count_ok(node.get("fail_max_count")) or not _count_ok(node.get("max_wait_time_ts")):
            return False
        if not node_id or node_id in ("root", "end") or node_id in graph:
            return False
        graph[node_id] = nxt
    for node_id, nxt in graph.items():
        if len(set(nxt)) != len(nxt) or node_id in nxt or any(n not in graph for n in nxt):
            return False
    # acyclic: repeatedly peel nodes without predecessors
    remaining = dict(graph)
    while remaining:
        targets = {n for nxt in remaining.values() for n in nxt}
        sources = [n for n in remaining if n not in targets]
        if not sources:
            return False
        for n in sources:
            del remaining[n]
    return True


def _registry_with_a_loaded_config() -> Registry:
    registry = Registry()
    registry.load_workflow_config({"id": "wf", "name": "old", "nodes": [{"id": "OLD"}]})
    return registry


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_a_config_is_accepted_exactly_when_valid(config: Any) -> None:
    registry = Registry()
    original = copy.deepcopy(config)
    valid = oracle(config)
    # JSON text and mappings are configs (ConfigError); anything else is a wrong argument
    expected = ConfigError if isinstance(config, dict | str) else ParamInvalidError
    try:
        registry.load_workflow_config(config)
    except (ConfigError, ParamInvalidError) as exc:
        assert type(exc) is not ConfigError or expected is ConfigError, exc
        assert isinstance(exc, expected), f"{type(exc).__name__} instead of {expected.__name__}: {exc}"
        assert not valid, f"a valid config was refused: {exc}"
        assert str(exc), "the error names what is wrong"
        assert registry.workflow_types() == []
    else:
        assert valid, f"an invalid config was accepted: {config!r}"
        for node in config["nodes"]:
            registry.register_workflow_task(config["id"], node["id"], WORKER)
        definition = registry.get_workflow_definition(config["id"])
        assert [n.task_type for n in definition.nodes][1:-1] == [node["id"] for node in config["nodes"]]
    assert _same(config, original), "loading never changes the caller's dict"


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=repr) == json.dumps(b, sort_keys=True, default=repr)


WORKER = BaseTaskWorker()


@settings(max_examples=100, deadline=None)
@given(configs())
def test_a_refused_config_leaves_the_loaded_one_in_place(config: Any) -> None:
    if oracle(config):
        return
    registry = _registry_with_a_loaded_config()
    with pytest.raises((ConfigError, ParamInvalidError)):
        registry.load_workflow_config(config)
    registry.register_workflow_task("wf", "OLD", WORKER)
    definition = registry.get_workflow_definition("wf")
    assert [n.task_type for n in definition.nodes] == ["root", "OLD", "end"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.binary(max_size=40), configs().map(json.dumps)))
def test_config_text_is_loaded_or_refused_with_config_error(text: str | bytes) -> None:
    registry = Registry()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = ValueError
    try:
        registry.load_workflow_config(text)
    except ConfigError:
        assert parsed is ValueError or not oracle(parsed)
    else:
        assert parsed is not ValueError and oracle(parsed)


# ---------------------------------------------------------------------------------- JSONContext

JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
JSON_VALUE = st.recursive(
    JSON_SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
NOT_JSON = st.sampled_from([math.nan, math.inf, object(), {1, 2}, b"bytes", 1j, Ellipsis, "\x00", "\ud800"])
PATH = st.one_of(
    st.lists(st.text(max_size=3), min_size=1, max_size=3),
    st.lists(st.one_of(st.text(max_size=3), st.sampled_from([1, None, b"k", ("a",)])), max_size=3),
    st.text(max_size=3),
)


def _path_ok(path: Any) -> bool:
    return isinstance(path, list) and len(path) > 0 and all(isinstance(k, str) for k in path)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=3), JSON_VALUE, max_size=3), PATH, st.one_of(JSON_VALUE, NOT_JSON))
def test_context_paths_and_values(base: dict[str, Any], path: Any, value: Any) -> None:
    ctx = JSONContext(base)
    before = ctx.to_bytes()
    try:
        ctx.set(path, value)
    except ParamInvalidError:
        assert not _path_ok(path)
        assert ctx.to_bytes() == before, "a refused set() changes nothing"
        return
    assert _path_ok(path)
    assert ctx.get(*path) == (value, True)
    json_ok = _is_json(value)
    try:
        data = ctx.to_bytes()
    except ParamInvalidError:
        assert not json_ok
    else:
        assert json_ok
        assert JSONContext(data) == ctx


def _is_json(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if value is None or isinstance(value, bool | int | str):  # NUL and lone surrogates are JSON text too
        return True
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


@pytest.mark.parametrize("text", [b"", b"null", b"[1]", b'"x"', b"{", b"\xff\xfe", '{"a": NaN}', b"1e999"])
def test_context_text_that_is_not_an_object_is_empty(text: str | bytes) -> None:
    ctx = JSONContext(text)
    assert ctx.to_map() == {}
