"""``asyncflow show ID --html FILE``: one self-contained HTML page drawing an instance's DAG.

The page needs no network: inline CSS, an inline SVG laid out here (see :func:`asyncflow.cli.graph.layout`)
and a few lines of inline JavaScript. Each node is coloured by its status; hovering shows its context
(an SVG ``<title>``), clicking shows everything about it in the side panel. ``#node=<task type>`` in the
URL selects a node when the page opens.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from ..records import TaskInstanceDetail, WorkflowInstanceDetail
from ..status import END_NODE, ROOT_NODE, instance_status_text, task_status_text
from .graph import STATUS_COLORS, GraphNode, layout, nodes_of_detail
from .table import clip, format_json, format_ts

__all__ = ["render_instance_html"]

NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 210, 74, 34, 60, 24
_TITLE_LIMIT = 1500


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _script_json(value: Any) -> str:
    """JSON that is safe inside ``<script>`` (no ``</script>``, no HTML-significant characters)."""
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _node_data(entry: TaskInstanceDetail) -> dict[str, Any]:
    return {
        "task_type": entry.task_type,
        "task_name": entry.task_name,
        "status": entry.status,
        "status_text": task_status_text(entry.status),
        "fail_count": entry.fail_count,
        "id": entry.id,
        "created_at": format_ts(entry.created_at),
        "updated_at": format_ts(entry.updated_at),
        "pre_nodes": list(entry.pre_nodes_keys),
        "next_nodes": list(entry.next_nodes_keys),
        "node_context": entry.node_context,
    }


def _last_error(entry: TaskInstanceDetail) -> str:
    system = (entry.node_context or {}).get("system")
    if isinstance(system, dict) and system.get("last_error"):
        return str(system["last_error"])
    return ""


def _svg(nodes: Sequence[GraphNode], entries: dict[str, TaskInstanceDetail]) -> str:
    ranks = layout(nodes).ranks
    widest = max((len(row) for row in ranks), default=1)
    width = MARGIN * 2 + widest * NODE_W + (widest - 1) * GAP_X
    height = MARGIN * 2 + len(ranks) * NODE_H + max(len(ranks) - 1, 0) * GAP_Y
    pos: dict[str, tuple[float, float]] = {}
    for r, row in enumerate(ranks):
        row_width = len(row) * NODE_W + (len(row) - 1) * GAP_X
        left = (width - row_width) / 2
        for i, node_id in enumerate(row):
            pos[node_id] = (left + i * (NODE_W + GAP_X), MARGIN + r * (NODE_H + GAP_Y))
    out = [
        f'<svg id="dag" role="img" aria-label="workflow DAG" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#6b7280"/></marker></defs>',
    ]
    for n in nodes:
        x1, y1 = pos[n.task_type]
        for target in n.next_nodes:
            if target not in pos:
                continue
            x2, y2 = pos[target]
            sx, sy, tx, ty = x1 + NODE_W / 2, y1 + NODE_H, x2 + NODE_W / 2, y2
            bend = max((ty - sy) / 2, 20)
            out.append(
                f'<path class="edge" data-from="{_e(n.task_type)}" data-to="{_e(target)}" '
                f'd="M {sx:.1f} {sy:.1f} C {sx:.1f} {sy + bend:.1f}, {tx:.1f} {ty - bend:.1f}, {tx:.1f} '
                f'{ty - 2:.1f}" marker-end="url(#arrow)"/>'
            )
    for n in nodes:
        x, y = pos[n.task_type]
        entry = entries.get(n.task_type)
        status = n.status or "uncreated"
        color = STATUS_COLORS.get(status, "#ffffff")
        context = format_json(entry.node_context if entry else None)
        if len(context) > _TITLE_LIMIT:
            context = context[:_TITLE_LIMIT] + "\n… (click the node for all of it)"
        error = _last_error(entry) if entry else ""
        title = f"{n.label} [{n.task_type}]\nstatus: {status} ({task_status_text(status)})"
        title += f"\nfail count: {n.fail_count}" + (f"\nlast error: {error}" if error else "")
        title += f"\ncontext:\n{context}"
        rx = 28 if n.task_type in (ROOT_NODE, END_NODE) else 8
        state_line = status + (
            f" · {n.fail_count} fail{'s' if n.fail_count != 1 else ''}" if n.fail_count else ""
        )
        out.append(
            f'<g class="node status-{_e(status)}" tabindex="0" data-task-type="{_e(n.task_type)}" '
            f'data-status="{_e(status)}" transform="translate({x:.1f},{y:.1f})">'
            f"<title>{_e(title)}</title>"
            f'<rect width="{NODE_W}" height="{NODE_H}" rx="{rx}" fill="{color}"/>'
            f'<text class="name" x="{NODE_W / 2}" y="25">{_e(clip(n.label, 26))}</text>'
            f'<text class="type" x="{NODE_W / 2}" y="43">{_e(clip(n.task_type, 34))}</text>'
            f'<text class="state" x="{NODE_W / 2}" y="61">{_e(clip(state_line, 34))}</text></g>'
        )
    out.append("</svg>")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,"Noto Sans CJK SC","Noto Sans",sans-serif;margin:0;color:#111827;
  background:#f9fafb}
header{padding:14px 24px;background:#fff;border-bottom:1px solid #e5e7eb}
h1{font-size:18px;margin:0 0 6px}
.facts span{margin-right:18px;font-size:13px;color:#374151}
.badge{padding:1px 8px;border-radius:9px;border:1px solid #9ca3af}
main{display:flex;gap:16px;padding:16px 24px;align-items:flex-start}
#canvas{background:#fff;border:1px solid #e5e7eb;border-radius:6px;overflow:auto;flex:1 1 auto}
aside{width:380px;flex:0 0 380px;background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:12px}
aside h2{font-size:15px;margin:0 0 8px}
pre{white-space:pre-wrap;word-break:break-word;font-size:12px;background:#f3f4f6;padding:8px;margin:0}
.edge{fill:none;stroke:#9ca3af;stroke-width:1.6}
.node{cursor:pointer}
.node rect{stroke:#374151;stroke-width:1.2}
.node.status-uncreated rect{stroke-dasharray:5 4;stroke:#9ca3af}
.node.selected rect{stroke:#2563eb;stroke-width:3}
.node text{text-anchor:middle;font-size:13px}
.node text.name{font-weight:600}
.node text.type{font-size:11px;fill:#4b5563;font-family:ui-monospace,monospace}
.node text.state{font-size:12px;fill:#111827}
.legend span{display:inline-block;margin:4px 10px 0 0;font-size:12px}
.legend i{display:inline-block;width:12px;height:12px;border:1px solid #6b7280;margin-right:4px;
  vertical-align:-2px}
details{margin-top:6px;font-size:13px}
"""

