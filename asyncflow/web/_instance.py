"""The instance page: facts, the DAG coloured by status (the SVG of ``asyncflow show --html``), every
node's status, attempts, timings, context, last error, progress and children, and the action links.

While the instance runs the page reloads itself with ``<meta http-equiv="refresh">`` (no script).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from urllib.parse import urlencode

from ..cli.graph import STATUS_COLORS, nodes_of_detail
from ..cli.html import _svg as dag_svg  # the static page's renderer: one drawing of a DAG
from ..cli.table import format_age, format_json, format_ts
from ..records import TaskInstanceDetail, WorkflowInstanceDetail, WorkflowInstanceRecord
from ..status import is_over_instance_status, is_over_task_status
from ._data import children, duration, in_flight_age, last_error, progress
from ._html import e, page, status_badge

__all__ = ["DONE_MESSAGES", "instance_page"]

#: What a finished action says on the instance page (``?done=...``); never text from the request.
DONE_MESSAGES = {
    "cancel": "The instance was canceled.",
    "restart": "The node was restarted; a driver on this database runs it.",
    "event": "The event was stored; the instance was woken.",
}


def _seconds(value: int | None) -> str:
    return "-" if value is None else f"{value} s"


def _node_actions(base: str, detail: WorkflowInstanceDetail, entry: TaskInstanceDetail) -> str:
    query = urlencode({"node": entry.task_type})
    links = [f'<a class="restart" href="{e(base)}/instances/{detail.id}/restart?{e(query)}">restart node</a>']
    if entry.id and not is_over_task_status(entry.status) and not is_over_instance_status(detail.status):
        links.append(
            f'<a class="event" href="{e(base)}/instances/{detail.id}/event?{e(query)}">send event</a>'
        )
    return f'<span class="actions">{"".join(links)}</span>'


def _children(base: str, entry: TaskInstanceDetail) -> str:
    found = children(entry)
    if not found:
        return ""
    items = "".join(
        f'<li>{e(key)}: <a href="{e(base)}/instances/{int(child["instance_id"])}">'
        f"#{int(child['instance_id'])}</a> {status_badge(str(child.get('status', '')))}</li>"
        for key, child in found.items()
    )
    return f'<p>children:</p><ul class="children">{items}</ul>'


def _child_workflows(base: str, children: Sequence[WorkflowInstanceRecord]) -> str:
    """The instance's child workflows (live statuses, from their rows), each linking to its page."""
    if not children:
        return ""
    rows = "".join(
        f'<tr data-child-id="{c.id}"><td><a href="{e(base)}/instances/{c.id}">#{c.id}</a></td>'
        f"<td>{e(c.workflow_type)}</td><td>{e(c.business_id)}</td>"
        f"<td><code>{e(c.parent_node or '')}</code></td>"
        f"<td>{e(c.child_key or '')}</td><td>{status_badge(c.status)}</td></tr>"
        for c in children
    )
    return (
        '<h2>Child workflows</h2><table id="children"><thead><tr><th>instance</th><th>type</th>'
        "<th>business id</th><th>node</th><th>key</th><th>status</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _node_detail(
    base: str, detail: WorkflowInstanceDetail, i: int, entry: TaskInstanceDetail, actions: bool
) -> str:
    error = last_error(entry)
    done = progress(entry)
    started = getattr(entry, "started_at", None)
    facts = [
        ("row id", entry.id or "-"),
        ("failed attempts", entry.fail_count),
        ("created", format_ts(entry.created_at)),
        ("updated", format_ts(entry.updated_at)),
    ]
    if started:
        facts.append(("started", format_ts(started)))
    age = in_flight_age(entry, time.time()) if not is_over_instance_status(detail.status) else None
    if age is not None:
        facts.append(("in flight for", format_age(age)))
    facts.append(("duration", _seconds(duration(entry))))
    facts_html = "".join(f"<span>{e(k)}: <b>{e(v)}</b></span>" for k, v in facts)
    parts = [
        f'<details class="node-detail" data-task-type="{e(entry.task_type)}">',
        f"<summary>{e(entry.task_name or entry.task_type)} <code>{e(entry.task_type)}</code> "
        f"{status_badge(entry.status)}</summary>",
        # the anchor is inside: following #node-N opens the closed details (no script needed)
        f'<p class="facts" id="node-{i}">{facts_html}</p>',
    ]
    if actions:
        parts.append(_node_actions(base, detail, entry))
    if error:
        parts.append(f'<p class="error">last error: {e(error)}</p>')
    if done is not None:
        parts.append(f'<p>progress:</p><pre class="progress">{e(format_json(done))}</pre>')
    parts.append(_children(base, entry))
    parts.append(f"<p>node context:</p><pre>{e(format_json(entry.node_context))}</pre></details>")
    return "".join(parts)


