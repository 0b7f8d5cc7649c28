"""Page chrome and the list, schedules, confirmation and error pages (server-side HTML, no script).

Every value that comes from the database or the request goes through :func:`e`. Pages load one
stylesheet, from the dashboard itself; nothing else.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

from ..cli.graph import STATUS_COLORS
from ..cli.table import format_ts
from ._data import MAX_PAGE_SIZE, STATUSES, ListView
from ._security import CSRF_FIELD

__all__ = ["CSS", "confirm_page", "e", "error_page", "list_page", "page", "schedules_page", "status_badge"]


def e(text: object) -> str:
    """HTML-escaped text (quotes too, so it is safe in attributes)."""
    return html.escape(str(text), quote=True)


_STATUS_CSS = "\n".join(f".st-{status}{{background:{color}}}" for status, color in STATUS_COLORS.items())

CSS = (
    """
body{font-family:system-ui,"Noto Sans","Noto Sans CJK SC",sans-serif;margin:0;color:#111827;
  background:#f9fafb;font-size:14px}
nav{background:#111827;padding:10px 24px}
nav a{color:#f9fafb;margin-right:18px;text-decoration:none;font-weight:600}
main{padding:16px 24px}
h1{font-size:20px;margin:4px 0 12px}
h2{font-size:16px;margin:18px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f6}
td.num{text-align:right}
.badge{padding:1px 8px;border-radius:9px;border:1px solid #9ca3af;white-space:nowrap}
.counts a{margin-right:10px}
.counts a.on{font-weight:700}
form.filters{margin:0 0 12px;display:flex;gap:10px;align-items:end;flex-wrap:wrap}
form.filters label{display:flex;flex-direction:column;font-size:12px;color:#374151}
.pager{margin:10px 0}
.pager a,.pager span{margin-right:12px}
pre{white-space:pre-wrap;word-break:break-word;font-size:12px;background:#f3f4f6;padding:8px;margin:0}
.facts span{margin-right:18px}
.note{background:#fffbeb;border:1px solid #fde68a;padding:8px 12px;margin:8px 0}
.ok{background:#ecfdf5;border:1px solid #86efac;padding:8px 12px;margin:8px 0}
.error{background:#fef2f2;border:1px solid #fca5a5;padding:8px 12px;margin:8px 0}
#canvas{background:#fff;border:1px solid #e5e7eb;border-radius:6px;overflow:auto;max-height:70vh}
.edge{fill:none;stroke:#9ca3af;stroke-width:1.6}
.node rect{stroke:#374151;stroke-width:1.2}
.node.status-uncreated rect{stroke-dasharray:5 4;stroke:#9ca3af}
.node text{text-anchor:middle;font-size:13px}
.node text.name{font-weight:600}
.node text.type{font-size:11px;fill:#4b5563;font-family:ui-monospace,monospace}
.legend span{display:inline-block;margin:4px 10px 0 0;font-size:12px}
.legend i{display:inline-block;width:12px;height:12px;border:1px solid #6b7280;margin-right:4px}
details.node-detail{background:#fff;border:1px solid #e5e7eb;margin:6px 0;padding:6px 10px}
details.node-detail:has(:target){outline:2px solid #2563eb}
.actions form,.actions a{display:inline-block;margin-right:10px}
button{cursor:pointer}
"""
    + _STATUS_CSS
    + "\n"
)


def status_badge(status: str, element_id: str = "") -> str:
    ident = f' id="{e(element_id)}"' if element_id else ""
    css = f"st-{status}" if status in STATUS_COLORS else ""
    return f'<span class="badge {e(css)}"{ident} data-status="{e(status)}">{e(status)}</span>'


def page(base: str, title: str, body: str, *, refresh: float | None = None) -> str:
    """A whole page: ``body`` is HTML already escaped by the caller."""
    meta = f'<meta http-equiv="refresh" content="{refresh:g}">' if refresh else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{meta}
<title>{e(title)} · asyncflow</title>
<link rel="stylesheet" href="{e(base)}/static/dashboard.css">
<link rel="icon" href="{e(base)}/static/favicon.svg" type="image/svg+xml">
</head>
<body>
<nav><a href="{e(base)}/">Instances</a><a href="{e(base)}/schedules">Schedules</a></nav>
<main>
{body}
</main>
</body>
</html>
"""


def _filters_form(base: str, view: ListView) -> str:
    f = view.filters
    status = f.statuses[0] if len(f.statuses) == 1 else ""
    options = '<option value="">any</option>' + "".join(
        f'<option value="{e(s)}"{" selected" if s == status else ""}>{e(s)}</option>' for s in STATUSES
    )
    sizes = "".join(
        f'<option value="{n}"{" selected" if n == f.size else ""}>{n}</option>'
        for n in sorted({10, 20, 50, 100, MAX_PAGE_SIZE, f.size})
    )
    return (
        f'<form class="filters" method="get" action="{e(base)}/">'
        f'<label>type<input name="type" value="{e(", ".join(f.types))}"></label>'
        f'<label>status<select name="status">{options}</select></label>'
        f'<label>business id<input name="business_id" value="{e(f.business_id or "")}"></label>'
        f'<label>per page<select name="size">{sizes}</select></label>'
        '<button type="submit">Filter</button></form>'
    )


def _counts(base: str, view: ListView) -> str:
    f = view.filters
    on_all = ' class="on"' if not f.statuses else ""
    links = [
        f'<a href="{e(base)}/?{e(f.query(statuses=(), page=1))}"{on_all} id="count-all">'
        f"all {sum(view.counts.values())}</a>"
    ]
    for s in STATUSES:
        on = ' class="on"' if f.statuses == (s,) else ""
        links.append(
            f'<a href="{e(base)}/?{e(f.query(statuses=(s,), page=1))}"{on} id="count-{s}">'
            f"{status_badge(s)} {view.counts[s]}</a>"
        )
    return f'<p class="counts">{"".join(links)}</p>'


def _pager(base: str, view: ListView) -> str:
    f = view.filters
    parts = []
    if f.page > 1:
        parts.append(f'<a rel="prev" href="{e(base)}/?{e(f.query(page=f.page - 1))}">← newer</a>')
    parts.append(f"<span>page {f.page} of {view.pages} · {view.total} instances</span>")
    if f.page < view.pages:
        parts.append(f'<a rel="next" href="{e(base)}/?{e(f.query(page=f.page + 1))}">older →</a>')
    return f'<div class="pager">{"".join(parts)}</div>'


def list_page(base: str, view: ListView) -> str:
    """The instances page: filters, counts by status, one page of rows (newest first), paging."""
    rows = "".join(
        f'<tr data-id="{r.id}"><td class="num"><a href="{e(base)}/instances/{r.id}">{r.id}</a></td>'
        f"<td>{e(r.workflow_type)}</td><td>{e(r.business_id)}</td><td>{status_badge(r.status)}</td>"
        f"<td>{e(format_ts(r.created_at))}</td><td>{e(format_ts(r.updated_at))}</td></tr>"
        for r in view.instances
    )
    if not rows:
        rows = '<tr><td colspan="6">No instances match.</td></tr>'
    table = (
        '<table id="instances"><thead><tr><th>id</th><th>type</th><th>business id</th><th>status</th>'
        f"<th>created</th><th>updated</th></tr></thead><tbody>{rows}</tbody></table>"
    )
    body = (
        f"<h1>Workflow instances</h1>{_filters_form(base, view)}{_counts(base, view)}"
        f"{_pager(base, view)}{table}{_pager(base, view)}"
    )
    return page(base, "Instances", body)


def schedules_page(base: str, schedules: Sequence[dict[str, object]]) -> str:
    """The registry's schedules: id, workflow, cron, time zone, catch-up, next tick, last fired."""
    if not schedules:
        body = '<h1>Schedules</h1><p class="note" id="no-schedules">No schedules are registered.</p>'
    else:
        fields = ("id", "workflow_type", "cron", "timezone", "catch_up", "next_tick", "last_fired")
        rows = "".join(
            "<tr>" + "".join(f"<td>{e(s.get(name) or '-')}</td>" for name in fields) + "</tr>"
            for s in schedules
        )
        head = "".join(f"<th>{e(n.replace('_', ' '))}</th>" for n in fields)
        body = f'<h1>Schedules</h1><table id="schedules"><tr>{head}</tr>{rows}</table>'
    return page(base, "Schedules", body)


def error_page(base: str, status_code: int, message: str) -> str:
    body = f'<h1>Error {status_code}</h1><p class="error" id="error">{e(message)}</p>'
    return page(base, f"Error {status_code}", body)


def confirm_page(
    base: str,
    title: str,
    question: str,
    action: str,
    token: str,
    hidden: Iterable[tuple[str, str]],
    extra: str,
) -> str:
    """ "Are you sure?": a POST form carrying the CSRF token, ``hidden`` fields and ``extra`` inputs."""
    fields = "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in hidden)
    body = (
        f"<h1>{e(title)}</h1><p>{e(question)}</p>"
        f'<form method="post" action="{e(action)}" id="confirm-form">'
        f'<input type="hidden" name="{CSRF_FIELD}" value="{e(token)}">{fields}{extra}'
        '<p><button type="submit" id="confirm">Yes, do it</button></p></form>'
    )
    return page(base, title, body)
