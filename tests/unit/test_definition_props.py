"""Property tests: random graphs build exactly when they are valid DAGs, checked against an independent
oracle (transitive closure, quadratic), and every built definition is wired as documented."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import event, given, settings
from hypothesis import strategies as st

from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.definition import WorkflowDefinition, build_definition
from asyncflow.errors import ConfigError
from asyncflow.worker import BaseTaskWorker, TaskWorker

WORKER = BaseTaskWorker()
NAMES = ["A", "B", "C", "D", "E", "F", "G"]
# mostly ordinary names, sometimes the reserved ids or an empty one
POOL = st.sampled_from(NAMES * 6 + ["root", "end", ""])
Graph = list[tuple[str, list[str]]]

# The documented order in which the rules are checked, and how each error message reads.
RULES = [
    ("workflow_id", "workflow id is empty"),
    ("no_nodes", "has no nodes"),
    ("empty_id", "have an empty id"),
    ("reserved", "are reserved"),
    ("duplicate_id", "duplicate node id"),
    ("unknown_next", "unknown next node"),
    ("duplicate_next", "duplicate next_nodes entries"),
    ("self_loop", "self-loop"),
    ("cycle", "cycle"),
]


def resolve(task_type: str) -> TaskWorker:
    return WORKER


def oracle(wid: str, graph: Graph) -> str | None:
    """The first rule the graph breaks, or None; written independently of asyncflow.definition."""
    ids = [node_id for node_id, _ in graph]
    if not wid:
        return "workflow_id"
    if not graph:
        return "no_nodes"
    if "" in ids:
        return "empty_id"
    if "root" in ids or "end" in ids:
        return "reserved"
    if len(set(ids)) != len(ids):
        return "duplicate_id"
    if any(target not in ids for _, nexts in graph for target in nexts):
        return "unknown_next"
    if any(len(set(nexts)) != len(nexts) for _, nexts in graph):
        return "duplicate_next"
    if any(node_id in nexts for node_id, nexts in graph):
        return "self_loop"
    edges = dict(graph)
    for start in ids:  # a node that reaches itself through one or more edges lies on a cycle
        seen: set[str] = set()
        stack = list(edges[start])
        while stack:
            current = stack.pop()
            if current == start:
                return "cycle"
            if current not in seen:
                seen.add(current)
                stack.extend(edges[current])
    return None


def rule_of(error: ConfigError) -> str:
    text = str(error)
    for rule, phrase in RULES:
        if phrase in text:
            return rule
    raise AssertionError(f"unclassified error: {text}")


def to_config(wid: str, graph: Graph) -> WorkflowConfig:
    return WorkflowConfig(wid, nodes=[NodeConfig(node_id, next_nodes=nexts) for node_id, nexts in graph])


def reachable(definition: WorkflowDefinition, start: str, attr: str) -> set[str]:
    seen = {start}
    stack = [start]
    while stack:
        for other in getattr(definition.node(stack.pop()), attr):
            if other not in seen:
                seen.add(other)
                stack.append(other)
    return seen


def check_wiring(graph: Graph, definition: WorkflowDefinition) -> None:
    ids = [node_id for node_id, _ in graph]
    named = {target for _, nexts in graph for target in nexts}
    assert [n.task_type for n in definition.nodes] == ["root", *ids, "end"]
    assert definition.root.next_nodes == [i for i in ids if i not in named]
    assert definition.root.pre_nodes == [] and definition.end.next_nodes == []
    assert definition.end.pre_nodes == [node_id for node_id, nexts in graph if not nexts]
    for node_id, nexts in graph:
        node = definition.node(node_id)
        assert node.next_nodes == (nexts or ["end"])
        assert node.pre_nodes == ([p for p, p_nexts in graph if node_id in p_nexts] or ["root"])
    # the claim in the docs: with no cycle, root reaches everything and everything reaches end
    everything = {n.task_type for n in definition.nodes}
    assert reachable(definition, "root", "next_nodes") == everything
    assert reachable(definition, "end", "pre_nodes") == everything
    assert definition.descendants("root") == [*ids, "end"]
    for node_id in ids:
        descendants = definition.descendants(node_id)
        assert node_id not in descendants and descendants[-1] == "end"


def check(wid: str, graph: Graph) -> None:
    expected = oracle(wid, graph)
    event(expected or "valid")  # shown by --hypothesis-show-statistics
    try:
        definition = build_definition(to_config(wid, graph), resolve)
    except ConfigError as error:
        assert expected is not None, f"rejected a valid DAG: {error}"
        assert rule_of(error) == expected, str(error)
        if expected == "cycle":
            members = list(error.nodes)
            edges = dict(graph)
            for a, b in zip(members, [*members[1:], members[0]], strict=True):
                assert b in edges[a], f"{a} -> {b} is not an edge of the reported cycle {members}"
        return
    assert expected is None, f"accepted a graph that breaks {expected!r}"
    check_wiring(graph, definition)


@st.composite
def arbitrary_graphs(draw: st.DrawFn) -> tuple[str, Graph]:
    wid = draw(st.sampled_from(["w"] * 15 + [""]))
    ids = draw(st.lists(POOL, max_size=7))
    targets = st.sampled_from([*ids] * 8 + ["X", "end"]) if ids else st.sampled_from(["X", "end"])
    graph = [(node_id, draw(st.lists(targets, max_size=3))) for node_id in ids]
    return wid, graph


@st.composite
def unique_graphs(draw: st.DrawFn) -> Graph:
    """Distinct ordinary ids, edges in any direction (self-loops and cycles included)."""
    ids = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=7, unique=True))
    graph = []
    for node_id in ids:
        others = [other for other in ids if other != node_id]
        nexts = draw(st.lists(st.sampled_from(others), max_size=3, unique=True)) if others else []
        if draw(st.integers(0, 19)) == 0:  # now and then a self-loop
            nexts.append(node_id)
        graph.append((node_id, nexts))
    return graph


@st.composite
def dags(draw: st.DrawFn) -> Graph:
    """Valid DAGs: edges only go forward in a hidden order, the config lists nodes in a shuffled order."""
    n = draw(st.integers(1, 12))
    order = [f"N{i}" for i in range(n)]
    forward = {
        node: draw(st.lists(st.sampled_from(order[i + 1 :]), max_size=4, unique=True)) if i + 1 < n else []
        for i, node in enumerate(order)
    }
    shuffled = draw(st.permutations(order))
    return [(node, forward[node]) for node in shuffled]


@settings(max_examples=300, deadline=None)
@given(arbitrary_graphs())
def test_arbitrary_graphs_match_the_oracle(case: tuple[str, Graph]) -> None:
    check(*case)


@settings(max_examples=300, deadline=None)
@given(unique_graphs())
def test_graphs_with_any_edges_match_the_oracle(graph: Graph) -> None:
    check("w", graph)


@settings(max_examples=200, deadline=None)
@given(dags())
def test_every_dag_builds_and_is_wired_as_documented(graph: Graph) -> None:
    assert oracle("w", graph) is None
    check_wiring(graph, build_definition(to_config("w", graph), resolve))


@settings(max_examples=200, deadline=None)
@given(dags(), st.data())
def test_a_back_edge_on_a_path_is_always_a_cycle(graph: Graph, data: st.DataObject) -> None:
    edges = {node: list(nexts) for node, nexts in graph}
    walk_from = [node for node, nexts in graph if nexts]
    if not walk_from:
        return
    # walk forward at least one edge, then point the last node back at the first
    start = data.draw(st.sampled_from(walk_from))
    path = [start]
    while edges[path[-1]] and (len(path) == 1 or data.draw(st.booleans())):
        path.append(data.draw(st.sampled_from(edges[path[-1]])))
    edges[path[-1]].append(start)
    cyclic: Sequence[tuple[str, list[str]]] = [(node, edges[node]) for node, _ in graph]
    check("w", list(cyclic))
    assert oracle("w", list(cyclic)) == "cycle"
