"""The benchmark workflows: configs and workers of the five scenarios, on a fresh ``asyncflow.Registry``.

==============  ==========================================  ===========  =================================
scenario        shape (root and end implicit)               nodes/run    workers
==============  ==========================================  ===========  =================================
linear3         A → B → C                                   3            synchronous (no wait check)
linear3-wait    A → B → C                                   3            wait check ok at its first call
diamond         A → [B, C, D, E] → F                        6            synchronous
approval        A → approve → B                             3            ``approve`` is not ready until
                                                                         the benchmark sends it an event
branch          A → choose one of [B, C] → D (join "any")   3 of 4       ``A`` calls ``af.choose``: ``B``
                                                                         for even instance ids, else
                                                                         ``C``; the other is ``skipped``
slow2           A → S → C                                   3            ``S`` works for 2 s (a sleep):
                                                                         what ``visible_after`` shows
fanout-children P, which starts 20 child workflows          1 + 20 x 3   ``P``'s run starts 20 children
                (each ``A → B → C``)                                     (``af.start_child_workflow``);
                                                                         it completes once all 20 did
                                                                         (driver mode only)
==============  ==========================================  ===========  =================================

Every worker writes a tiny output (``{"out": 1}``) into its node context. The last node's ``run``
reports the instance as done to :class:`BenchHooks`, which is how driver mode times completions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncflow as af

__all__ = ["SCENARIOS", "BenchHooks", "ScenarioSpec", "build_registry", "get_scenario"]

APPROVAL_NODE = "approve"
SLOW_NODE = "S"
SLOW_SECONDS = 2.0
FANOUT_CHILDREN = 20  # child workflows one fanout-children parent starts (as in the DBOS reference)


@dataclass(frozen=True, slots=True)
class ScenarioSpec:
    """One benchmark workflow: its config (Go JSON shape) and what the harness must know about it."""

    name: str
    workflow_type: str
    nodes: tuple[tuple[str, tuple[str, ...]], ...]  # (node id, next nodes) in config order
    wait_check: bool = False
    approval_node: str | None = None
    joins: tuple[tuple[str, str], ...] = ()  # (node id, join) for nodes whose join is not "all"
    chooser: str | None = None  # this node's run picks one of its next nodes (af.choose)
    skipped_per_run: int = 0  # config nodes a run skips (not counted as node steps)
    slow_node: str | None = None  # its run sleeps SLOW_SECONDS
    children: int = 0  # the first node's run starts this many child workflows of ``child_type``
    child_type: str | None = None  # a linear3 workflow, registered beside this one

    @property
    def workflow_types(self) -> tuple[str, ...]:
        """The workflow types a driver must run for this scenario (the children's too)."""
        return (self.workflow_type,) if self.child_type is None else (self.workflow_type, self.child_type)

    @property
    def node_count(self) -> int:
        """Config nodes a run executes (root, end and skipped nodes not counted): what "node steps" counts."""
        return len(self.nodes) - self.skipped_per_run

    @property
    def last_node(self) -> str:
        return self.nodes[-1][0]

    def config(self) -> dict[str, Any]:
        joins = dict(self.joins)
        nodes = []
        for node, nxt in self.nodes:
            entry: dict[str, Any] = {"id": node, "name": node, "next_nodes": list(nxt)}
            if node in joins:
                entry["join"] = joins[node]
            nodes.append(entry)
        return {"id": self.workflow_type, "name": f"benchmark {self.name}", "nodes": nodes}


_LINEAR = (("A", ("B",)), ("B", ("C",)), ("C", ()))
SCENARIOS: dict[str, ScenarioSpec] = {
    spec.name: spec
    for spec in (
        ScenarioSpec("linear3", "bench_linear3", _LINEAR),
        ScenarioSpec("linear3-wait", "bench_linear3_wait", _LINEAR, wait_check=True),
        ScenarioSpec(
            "diamond",
            "bench_diamond",
            (
                ("A", ("B", "C", "D", "E")),
                ("B", ("F",)),
                ("C", ("F",)),
                ("D", ("F",)),
                ("E", ("F",)),
                ("F", ()),
            ),
        ),
        ScenarioSpec(
            "approval",
            "bench_approval",
            (("A", (APPROVAL_NODE,)), (APPROVAL_NODE, ("B",)), ("B", ())),
            approval_node=APPROVAL_NODE,
        ),
        ScenarioSpec(
            "branch",
            "bench_branch",
            (("A", ("B", "C")), ("B", ("D",)), ("C", ("D",)), ("D", ())),
            joins=(("D", "any"),),
            chooser="A",
            skipped_per_run=1,
        ),
        ScenarioSpec(
            "slow2", "bench_slow2", (("A", (SLOW_NODE,)), (SLOW_NODE, ("C",)), ("C", ())), slow_node=SLOW_NODE
        ),
        ScenarioSpec(
            "fanout-children",
            "bench_fanout",
            (("P", ()),),
            children=FANOUT_CHILDREN,
            child_type="bench_fanout_child",
        ),
    )
}


def get_scenario(name: str) -> ScenarioSpec:
    """The scenario called ``name``; ``KeyError`` lists the known ones."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None


@dataclass(slots=True)
class BenchHooks:
    """What the workers tell the harness.

    ``on_completed(instance_id, perf_counter)`` runs when the last node's ``run`` is called;
    ``on_waiting(instance_id)`` runs the first time an approval node is found not ready.
    """

    on_completed: Callable[[int, float], None] | None = None
    on_waiting: Callable[[int], None] | None = None
    _waiting_seen: set[int] = field(default_factory=set)

    def waiting(self, instance_id: int) -> None:
        if self.on_waiting is not None and instance_id not in self._waiting_seen:
            self._waiting_seen.add(instance_id)
            self.on_waiting(instance_id)

    def forget(self, instance_id: int) -> None:
        self._waiting_seen.discard(instance_id)


async def _output(ctx: af.JSONContext) -> None:
    ctx.set(["out"], 1)


async def _slow(ctx: af.JSONContext) -> None:
    await asyncio.sleep(SLOW_SECONDS)
    ctx.set(["out"], 1)


async def _ready(ctx: af.JSONContext) -> None:
    return None


def build_registry(spec: ScenarioSpec, hooks: BenchHooks | None = None) -> af.Registry:
    """A fresh registry holding ``spec``'s config and workers (built and validated)."""
    hooks = hooks if hooks is not None else BenchHooks()
    registry = af.Registry()
    registry.load_workflow_config(spec.config())

    async def last(ctx: af.JSONContext) -> None:
        ctx.set(["out"], 1)
        if hooks.on_completed is not None:
            hooks.on_completed(af.current_node().instance_id, time.perf_counter())

    async def approval_check(ctx: af.JSONContext) -> None:
        _, has_event = ctx.get(af.NODE_EVENT, "event_ts")
        if has_event:
            hooks.forget(af.current_node().instance_id)
            return
        hooks.waiting(af.current_node().instance_id)
        raise af.TaskNotReady("waiting for the benchmark's approval event")

    async def choose(ctx: af.JSONContext) -> None:
        ctx.set(["out"], 1)
        successors = dict(spec.nodes)[spec.chooser or ""]
        af.choose(successors[af.current_node().instance_id % len(successors)])

    if spec.children:
        _register_fanout(registry, spec, hooks)
        return registry
    for node, _ in spec.nodes:
        run = (
            last
            if node == spec.last_node
            else choose
            if node == spec.chooser
            else _slow
            if node == spec.slow_node
            else _output
        )
        wait_check: Callable[[af.JSONContext], Any] | None = None
        if node == spec.approval_node:
            wait_check = approval_check
        elif spec.wait_check:
            wait_check = _ready
        registry.register_workflow_task(
            spec.workflow_type, node, af.NormalTaskWorker(run=run, wait_check=wait_check)
        )
    registry.get_workflow_definition(spec.workflow_type)
    return registry


def _register_fanout(registry: af.Registry, spec: ScenarioSpec, hooks: BenchHooks) -> None:
    """``spec``'s parent (one node ``P`` starting ``spec.children`` children, done in its wait check
    once they all completed) and its child type (a ``linear3``)."""
    assert spec.child_type is not None
    child = ScenarioSpec("fanout-child", spec.child_type, _LINEAR)
    registry.load_workflow_config(child.config())
    for node, _ in child.nodes:
        registry.register_workflow_task(child.workflow_type, node, af.NormalTaskWorker(run=_output))
    parent_node = spec.nodes[0][0]

    async def start_children(ctx: af.JSONContext) -> None:
        for k in range(spec.children):
            await af.start_child_workflow(child.workflow_type, str(k))

    async def children_done(ctx: af.JSONContext) -> None:  # called once every child completed
        ctx.set(["out"], len(ctx.get("children")[0] or {}))
        if hooks.on_completed is not None:
            hooks.on_completed(af.current_node().instance_id, time.perf_counter())

    registry.register_workflow_task(
        spec.workflow_type, parent_node, af.NormalTaskWorker(run=start_children, wait_check=children_done)
    )
    registry.get_workflow_definition(spec.workflow_type)
    registry.get_workflow_definition(child.workflow_type)
