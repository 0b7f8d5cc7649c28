"""DAG drawings for people: a layered layout, Mermaid and Graphviz DOT with statuses, and plain text.

The layout is the classic layered one: a node's rank is the longest path from a source (``root``), and
within a rank nodes are ordered by the mean position of their predecessors (ties keep definition order),
which keeps fan-outs and joins readable without a layout engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .._text import dot_text, inert, mermaid_text
from ..definition import WorkflowDefinition, node_label
from ..records import WorkflowInstanceDetail
from ..status import END_NODE, ROOT_NODE
from .table import format_table

__all__ = [
    "STATUS_COLORS",
    "GraphNode",
    "Layout",
    "dag_text",
    "instance_dot",
    "instance_mermaid",
    "layout",
    "nodes_of_definition",
    "nodes_of_detail",
]

#: Fill colour per node status (HTML page, Mermaid classes, DOT fill colours).
STATUS_COLORS = {
    "uncreated": "#f3f4f6",
    "init": "#dbeafe",
    "restarting": "#c7d2fe",
    "running": "#93c5fd",
    "pending": "#fde68a",
    "finishing": "#a7f3d0",
    "completed": "#86efac",
    "failed": "#fca5a5",
    "canceled": "#d1d5db",
    "skipped": "#e5e7eb",
}
_UNKNOWN_COLOR = "#ffffff"


@dataclass(frozen=True, slots=True)
class GraphNode:
    """One node to draw: its id (task type), label, successors and, for an instance, its state."""

    task_type: str
    name: str
    next_nodes: tuple[str, ...]
    status: str | None = None
    fail_count: int = 0

    @property
    def label(self) -> str:
        """The node name, or the task type when it has none; root and end show both."""
        return node_label(self.task_type, self.name)


def nodes_of_definition(definition: WorkflowDefinition) -> list[GraphNode]:
    """The nodes of a definition, root and end included, in definition order."""
    return [GraphNode(n.task_type, n.task_name, tuple(n.next_nodes)) for n in definition.nodes]


def nodes_of_detail(detail: WorkflowInstanceDetail) -> list[GraphNode]:
    """The nodes of an instance detail with their statuses (no edges if its definition was not loaded)."""
    return [
        GraphNode(t.task_type, t.task_name, tuple(t.next_nodes_keys), t.status, t.fail_count)
        for t in detail.task_instances
    ]


@dataclass(slots=True)
class Layout:
    """Ranks (rows) of node ids, top to bottom, each ordered left to right."""

    ranks: list[list[str]] = field(default_factory=list)

    def rank_of(self) -> dict[str, int]:
        """Node id -> rank index."""
        return {node: r for r, row in enumerate(self.ranks) for node in row}


def layout(nodes: Sequence[GraphNode]) -> Layout:
    """Layered layout: rank = longest path from a source; order within a rank by predecessor barycenter.

    Edges to unknown nodes are ignored. Linear in nodes + edges (plus sorting each rank).
    """
    ids = [n.task_type for n in nodes]
    known = set(ids)
    order = {node_id: i for i, node_id in enumerate(ids)}
    succ = {n.task_type: [m for m in n.next_nodes if m in known and m != n.task_type] for n in nodes}
    indegree = dict.fromkeys(ids, 0)
    for targets in succ.values():
        for target in targets:
            indegree[target] += 1
    rank = dict.fromkeys(ids, 0)
    queue = [node_id for node_id in ids if indegree[node_id] == 0]
    for node_id in queue:  # Kahn's algorithm; the list grows while we walk it
        for target in succ[node_id]:
            rank[target] = max(rank[target], rank[node_id] + 1)
            indegree[target] -= 1
            if indegree[target] == 0:
                queue.append(target)
    placed = set(queue)
    top = max(rank.values(), default=0)
    for node_id in ids:  # a cycle cannot come from a valid definition; keep such nodes visible anyway
        if node_id not in placed:
            top += 1
            rank[node_id] = top
    rows: list[list[str]] = [[] for _ in range(max(rank.values(), default=-1) + 1)]
    for node_id in ids:
        rows[rank[node_id]].append(node_id)
    preds: dict[str, list[str]] = {node_id: [] for node_id in ids}
    for source, targets in succ.items():
        for target in targets:
            preds[target].append(source)
    position: dict[str, float] = {}
    for row in rows:

        def key(node_id: str) -> tuple[float, int]:
            placed_preds = [position[p] for p in preds[node_id] if p in position]
            center = sum(placed_preds) / len(placed_preds) if placed_preds else float(order[node_id])
            return (center, order[node_id])

        row.sort(key=key)
        for i, node_id in enumerate(row):
            position[node_id] = i - (len(row) - 1) / 2
    return Layout([row for row in rows if row])


def _statuses(nodes: Iterable[GraphNode]) -> list[str]:
    return list(dict.fromkeys(n.status for n in nodes if n.status is not None))


def _class_name(status: str) -> str:
    """A Mermaid class name for a status: a stored status is data, never Mermaid syntax."""
    return status if status in STATUS_COLORS else "unknown_status"


def instance_mermaid(nodes: Sequence[GraphNode]) -> str:
    """A Mermaid ``flowchart TD`` whose nodes show and are coloured by their status."""
    ids = {n.task_type: f"n{i}" for i, n in enumerate(nodes)}
    lines = ["flowchart TD"]
    for n in nodes:
        text = mermaid_text(n.label) + (f"<br/>{mermaid_text(n.status)}" if n.status else "")
        shape = ('(["', '"])') if n.task_type in (ROOT_NODE, END_NODE) else ('["', '"]')
        lines.append(f"    {ids[n.task_type]}{shape[0]}{text}{shape[1]}")
    for n in nodes:
        lines.extend(f"    {ids[n.task_type]} --> {ids[m]}" for m in n.next_nodes if m in ids)
    classes = list(dict.fromkeys(_class_name(status) for status in _statuses(nodes)))
    for name in classes:
        color = STATUS_COLORS.get(name, _UNKNOWN_COLOR)
        lines.append(f"    classDef {name} fill:{color},stroke:#374151,color:#111827")
        members = ",".join(ids[n.task_type] for n in nodes if n.status and _class_name(n.status) == name)
        lines.append(f"    class {members} {name}")
    return "\n".join(lines) + "\n"


def instance_dot(nodes: Sequence[GraphNode], name: str) -> str:
    """A Graphviz ``digraph`` whose nodes show and are filled by their status."""
    lines = [f"digraph {dot_text(name)} {{", "    rankdir=TB;", "    node [shape=box, style=filled];"]
    for n in nodes:
        label = f"{inert(n.label)}\n{inert(n.status)}" if n.status else n.label
        color = STATUS_COLORS.get(n.status or "", _UNKNOWN_COLOR)
        shape = ", shape=oval" if n.task_type in (ROOT_NODE, END_NODE) else ""
        lines.append(
            f"    {dot_text(n.task_type)} [label={dot_text(label)}, fillcolor={dot_text(color)}{shape}];"
        )
    known = {n.task_type for n in nodes}
    for n in nodes:
        lines.extend(f"    {dot_text(n.task_type)} -> {dot_text(m)};" for m in n.next_nodes if m in known)
    lines.append("}")
    return "\n".join(lines) + "\n"


def dag_text(nodes: Sequence[GraphNode]) -> str:
    """The DAG as a table, one line per node in rank order: rank, id, name, successors (and status)."""
    by_id = {n.task_type: n for n in nodes}
    placed = layout(nodes)
    with_status = any(n.status is not None for n in nodes)
    headers = ["RANK", "NODE", "NAME", "NEXT"] + (["STATUS"] if with_status else [])
    rows = []
    for r, row in enumerate(placed.ranks):
        for node_id in row:
            n = by_id[node_id]
            line: list[object] = [r, node_id, n.name, ", ".join(n.next_nodes) or "-"]
            if with_status:
                line.append(n.status or "")
            rows.append(line)
    return format_table(headers, rows, right=(0,))