_JS = """
(function(){
  var data = JSON.parse(document.getElementById('nodes-data').textContent);
  var title = document.getElementById('panel-title'), body = document.getElementById('panel-body');
  function select(taskType){
    var node = data[taskType];
    if(!node){return;}
    document.querySelectorAll('.node').forEach(function(g){
      g.classList.toggle('selected', g.getAttribute('data-task-type') === taskType);
    });
    title.textContent = (node.task_name || node.task_type) + ' [' + node.task_type + '] ' + node.status;
    body.textContent = JSON.stringify(node, null, 2);
    document.getElementById('panel').setAttribute('data-selected', taskType);
  }
  document.querySelectorAll('.node').forEach(function(g){
    var pick = function(){ var t = g.getAttribute('data-task-type'); select(t);
      history.replaceState(null, '', '#node=' + encodeURIComponent(t)); };
    g.addEventListener('click', pick);
    g.addEventListener('keydown', function(e){ if(e.key === 'Enter'){ pick(); } });
  });
  var m = /^#node=(.*)$/.exec(location.hash);
  if(m){ select(decodeURIComponent(m[1])); }
})();
"""


def render_instance_html(detail: WorkflowInstanceDetail, *, generated_at: int | None = None) -> str:
    """The whole page for one instance (a ``str`` to write as UTF-8)."""
    nodes = nodes_of_detail(detail)
    entries = {entry.task_type: entry for entry in detail.task_instances}
    edges_known = any(n.next_nodes for n in nodes)
    legend = "".join(
        f'<span><i style="background:{color}"></i>{_e(status)}</span>'
        for status, color in STATUS_COLORS.items()
    )
    notice = (
        ""
        if edges_known
        else "<p><b>The workflow definition was not loaded</b>: only created nodes are shown, without "
        "edges. Pass <code>--app module:attribute</code> to draw the whole DAG.</p>"
    )
    facts = [
        ("instance", detail.id),
        ("type", detail.workflow_type),
        ("business id", detail.business_id),
        ("task id", detail.task_id),
        ("created", format_ts(detail.created_at)),
        ("updated", format_ts(detail.updated_at)),
    ]
    facts_html = "".join(f"<span>{_e(k)}: <b>{_e(v)}</b></span>" for k, v in facts)
    status = detail.status
    badge = STATUS_COLORS.get(status, "#ffffff")
    generated = f" · page made {format_ts(generated_at)}" if generated_at else ""
    status_html = f"{_e(status)} · {_e(instance_status_text(status))}"
    data = _script_json({e.task_type: _node_data(e) for e in detail.task_instances})
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(detail.workflow_type)} #{_e(detail.id)} ({_e(status)}) · asyncflow</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{_e(detail.workflow_type)} #{_e(detail.id)}
<span class="badge" id="instance-status" style="background:{badge}">{status_html}</span></h1>
<div class="facts">{facts_html}</div>
<details><summary>workflow context</summary>
<pre id="workflow-context">{_e(format_json(detail.workflow_context))}</pre></details>
<div class="legend">{legend}</div>
{notice}
</header>
<main>
<div id="canvas">
{_svg(nodes, entries)}
</div>
<aside id="panel">
<h2 id="panel-title">Click a node</h2>
<pre id="panel-body">Hover a node for its context; click it for everything about it.{_e(generated)}</pre>
</aside>
</main>
<script type="application/json" id="nodes-data">{data}</script>
<script>{_JS}</script>
</body>
</html>
"""
