"""Branches and joins (0.2): the pure rules, ``choose``, the ``join`` config and the ``skipped`` status."""

from __future__ import annotations

import logging

import pytest

import asyncflow as af
from asyncflow.config import NodeConfig, WorkflowConfig
from asyncflow.definition import build_definition
from asyncflow.engine.rules import Join, chosen_of, edge_status, join_decision, propagate_skips
from asyncflow.errors import ConfigError, ParamInvalidError
from asyncflow.worker import EmptyTaskWorker, choice_scope, choose

C, S, R = "completed", "skipped", "running"


@pytest.mark.parametrize(
    ("join", "statuses", "decision"),
    [
        ("all", [C, C], Join.RUN),
        ("all", [C, S], Join.SKIP),
        ("all", [C, None], Join.WAIT),
        ("all", [S, R], Join.WAIT),
        ("any", [C, S], Join.RUN),
        ("any", [S, S], Join.SKIP),
        ("any", [C, R], Join.WAIT),
        ("first", [C, R], Join.RUN),
        ("first", [None, C], Join.RUN),
        ("first", [S, R], Join.WAIT),
        ("first", [S, S], Join.SKIP),
        ("end", [S, S], Join.RUN),
        ("end", [C, R], Join.WAIT),
    ],
)
def test_join_decision(join: str, statuses: list[str | None], decision: Join) -> None:
    assert join_decision(join, statuses) is decision


def test_edge_status_sees_a_branch_not_chosen_as_skipped() -> None:
    assert edge_status(C, ("a",), "b") == S
    assert edge_status(C, ("a",), "a") == C
    assert edge_status(C, None, "b") == C
    assert edge_status(R, (), "b") == R
    assert chosen_of({"system": {"chosen": ["a"]}}) == ("a",)
    assert chosen_of({"system": {}}) is None and chosen_of(None) is None


def test_propagate_skips_follows_joins() -> None:
    # a -> b, c; b -> d (all); c -> e (any, with b); d, e -> end
    nxt = {"a": ["b", "c"], "b": ["d", "e"], "c": ["e"], "d": ["end"], "e": ["end"]}
    pre = {"b": ["a"], "c": ["a"], "d": ["b"], "e": ["b", "c"], "end": ["d", "e"]}
    join = {"b": "all", "c": "all", "d": "all", "e": "any"}
    status = {"a": C}

    def run(chosen: tuple[str, ...]) -> list[str]:
        return propagate_skips(
            "a",
            status_of=status.get,
            chosen=lambda t: chosen if t == "a" else None,
            pre_nodes=pre.__getitem__,
            next_nodes=nxt.__getitem__,
            join_of=join.__getitem__,
            open_node=lambda t: t not in status,
        )

    assert run(("c",)) == ["b", "d"]  # e (any) still waits for c
    assert run(()) == ["b", "c", "d", "e"]  # end is never skipped
    assert run(("b", "c")) == []


def test_choose_checks_the_successors() -> None:
    with pytest.raises(LookupError):
        choose("a")
    with choice_scope("check", ("approve", "reject")) as choice:
        assert choice.chosen is None
        choose("reject", "reject")
        assert choice.chosen == ("reject",)
        choose()
        assert choice.chosen == ()
        with pytest.raises(ParamInvalidError, match="'ship'"):
            choose("ship")
    assert af.choose is choose


def test_skipped_status() -> None:
    assert af.TaskStatus.SKIPPED == "skipped"
    assert af.task_status_text("skipped") == "跳过"
    assert af.is_over_task_status("skipped")
    assert not af.is_over_instance_status("skipped")


def test_join_config() -> None:
    assert NodeConfig(id="a").join == "all"
    assert NodeConfig.from_dict({"id": "a"}).join == "all"
    assert NodeConfig.from_dict({"id": "a", "join": "first"}).join == "first"
    assert NodeConfig(id="a", join="any").to_dict()["join"] == "any"
    assert "join" not in NodeConfig(id="a").to_dict()  # the Go shape when unused
    with pytest.raises(ConfigError, match=r"workflow 'w'.*'b'.*join must be one of"):
        WorkflowConfig.from_dict({"id": "w", "nodes": [{"id": "a"}, {"id": "b", "join": "some"}]})
    with pytest.raises(ConfigError, match="join"):
        NodeConfig(id="a", join="most")


def test_a_first_join_with_one_predecessor_warns(caplog: pytest.LogCaptureFixture) -> None:
    cfg = WorkflowConfig(
        id="w", nodes=(NodeConfig(id="a", next_nodes=("b",)), NodeConfig(id="b", join="first"))
    )
    with caplog.at_level(logging.WARNING, logger="asyncflow.definition"):
        definition = build_definition(cfg, lambda _: EmptyTaskWorker())
    assert definition.node("b").join == "first"
    assert any("'b' has join='first' but a single predecessor" in r.getMessage() for r in caplog.records)
    caplog.clear()
    joined = WorkflowConfig(
        id="w2",
        nodes=(
            NodeConfig(id="a", next_nodes=("c",)),
            NodeConfig(id="b", next_nodes=("c",)),
            NodeConfig(id="c", join="any"),
        ),
    )
    with caplog.at_level(logging.WARNING, logger="asyncflow.definition"):
        build_definition(joined, lambda _: EmptyTaskWorker())
    assert not caplog.records


def test_skipped_nodes_have_their_own_colour() -> None:
    from asyncflow.cli.graph import STATUS_COLORS, GraphNode, instance_dot, instance_mermaid

    nodes = [GraphNode("a", "A", ("b",), status="completed"), GraphNode("b", "B", (), status="skipped")]
    color = STATUS_COLORS["skipped"]
    assert color not in (STATUS_COLORS["completed"], STATUS_COLORS["canceled"], STATUS_COLORS["failed"])
    assert f"classDef skipped fill:{color}" in instance_mermaid(
        nodes
    ) and "class n1 skipped" in instance_mermaid(nodes)
    assert f'fillcolor="{color}"' in instance_dot(nodes, "w")