def _timing(entry: TaskInstanceDetail, now: float | None) -> str:
    """The duration of a finished node; ``running for 2m05s`` (and its progress) for one in flight."""
    age = in_flight_age(entry, now)
    if age is None:
        return e(_seconds(duration(entry)))
    text = f"{entry.status} for {format_age(age)}"
    done = progress(entry)
    if done is not None:
        text += f", progress {format_json(done, indent=None)[:80]}"
    return f'<span class="in-flight">{e(text)}</span>'


def _node_row(i: int, entry: TaskInstanceDetail, now: float | None) -> str:
    error = last_error(entry)
    return (
        f'<tr data-task-type="{e(entry.task_type)}"><td><a href="#node-{i}">{e(entry.task_type)}</a></td>'
        f"<td>{e(entry.task_name)}</td><td>{status_badge(entry.status)}</td>"
        f'<td class="num">{entry.fail_count}</td><td>{e(format_ts(entry.created_at))}</td>'
        f"<td>{e(format_ts(entry.updated_at))}</td><td>{_timing(entry, now)}</td>"
        f"<td>{e(error[:200])}</td></tr>"
    )


def instance_page(
    base: str,
    detail: WorkflowInstanceDetail,
    *,
    actions: bool,
    refresh: float,
    done: str | None = None,
    children: Sequence[WorkflowInstanceRecord] = (),
) -> str:
    """The whole instance page; ``actions`` adds the action links (dashboard not read-only);
    ``children``: the instance's child workflows (listed with links; the parent is linked too)."""
    running = not is_over_instance_status(detail.status)
    entries = {entry.task_type: entry for entry in detail.task_instances}
    nodes = nodes_of_detail(detail)
    legend = "".join(f'<span><i class="st-{e(status)}"></i>{e(status)}</span>' for status in STATUS_COLORS)
    facts = [
        ("business id", detail.business_id),
        ("task id", detail.task_id),
        ("created", format_ts(detail.created_at)),
        ("updated", format_ts(detail.updated_at)),
    ]
    facts_html = "".join(f"<span>{e(k)}: <b>{e(v)}</b></span>" for k, v in facts)
    parent = getattr(detail, "parent_id", None)
    if parent is not None:
        facts_html += (
            f'<span>parent: <a id="parent" href="{e(base)}/instances/{int(parent)}">#{int(parent)}</a></span>'
        )
    notes = []
    if done in DONE_MESSAGES:
        notes.append(f'<p class="ok" id="done">{e(DONE_MESSAGES[done])}</p>')
    if running:
        notes.append(f'<p class="note" id="live">Running: this page reloads every {refresh:g} s.</p>')
    if not any(n.next_nodes for n in nodes):
        notes.append(
            '<p class="note">The workflow definition is not loaded here: only created nodes are shown, '
            "without edges (run the dashboard with <code>--app module:attribute</code>).</p>"
        )
    top_actions = ""
    if actions and running:
        top_actions = (
            f'<p class="actions"><a id="cancel" href="{e(base)}/instances/{detail.id}/cancel">'
            "cancel instance</a></p>"
        )
    now = time.time() if running else None  # in-flight ages only while the instance runs
    rows = "".join(_node_row(i, entry, now) for i, entry in enumerate(detail.task_instances))
    details = "".join(
        _node_detail(base, detail, i, entry, actions) for i, entry in enumerate(detail.task_instances)
    )
    body = (
        f"<h1>{e(detail.workflow_type)} #{detail.id} {status_badge(detail.status, 'instance-status')}</h1>"
        f'<p class="facts">{facts_html}</p>{"".join(notes)}{top_actions}'
        f'<details><summary>workflow context</summary><pre id="workflow-context">'
        f"{e(format_json(detail.workflow_context))}</pre></details>"
        f'<div class="legend">{legend}</div>'
        f'<div id="canvas">{dag_svg(nodes, entries)}</div>'
        '<h2>Nodes</h2><table id="nodes"><thead><tr><th>node</th><th>name</th><th>status</th>'
        "<th>failed attempts</th><th>created</th><th>updated</th><th>duration / in flight</th>"
        "<th>last error</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>{_child_workflows(base, children)}{details}"
    )
    title = f"{detail.workflow_type} #{detail.id} ({detail.status})"
    return page(base, title, body, refresh=refresh if running else None)
