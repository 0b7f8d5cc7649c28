"""Workflow definitions: a validated config wired into a DAG with its workers (pure, no I/O).

:func:`build_definition` turns a :class:`~asyncflow.config.WorkflowConfig` into a
:class:`WorkflowDefinition`. The implicit ``root`` node (``开始节点``) feeds every node that no other node
names in ``next_nodes``; every node with empty ``next_nodes`` feeds the implicit ``end`` node
(``结束节点``). Everything follows config order, so the result is deterministic.

Validation (:func:`validate_config`) is linear in nodes + edges and rejects, with a
:class:`~asyncflow.errors.ConfigError` naming the workflow and the offending nodes: an empty workflow id,
zero nodes, empty node ids, the reserved ids ``root``/``end``, duplicate node ids, unknown or duplicate
``next_nodes`` entries, self-loops and every cycle (found with Kahn's algorithm, whether or not root
reaches it). With no cycle, every node is reachable from ``root`` and reaches ``end``. Missing workers are
reported by :func:`build_definition`, all at once, as :class:`MissingWorkerError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asyncflow._text import dot_text, mermaid_text, shown, too_long, unstorable
from asyncflow.config import JOINS, WorkflowConfig, count_problem
from asyncflow.errors import ConfigError, TaskWorkerNotFoundError
from asyncflow.retry import RetryPolicy
from asyncflow.status import END_NODE, END_NODE_NAME, ROOT_NODE, ROOT_NODE_NAME
from asyncflow.worker import (
    EndNodeWorker,
    RootNodeWorker,
    TaskWorker,
    direct_run_function,
    worker_has_wait_check,
)

if TYPE_CHECKING:
    from asyncflow.context import JSONContext

__all__ = [
    "MissingWorkerError",
    "NodeDefinition",
    "WorkerResolver",
    "WorkflowDefinition",
    "build_definition",
    "validate_config",
]

#: Looks up the worker for a node id (task type) of the workflow being built; ``None`` if there is none.
WorkerResolver = Callable[[str], TaskWorker | None]

_RESERVED = frozenset({ROOT_NODE, END_NODE})

logger = logging.getLogger("asyncflow.definition")


class MissingWorkerError(ConfigError, TaskWorkerNotFoundError):
    """Nodes have no registered worker. ``nodes`` lists every one of them.

    Both a :class:`ConfigError` (the definition cannot build) and a :class:`TaskWorkerNotFoundError`
    (Go's ``ErrWorkflowTaskWorkerNotFound``).
    """


def node_label(task_type: str, task_name: str) -> str:
    """What a drawing shows for a node: its name (else its id); the implicit nodes show both, e.g.
    ``root · 开始节点``, so they read right on a machine without CJK fonts."""
    if task_type in _RESERVED and task_name and task_name != task_type:
        return f"{task_type} · {task_name}"
    return task_name or task_type


def _names(items: Sequence[str]) -> str:
    return ", ".join(repr(item) for item in items)


def _error(workflow: str, message: str, nodes: Sequence[str] = ()) -> ConfigError:
    return ConfigError(f"workflow {workflow!r}: {message}", workflow_type=workflow, nodes=tuple(nodes))


def _check_count(value: object, field_name: str, task_type: str) -> int:
    problem = count_problem(value, field_name)
    if problem is not None:
        raise ConfigError(f"node {task_type!r}: {problem}", nodes=(task_type,))
    return value if isinstance(value, int) else 0


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class NodeDefinition:
    """One node of a built workflow: its config, its edges and its worker.

    ``pre_nodes`` and ``next_nodes`` are task types in config order (``root``/``end`` included where
    they apply). ``max_wait_time_ts`` is 0 when disabled (``None`` becomes 0); ``fail_max_count`` is 0
    for no limit and ``None`` when the config leaves it unset (the service's ``default_fail_max_count``
    applies); negative values raise :class:`ConfigError`. ``retry`` is the node's own back-off
    (``None``: the service's). ``has_wait_check`` is
    :func:`~asyncflow.worker.worker_has_wait_check` of the worker, computed once, and ``run_function``
    :func:`~asyncflow.worker.direct_run_function` (what the engine awaits instead of ``worker.run``).
    Treat the lists as read-only: definitions are cached and shared.
    """

    task_type: str
    task_name: str = ""
    fail_max_count: int | None = 0
    max_wait_time_ts: int = 0
    retry: RetryPolicy | None = None
    pre_nodes: list[str] = field(default_factory=list)
    next_nodes: list[str] = field(default_factory=list)
    join: str = "all"
    worker: TaskWorker
    has_wait_check: bool = field(init=False)
    run_function: Callable[[JSONContext], Coroutine[Any, Any, None]] | None = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.task_type, str) or not self.task_type:
            raise ConfigError(f"node task_type must be a non-empty string, got {shown(self.task_type)}")
        if self.fail_max_count is not None:
            object.__setattr__(
                self, "fail_max_count", _check_count(self.fail_max_count, "fail_max_count", self.task_type)
            )
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ConfigError(
                f"node {self.task_type!r}: retry must be a RetryPolicy", nodes=(self.task_type,)
            )
        object.__setattr__(
            self, "max_wait_time_ts", _check_count(self.max_wait_time_ts, "max_wait_time_ts", self.task_type)
        )
        if self.join not in JOINS:
            raise ConfigError(
                f"node {self.task_type!r}: join must be one of {', '.join(map(repr, JOINS))}, "
                f"got {shown(self.join)}",
                nodes=(self.task_type,),
            )
        object.__setattr__(self, "has_wait_check", worker_has_wait_check(self.worker))
        object.__setattr__(self, "run_function", direct_run_function(self.worker))

    def __repr__(self) -> str:
        return f"NodeDefinition({self.task_type!r}, pre={self.pre_nodes!r}, next={self.next_nodes!r})"


class WorkflowDefinition:
    """A built workflow: ``nodes`` holds root, the config nodes in config order, then end.

    Made by :func:`build_definition` (through a :class:`~asyncflow.registry.Registry`), immutable and
    shared by every instance of the workflow type.
    """

    __slots__ = (
        "_by_type",
        "_position",
        "end_feeders",
        "feeds_first",
        "id",
        "lone_feeders",
        "lone_successors",
        "name",
        "nodes",
        "sources",
        "starts",
    )

    def __init__(self, id: str, name: str, nodes: Sequence[NodeDefinition]) -> None:
        self.id = id
        self.name = name
        self.nodes: tuple[NodeDefinition, ...] = tuple(nodes)
        if (
            len(self.nodes) < 2
            or self.nodes[0].task_type != ROOT_NODE
            or self.nodes[-1].task_type != END_NODE
        ):
            raise _error(id, "a definition's nodes must start with 'root' and end with 'end'")
        self._by_type = {node.task_type: node for node in self.nodes}
        if len(self._by_type) != len(self.nodes):
            raise _error(id, "a definition's task types must be unique")
        self._position = {node.task_type: i for i, node in enumerate(self.nodes)}
        by_type = self._by_type
        self.feeds_first: frozenset[str] = frozenset(
            node.task_type
            for node in self.nodes
            if any(succ in by_type and by_type[succ].join == "first" for succ in node.next_nodes)
        )
        """Nodes with a successor whose join is ``first`` (completing one may cancel its siblings)."""
        self.lone_feeders: frozenset[str] = frozenset(
            node.task_type
            for node in self.nodes
            if all(succ in by_type and len(by_type[succ].pre_nodes) == 1 for succ in node.next_nodes)
        )
        """Nodes that are the only predecessor of each of their successors: completing one without
        ``af.choose`` skips nothing (each successor's one edge is completed)."""
        self.lone_successors: dict[str, str] = {
            node.task_type: node.pre_nodes[0] for node in self.nodes[:-1] if len(node.pre_nodes) == 1
        }
        """Each node but ``end`` with exactly one predecessor, to that predecessor: whatever its join,
        such a node runs once that edge is completed (and only then), so the engine needs no join."""
        self.end_feeders: frozenset[str] = frozenset(self.nodes[-1].pre_nodes)
        """The predecessors of ``end`` (only their completion may complete it)."""
        self.sources: tuple[str, ...] = tuple(node.task_type for node in self.nodes if not node.pre_nodes)
        """The nodes without predecessors (``root``), in definition order: where a new instance starts."""
        self.starts: tuple[str, ...] = tuple(
            task_type
            for task_type in self.sources
            if task_type == END_NODE or by_type[task_type].join == "all"
        )
        """The sources that run in a new instance's first pass: those whose join of no edges runs
        (``all``; ``any`` and ``first`` skip; the engine's ``join_decision``)."""

    @property
    def root(self) -> NodeDefinition:
        """The implicit start node (``root``)."""
        return self.nodes[0]

    @property
    def end(self) -> NodeDefinition:
        """The implicit end node (``end``)."""
        return self.nodes[-1]

    @property
    def nodes_count(self) -> int:
        """Number of nodes, root and end included (Go ``NodesCount``)."""
        return len(self.nodes)

    def node(self, task_type: str) -> NodeDefinition:
        """The node with this task type; raises ``KeyError`` if the workflow has none."""
        try:
            return self._by_type[task_type]
        except KeyError:
            raise KeyError(f"workflow {self.id!r} has no node {task_type!r}") from None

    def get_node(self, task_type: str) -> NodeDefinition | None:
        """The node with this task type, or ``None``."""
        return self._by_type.get(task_type)

    def __contains__(self, task_type: object) -> bool:
        return task_type in self._by_type

    def descendants(self, task_type: str) -> list[str]:
        """Every node reachable from ``task_type`` (``end`` included, itself excluded), in definition order.

        ``descendants("root")`` is every other node. Raises ``KeyError`` for an unknown task type.
        """
        start = self.node(task_type)
        seen: set[str] = set()
        stack = list(start.next_nodes)
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self._by_type[current].next_nodes)
        return [node.task_type for node in self.nodes if node.task_type in seen]

    def to_mermaid(self) -> str:
        """A Mermaid ``flowchart TD`` of the DAG, root and end included; labels show the node names."""
        lines = ["flowchart TD"]
        ids = {node.task_type: f"n{i}" for i, node in enumerate(self.nodes)}
        for node in self.nodes:
            label = mermaid_text(node_label(node.task_type, node.task_name))
            if node.task_type in _RESERVED:
                lines.append(f'    {ids[node.task_type]}(["{label}"])')
            else:
                lines.append(f'    {ids[node.task_type]}["{label}"]')
        for node in self.nodes:
            lines.extend(f"    {ids[node.task_type]} --> {ids[nxt]}" for nxt in node.next_nodes)
        return "\n".join(lines) + "\n"

    def to_dot(self) -> str:
        """A Graphviz ``digraph`` of the DAG; node ids are the task types, labels the node names."""
        lines = [f"digraph {dot_text(self.id)} {{", "    rankdir=TB;", "    node [shape=box];"]
        for node in self.nodes:
            shape = ", shape=oval" if node.task_type in _RESERVED else ""
            label = dot_text(node_label(node.task_type, node.task_name))
            lines.append(f"    {dot_text(node.task_type)} [label={label}{shape}];")
        for node in self.nodes:
            lines.extend(f"    {dot_text(node.task_type)} -> {dot_text(nxt)};" for nxt in node.next_nodes)
        lines.append("}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"WorkflowDefinition(id={self.id!r}, name={self.name!r}, nodes_count={self.nodes_count})"


@dataclass(slots=True)
class _Graph:
    """The checked shape of a config: config-order successor and predecessor indices."""

    ids: list[str]
    succ: list[list[int]]
    pred: list[list[int]]


def _check_storable(config: WorkflowConfig) -> None:
    """Ids and names are stored with every instance: one no database can store would load fine and
    leave every instance of the workflow unable to run."""
    wid = config.id
    problem = unstorable(wid) or unstorable(config.name)
    if problem is not None:
        raise ConfigError(f"workflow id or name {wid!r} {problem}", workflow_type=wid, nodes=())
    problem = too_long(wid)  # the workflow type of every instance, in the unique indexes
    if problem is not None:
        raise ConfigError(f"workflow id {wid[:40]!r}... {problem}", workflow_type=wid, nodes=())
    for node in config.nodes:
        texts = [("id", node.id), ("name", node.name), *(("next node", n) for n in node.next_nodes)]
        for what, text in texts:
            problem = unstorable(text)
            if problem is not None:
                raise _error(wid, f"node {node.id!r}: {what} {text!r} {problem}", [node.id])
        for what, text in texts[:1] + texts[2:]:  # node ids: a node row's task_type (indexed)
            problem = too_long(text)
            if problem is not None:
                raise _error(wid, f"node {what} {text[:40]!r}... {problem}", [node.id])


def _check_nodes(config: WorkflowConfig) -> dict[str, int]:
    wid = config.id
    if not wid:
        raise ConfigError(f"workflow id is empty (workflow name {config.name!r})", nodes=())
    _check_storable(config)
    nodes = config.nodes
    if not nodes:
        raise _error(wid, "has no nodes")
    empty = [f"#{i}" for i, node in enumerate(nodes) if not node.id]
    if empty:
        raise _error(wid, f"node(s) {', '.join(empty)} have an empty id")
    reserved = list(dict.fromkeys(node.id for node in nodes if node.id in _RESERVED))
    if reserved:
        raise _error(wid, f"node id(s) {_names(reserved)} are reserved for the implicit nodes", reserved)
    index: dict[str, int] = {}
    duplicates: dict[str, None] = {}
    for i, node in enumerate(nodes):
        if node.id in index:
            duplicates[node.id] = None
        else:
            index[node.id] = i
    if duplicates:
        raise _error(wid, f"duplicate node id(s) {_names(list(duplicates))}", list(duplicates))
    return index


def _check_edges(config: WorkflowConfig, index: dict[str, int]) -> None:
    wid = config.id
    unknown: list[tuple[str, str]] = []
    repeated: list[tuple[str, str]] = []
    loops: list[str] = []
    for node in config.nodes:
        seen: set[str] = set()
        for target in node.next_nodes:
            if target in seen:
                repeated.append((node.id, target))
            seen.add(target)
            if target == node.id:
                loops.append(node.id)
            if target not in index:
                unknown.append((node.id, target))
    if unknown:
        pairs = ", ".join(f"{src!r} -> {dst!r}" for src, dst in unknown)
        hint = ""
        if any(dst in _RESERVED for _, dst in unknown):
            hint = " ('root' and 'end' are implicit: a node with empty next_nodes feeds 'end')"
        offenders = list(dict.fromkeys(src for src, _ in unknown))
        raise _error(wid, f"unknown next node(s): {pairs}{hint}", offenders)
    if repeated:
        pairs = ", ".join(f"{src!r} -> {dst!r}" for src, dst in dict.fromkeys(repeated))
        offenders = list(dict.fromkeys(src for src, _ in repeated))
        raise _error(wid, f"duplicate next_nodes entries: {pairs}", offenders)
    if loops:
        loops = list(dict.fromkeys(loops))
        raise _error(wid, f"self-loop: node(s) {_names(loops)} name themselves in next_nodes", loops)


def _analyze(config: WorkflowConfig) -> _Graph:
    if not isinstance(config, WorkflowConfig):
        raise ConfigError(f"expected a WorkflowConfig, got {type(config).__name__}")
    index = _check_nodes(config)
    _check_edges(config, index)
    ids = [node.id for node in config.nodes]
    succ = [[index[target] for target in node.next_nodes] for node in config.nodes]
    pred: list[list[int]] = [[] for _ in ids]
    indegree = [0] * len(ids)
    for i, targets in enumerate(succ):
        for j in targets:
            pred[j].append(i)
            indegree[j] += 1
    # Kahn's algorithm: whatever cannot be peeled off lies on a cycle or downstream of one.
    queue = [i for i, d in enumerate(indegree) if d == 0]
    done = bytearray(len(ids))
    for i in queue:  # the list grows while we iterate: a FIFO without deque
        done[i] = 1
        for j in succ[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                queue.append(j)
    if len(queue) != len(ids):
        cycle = _find_cycle(pred, done)
        path = " -> ".join(repr(ids[i]) for i in [*cycle, cycle[0]])
        stuck = len(ids) - len(queue)
        raise _error(
            config.id,
            f"cycle {path} ({stuck} node(s) lie on or after a cycle)",
            [ids[i] for i in cycle],
        )
    return _Graph(ids=ids, succ=succ, pred=pred)


def _find_cycle(pred: list[list[int]], done: bytearray) -> list[int]:
    """A cycle among the nodes Kahn's algorithm left, in edge order. Linear.

    Every node left has a predecessor that was left too, so walking predecessors must repeat a node.
    """
    start = done.index(0)
    position: dict[int, int] = {}
    path: list[int] = []
    current = start
    while current not in position:
        position[current] = len(path)
        path.append(current)
        current = next(p for p in pred[current] if not done[p])
    cycle = path[position[current] :][::-1]
    first = cycle.index(min(cycle))  # start at the node that comes first in the config
    return cycle[first:] + cycle[:first]


def validate_config(config: WorkflowConfig) -> None:
    """Check every rule but the workers; raises :class:`ConfigError` naming the workflow and nodes."""
    _analyze(config)


def build_definition(config: WorkflowConfig, resolve_worker: WorkerResolver) -> WorkflowDefinition:
    """Validate ``config`` and wire it, with workers from ``resolve_worker``, into a definition.

    Raises :class:`ConfigError` for an invalid graph and :class:`MissingWorkerError` naming every node
    ``resolve_worker`` has no worker for. Linear in nodes + edges.
    """
    graph = _analyze(config)
    ids = graph.ids
    workers: list[TaskWorker] = []
    missing: list[str] = []
    for task_type in ids:
        found = resolve_worker(task_type)
        if found is None:
            missing.append(task_type)
        else:
            workers.append(found)
    if missing:
        raise MissingWorkerError(
            f"workflow {config.id!r}: no worker registered for node(s) {_names(missing)}",
            workflow_type=config.id,
            nodes=tuple(missing),
        )
    sources = [ids[i] for i, preds in enumerate(graph.pred) if not preds]
    sinks = [ids[i] for i, succ in enumerate(graph.succ) if not succ]
    nodes = [
        NodeDefinition(
            task_type=ROOT_NODE, task_name=ROOT_NODE_NAME, next_nodes=sources, worker=RootNodeWorker()
        )
    ]
    for i, cfg in enumerate(config.nodes):
        nodes.append(
            NodeDefinition(
                task_type=cfg.id,
                task_name=cfg.name,
                fail_max_count=cfg.fail_max_count,
                max_wait_time_ts=cfg.max_wait_time_ts or 0,
                retry=cfg.retry,
                pre_nodes=[ids[p] for p in graph.pred[i]] or [ROOT_NODE],
                next_nodes=list(cfg.next_nodes) or [END_NODE],
                join=cfg.join,
                worker=workers[i],
            )
        )
        if cfg.join != "all" and len(graph.pred[i]) < 2:
            logger.warning(
                "workflow %r: node %r has join=%r but a single predecessor: the join changes nothing",
                config.id,
                cfg.id,
                cfg.join,
            )
    nodes.append(
        NodeDefinition(task_type=END_NODE, task_name=END_NODE_NAME, pre_nodes=sinks, worker=EndNodeWorker())
    )
    return WorkflowDefinition(config.id, config.name, nodes)
