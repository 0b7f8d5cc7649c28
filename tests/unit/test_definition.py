"""Configs (the Go JSON shape) and definitions: wiring of root/end, every validation rule, rendering."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from asyncflow.config import INT64_MAX, JOINS, NodeConfig, WorkflowConfig
from asyncflow.definition import (
    MissingWorkerError,
    NodeDefinition,
    WorkflowDefinition,
    build_definition,
    validate_config,
)
from asyncflow.engine.rules import Join, join_decision
from asyncflow.errors import ConfigError, TaskWorkerNotFoundError
from asyncflow.status import END_NODE_NAME, ROOT_NODE_NAME
from asyncflow.worker import BaseTaskWorker, EndNodeWorker, NormalTaskWorker, RootNodeWorker, TaskWorker

WORKER = BaseTaskWorker()


def any_worker(task_type: str) -> TaskWorker:
    return WORKER


def cfg(*nodes: tuple[str, Sequence[str]], wid: str = "w") -> WorkflowConfig:
    return WorkflowConfig(wid, "W", [NodeConfig(node_id, next_nodes=nexts) for node_id, nexts in nodes])


def build(config: WorkflowConfig) -> WorkflowDefinition:
    return build_definition(config, any_worker)


def wiring(definition: WorkflowDefinition) -> dict[str, tuple[list[str], list[str]]]:
    return {n.task_type: (n.pre_nodes, n.next_nodes) for n in definition.nodes}


# -- configs --------------------------------------------------------------------------------------

GO_JSON = {
    "id": "order",
    "name": "Order",
    "nodes": [
        {"id": "pay", "name": "Pay", "next_nodes": ["ship"], "fail_max_count": 3, "max_wait_time_ts": None},
        {"id": "ship", "name": "Ship", "next_nodes": None},
    ],
}


def test_from_dict_reads_the_go_shape() -> None:
    config = WorkflowConfig.from_dict(GO_JSON)
    assert config == WorkflowConfig(
        "order", "Order", (NodeConfig("pay", "Pay", ("ship",), 3, None), NodeConfig("ship", "Ship"))
    )
    assert isinstance(config.nodes, tuple)
    assert config.nodes[1].next_nodes == ()


def test_to_dict_round_trips_and_from_json_accepts_str_and_bytes() -> None:
    config = WorkflowConfig.from_dict(GO_JSON)
    data = config.to_dict()
    assert data["nodes"][1] == {
        "id": "ship",
        "name": "Ship",
        "next_nodes": [],
        "fail_max_count": None,
        "max_wait_time_ts": None,
    }
    assert WorkflowConfig.from_dict(data) == config
    text = json.dumps(data)
    assert WorkflowConfig.from_json(text) == config
    assert WorkflowConfig.from_json(text.encode()) == config


def test_missing_keys_take_go_zero_values() -> None:
    config = WorkflowConfig.from_dict({"id": "w", "nodes": [{"id": "A"}]})
    assert config.name == "" and config.nodes == (NodeConfig("A"),)
    assert config.nodes[0].fail_max_count is None and config.nodes[0].max_wait_time_ts is None


def test_configs_store_tuples_and_are_hashable() -> None:
    node = NodeConfig("A", next_nodes=["B", "C"])
    assert node.next_nodes == ("B", "C")
    config = WorkflowConfig("w", nodes=[node])
    assert isinstance(config.nodes, tuple)
    assert hash(config) == hash(WorkflowConfig("w", nodes=(NodeConfig("A", next_nodes=("B", "C")),)))


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"id": "w", "nodes": [], "Nodes": []}, r"workflow 'w': unknown key\(s\) 'Nodes'"),
        ({"id": "w", "nodes": [{"id": "A", "next": []}]}, r"workflow 'w': node 'A': unknown key\(s\) 'next'"),
        ({"id": "w", "nodes": [None]}, r"workflow 'w': node #0: is null"),
        ({"id": "w", "nodes": [{"id": "A"}, 3]}, r"workflow 'w': node #1: must be an object"),
        ({"id": "w", "nodes": {"id": "A"}}, r"workflow 'w': nodes must be a list"),
        ({"id": 5, "nodes": []}, r"workflow id must be a string"),
        ({"id": "w", "name": None}, r"workflow 'w': name must be a string"),
        ({"id": "w", "nodes": [{"id": 1}]}, r"workflow 'w': node #0: id must be a string"),
        ({"id": "w", "nodes": [{"id": "A", "name": 2}]}, r"node 'A': name must be a string"),
        ({"id": "w", "nodes": [{"id": "A", "next_nodes": "B"}]}, r"node 'A': next_nodes must be a list"),
        ({"id": "w", "nodes": [{"id": "A", "next_nodes": {}}]}, r"node 'A': next_nodes must be a list"),
        ({"id": "w", "nodes": [{"id": "A", "next_nodes": {"B": 1}}]}, r"node 'A': next_nodes must be a list"),
        (
            {"id": "w", "nodes": [{"id": "A", "next_nodes": ["B", 1]}]},
            r"node 'A': next_nodes must hold strings",
        ),
        (
            {"id": "w", "nodes": [{"id": "A", "fail_max_count": True}]},
            r"node 'A': fail_max_count must be an int",
        ),
        (
            {"id": "w", "nodes": [{"id": "A", "fail_max_count": 2.0}]},
            r"node 'A': fail_max_count must be an int",
        ),
        (
            {"id": "w", "nodes": [{"id": "A", "max_wait_time_ts": "10"}]},
            r"node 'A': max_wait_time_ts must be",
        ),
        (
            {"id": "w", "nodes": [{"id": "A", "fail_max_count": -1}]},
            r"node 'A': fail_max_count must not be neg",
        ),
        (
            {"id": "w", "nodes": [{"id": "A", "max_wait_time_ts": -5}]},
            r"node 'A': max_wait_time_ts must not be",
        ),
        ({"id": "w", "nodes": [{"id": "A", "max_wait_time_ts": INT64_MAX + 1}]}, r"larger than int64"),
    ],
)
def test_from_dict_rejects_bad_shapes_naming_workflow_and_node(data: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        WorkflowConfig.from_dict(data)


def test_from_dict_error_carries_workflow_and_node() -> None:
    with pytest.raises(ConfigError) as info:
        WorkflowConfig.from_dict({"id": "w", "nodes": [{"id": "A", "fail_max_count": False}]})
    assert info.value.workflow_type == "w" and info.value.nodes == ("A",)


@pytest.mark.parametrize("text", ["{", "[1, 2]", "null", '"s"', b"\xff\xfe{"])
def test_from_json_rejects_invalid_json_and_non_objects(text: str | bytes) -> None:
    with pytest.raises(ConfigError, match=r"not valid JSON|must be an object"):
        WorkflowConfig.from_json(text)


def test_direct_construction_checks_types() -> None:
    with pytest.raises(ConfigError, match=r"node #1: is null"):
        WorkflowConfig("w", nodes=[NodeConfig("A"), None])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"node #0: must be a NodeConfig"):
        WorkflowConfig("w", nodes=[{"id": "A"}])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="next_nodes must be a list of strings"):
        NodeConfig("A", next_nodes="BC")
    with pytest.raises(ConfigError, match="fail_max_count must be an integer"):
        NodeConfig("A", fail_max_count=True)


# -- wiring ---------------------------------------------------------------------------------------


def test_go_example_wiring_matches_reference_2_7() -> None:
    definition = build(cfg(("A", ["B"]), ("A1", ["B", "B1"]), ("B", ["C"]), ("B1", []), ("C", [])))
    assert [n.task_type for n in definition.nodes] == ["root", "A", "A1", "B", "B1", "C", "end"]
    assert definition.nodes_count == 7
    assert wiring(definition) == {
        "root": ([], ["A", "A1"]),
        "A": (["root"], ["B"]),
        "A1": (["root"], ["B", "B1"]),
        "B": (["A", "A1"], ["C"]),
        "B1": (["A1"], ["end"]),
        "C": (["B"], ["end"]),
        "end": (["B1", "C"], []),
    }


def test_linear_chain_13_1() -> None:
    definition = build(cfg(("A", ["B"]), ("B", ["C"]), ("C", [])))
    assert definition.root.next_nodes == ["A"]
    assert definition.node("C").next_nodes == ["end"]
    assert definition.end.pre_nodes == ["C"]
    assert definition.nodes_count == 5
    assert [n.task_type for n in definition.nodes] == ["root", "A", "B", "C", "end"]
    assert definition.root.task_name == ROOT_NODE_NAME == "开始节点"
    assert definition.end.task_name == END_NODE_NAME == "结束节点"
    assert isinstance(definition.root.worker, RootNodeWorker)
    assert isinstance(definition.end.worker, EndNodeWorker)
    assert definition.id == "w" and definition.name == "W"


def test_sources_and_sinks_follow_config_order_13_2() -> None:
    forward = build(cfg(("A", ["B"]), ("A1", ["B", "B1"]), ("B", ["C"]), ("B1", []), ("C", [])))
    reordered = build(cfg(("C", []), ("B1", []), ("B", ["C"]), ("A1", ["B1", "B"]), ("A", ["B"])))
    assert forward.root.next_nodes == ["A", "A1"] and forward.end.pre_nodes == ["B1", "C"]
    assert reordered.root.next_nodes == ["A1", "A"] and reordered.end.pre_nodes == ["C", "B1"]
    assert reordered.node("B").pre_nodes == ["A1", "A"]
    assert reordered.node("A1").next_nodes == ["B1", "B"]


def test_counts_default_to_zero_13_13() -> None:
    config = WorkflowConfig.from_dict(
        {
            "id": "w",
            "nodes": [
                {"id": "A", "next_nodes": ["B"]},
                {"id": "B", "fail_max_count": None, "max_wait_time_ts": None, "next_nodes": ["C"]},
                {"id": "C", "fail_max_count": 3, "max_wait_time_ts": 10},
            ],
        }
    )
    definition = build(config)
    # an unset fail_max_count stays None (the service's default_fail_max_count applies to it)
    assert [(n.fail_max_count, n.max_wait_time_ts) for n in definition.nodes] == [
        (0, 0),
        (None, 0),
        (None, 0),
        (3, 10),
        (0, 0),
    ]


def test_node_definition_rejects_negative_counts_and_keeps_unset_fail_max_count() -> None:
    with pytest.raises(ConfigError, match="node 'X': fail_max_count must not be negative"):
        NodeDefinition(task_type="X", fail_max_count=-1, worker=WORKER)
    with pytest.raises(ConfigError, match="node 'X': max_wait_time_ts must not be negative"):
        NodeDefinition(task_type="X", max_wait_time_ts=-1, worker=WORKER)
    node = NodeDefinition(task_type="X", fail_max_count=None, max_wait_time_ts=None, worker=WORKER)  # type: ignore[arg-type]
    assert node.fail_max_count is None and node.max_wait_time_ts == 0


def test_workers_come_from_the_resolver_in_config_order() -> None:
    calls: list[str] = []
    workers = {"A": NormalTaskWorker(), "B": NormalTaskWorker(wait_check=WORKER.wait_check)}

    def resolve(task_type: str) -> TaskWorker:
        calls.append(task_type)
        return workers[task_type]

    definition = build_definition(cfg(("B", []), ("A", ["B"])), resolve)
    assert calls == ["B", "A"]
    assert definition.node("A").worker is workers["A"] and definition.node("B").worker is workers["B"]
    assert not definition.node("A").has_wait_check and definition.node("B").has_wait_check
    assert not definition.root.has_wait_check and not definition.end.has_wait_check


def test_node_lookup() -> None:
    definition = build(cfg(("A", [])))
    assert definition.node("A") is definition.get_node("A")
    assert definition.get_node("missing") is None
    assert "A" in definition and "missing" not in definition
    with pytest.raises(KeyError, match="workflow 'w' has no node 'missing'"):
        definition.node("missing")


def test_descendants_in_definition_order() -> None:
    definition = build(cfg(("A", ["B"]), ("A1", ["B", "B1"]), ("B", ["C"]), ("B1", []), ("C", [])))
    assert definition.descendants("A") == ["B", "C", "end"]
    assert definition.descendants("A1") == ["B", "B1", "C", "end"]
    assert definition.descendants("C") == ["end"]
    assert definition.descendants("end") == []
    assert definition.descendants("root") == ["A", "A1", "B", "B1", "C", "end"]
    with pytest.raises(KeyError):
        definition.descendants("nope")


def test_definition_constructor_guards() -> None:
    root = NodeDefinition(task_type="root", worker=RootNodeWorker())
    end = NodeDefinition(task_type="end", worker=EndNodeWorker())
    a = NodeDefinition(task_type="A", worker=WORKER)
    with pytest.raises(ConfigError, match="must start with 'root' and end with 'end'"):
        WorkflowDefinition("w", "", [a, end])
    with pytest.raises(ConfigError, match="task types must be unique"):
        WorkflowDefinition("w", "", [root, a, a, end])
    assert WorkflowDefinition("w", "", [root, a, end]).nodes_count == 3


def test_starts_are_the_sources_whose_join_of_no_edges_runs() -> None:
    """Where a new instance's first pass begins: ``root`` (join ``all``); a hand-made source whose join
    of no edges does not run (``any``, ``first``: skipped) is not among them."""
    assert build(cfg(("A", ["B"]), ("B", []))).starts == ("root",)
    end = NodeDefinition(task_type="end", pre_nodes=["A"], worker=EndNodeWorker())
    for join, starts in (("all", ("root", "A")), ("any", ("root",)), ("first", ("root",))):
        root = NodeDefinition(task_type="root", next_nodes=["end"], worker=RootNodeWorker())
        a = NodeDefinition(task_type="A", next_nodes=["end"], join=join, worker=WORKER)
        assert WorkflowDefinition("w", "", [root, a, end]).starts == starts
    lonely = NodeDefinition(task_type="root", join="any", worker=RootNodeWorker())
    assert WorkflowDefinition("w", "", [lonely, end]).starts == ()
    for join in JOINS:  # the engine's rule
        runs = join_decision(join, []) is Join.RUN
        root = NodeDefinition(task_type="root", next_nodes=["end"], join=join, worker=RootNodeWorker())
        assert WorkflowDefinition("w", "", [root, end]).starts == (("root",) if runs else ())


def test_a_ladder_with_exponentially_many_paths_builds() -> None:
    # 1,000 rungs of 2 nodes, each feeding both nodes of the next rung: 2**1000 root-to-end paths.
    nodes = []
    for rung in range(1000):
        nexts = [] if rung == 999 else [f"L{rung + 1}", f"R{rung + 1}"]
        nodes += [(f"L{rung}", nexts), (f"R{rung}", nexts)]
    definition = build(cfg(*nodes))
    assert definition.nodes_count == 2002
    assert definition.root.next_nodes == ["L0", "R0"] and definition.end.pre_nodes == ["L999", "R999"]


# -- validation: one test per rule -----------------------------------------------------------------


def reject(config: WorkflowConfig, pattern: str) -> ConfigError:
    with pytest.raises(ConfigError, match=pattern) as info:
        validate_config(config)
    with pytest.raises(ConfigError, match=pattern):
        build(config)
    return info.value


def test_rejects_empty_workflow_id() -> None:
    error = reject(cfg(("A", []), wid=""), r"workflow id is empty \(workflow name 'W'\)")
    assert error.workflow_type == ""


def test_rejects_zero_nodes() -> None:
    error = reject(WorkflowConfig("w"), r"^workflow 'w': has no nodes$")
    assert error.workflow_type == "w"


def test_rejects_empty_node_ids() -> None:
    reject(cfg(("A", []), ("", []), ("", [])), r"workflow 'w': node\(s\) #1, #2 have an empty id")


def test_rejects_reserved_root() -> None:
    error = reject(cfg(("root", ["A"]), ("A", [])), r"workflow 'w': node id\(s\) 'root' are reserved")
    assert error.nodes == ("root",)


def test_rejects_reserved_end() -> None:
    error = reject(cfg(("A", []), ("end", [])), r"workflow 'w': node id\(s\) 'end' are reserved")
    assert error.nodes == ("end",)


def test_rejects_duplicate_node_ids() -> None:
    error = reject(cfg(("A", []), ("B", []), ("A", []), ("B", [])), r"duplicate node id\(s\) 'A', 'B'")
    assert error.nodes == ("A", "B") and error.workflow_type == "w"


def test_rejects_unknown_next_node() -> None:
    error = reject(cfg(("A", ["X"]), ("B", ["A", "Y"])), r"unknown next node\(s\): 'A' -> 'X', 'B' -> 'Y'$")
    assert error.nodes == ("A", "B")
    assert not isinstance(error, TaskWorkerNotFoundError)


def test_unknown_next_node_end_gets_a_hint() -> None:
    reject(cfg(("A", ["end"])), r"'A' -> 'end' \('root' and 'end' are implicit")


def test_rejects_duplicate_next_nodes() -> None:
    error = reject(cfg(("A", ["B", "B"]), ("B", [])), r"duplicate next_nodes entries: 'A' -> 'B'")
    assert error.nodes == ("A",)


def test_rejects_self_loop() -> None:
    error = reject(cfg(("A", ["B"]), ("B", ["B"])), r"self-loop: node\(s\) 'B' name themselves")
    assert error.nodes == ("B",)


def test_rejects_cycle_reachable_from_root_13_5() -> None:
    error = reject(cfg(("S", ["A"]), ("A", ["B"]), ("B", ["A", "C"]), ("C", [])), r"cycle 'A' -> 'B' -> 'A'")
    assert error.nodes == ("A", "B")
    assert "3 node(s) lie on or after a cycle" in str(error)


def test_rejects_cycle_unreachable_from_root_13_6() -> None:
    error = reject(cfg(("S", []), ("A", ["B"]), ("B", ["A"])), r"workflow 'w': cycle 'A' -> 'B' -> 'A'")
    assert error.nodes == ("A", "B")


def test_rejects_a_long_cycle_naming_its_members_in_edge_order() -> None:
    error = reject(
        cfg(("A", ["B"]), ("B", ["C"]), ("C", ["D"]), ("D", ["B"])), r"cycle 'B' -> 'C' -> 'D' -> 'B'"
    )
    assert error.nodes == ("B", "C", "D")


def test_missing_workers_are_all_named_at_build_time() -> None:
    config = cfg(("A", ["B"]), ("B", ["C"]), ("C", []))
    validate_config(config)  # workers are not part of validation
    with pytest.raises(MissingWorkerError) as info:
        build_definition(config, lambda t: WORKER if t == "B" else None)
    error = info.value
    assert isinstance(error, ConfigError) and isinstance(error, TaskWorkerNotFoundError)
    assert error.nodes == ("A", "C") and error.workflow_type == "w"
    assert str(error) == "workflow 'w': no worker registered for node(s) 'A', 'C'"


def test_validation_reports_graph_errors_before_missing_workers() -> None:
    with pytest.raises(ConfigError, match="cycle") as info:
        build_definition(cfg(("A", ["B"]), ("B", ["A"])), lambda t: None)
    assert not isinstance(info.value, MissingWorkerError)


# -- rendering --------------------------------------------------------------------------------------


def test_to_mermaid() -> None:
    config = WorkflowConfig(
        "w", nodes=[NodeConfig("A", "Pay", ["B"]), NodeConfig("B", 'Say "hi" #1 <b>'), NodeConfig("C")]
    )
    assert build(config).to_mermaid() == (
        "flowchart TD\n"
        '    n0(["root · 开始节点"])\n'
        '    n1["Pay"]\n'
        '    n2["Say #quot;hi#quot; #35;1 #lt;b#gt;"]\n'
        '    n3["C"]\n'
        '    n4(["end · 结束节点"])\n'
        "    n0 --> n1\n"
        "    n0 --> n3\n"
        "    n1 --> n2\n"
        "    n2 --> n4\n"
        "    n3 --> n4\n"
    )


def test_to_dot() -> None:
    config = WorkflowConfig('w"1', nodes=[NodeConfig("A", 'a "quoted"\\name', ["B"]), NodeConfig("B")])
    assert build(config).to_dot() == (
        'digraph "w\\"1" {\n'
        "    rankdir=TB;\n"
        "    node [shape=box];\n"
        '    "root" [label="root · 开始节点", shape=oval];\n'
        '    "A" [label="a \\"quoted\\"\\\\name"];\n'
        '    "B" [label="B"];\n'
        '    "end" [label="end · 结束节点", shape=oval];\n'
        '    "root" -> "A";\n'
        '    "A" -> "B";\n'
        '    "B" -> "end";\n'
        "}\n"
    )


@pytest.mark.parametrize(
    "config",
    [
        {"id": "w\x00", "nodes": [{"id": "a"}]},
        {"id": "w\ud800", "nodes": [{"id": "a"}]},
        {"id": "w", "name": "n\x00", "nodes": [{"id": "a"}]},
        {"id": "w", "nodes": [{"id": "a\x00b"}]},
        {"id": "w", "nodes": [{"id": "lone \udc80"}]},
        {"id": "w", "nodes": [{"id": "a", "name": "x\x00"}]},
        {"id": "w", "nodes": [{"id": "a", "next_nodes": ["b\x00"]}, {"id": "b\x00"}]},
    ],
    ids=["wf-nul", "wf-surrogate", "wf-name-nul", "node-nul", "node-surrogate", "name-nul", "next-nul"],
)
def test_ids_and_names_no_database_can_store_are_refused_at_load(config: dict[str, object]) -> None:
    """They would load, and every instance of the workflow would then fail to be written."""
    from asyncflow.registry import Registry

    with pytest.raises(ConfigError, match=r"NUL|lone surrogate"):
        Registry().load_workflow_config(config)
