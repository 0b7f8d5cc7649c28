"""Plain-text tables and the small formatting helpers the CLI and the demo print with.

Widths are terminal cells: East Asian wide characters (the Go node names ``开始节点``/``结束节点``) count
as two, so columns line up in a terminal.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Sequence
from typing import Any

from .._text import inert

__all__ = ["cell_width", "clip", "format_json", "format_table", "format_ts", "one_line"]


def cell_width(text: str) -> int:
    """Terminal cells ``text`` takes (wide and full-width characters count 2, combining marks 0)."""
    width = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def clip(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` cells, ending in ``…`` when cut."""
    if width <= 0:
        return ""
    if cell_width(text) <= width:
        return text
    out: list[str] = []
    used = 0
    for char in text:
        w = cell_width(char)
        if used + w > width - 1:
            break
        out.append(char)
        used += w
    return "".join(out) + "…"


def one_line(text: str) -> str:
    """Whitespace runs (newlines included) collapsed to single spaces."""
    return " ".join(text.split())


def _pad(text: str, width: int, right: bool) -> str:
    gap = " " * (width - cell_width(text))
    return gap + text if right else text + gap


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    right: Sequence[int] = (),
    max_width: dict[int, int] | None = None,
) -> str:
    """An aligned text table: a header line, a rule, one line per row (no trailing newline).

    Cells are ``str()``-ed, put on one line and made inert (control and bidi characters escaped);
    ``right`` lists the column indexes aligned right; ``max_width`` maps a column index to the most
    cells it may take (longer cells are clipped).
    """
    limits = max_width or {}
    table = [[inert(one_line(str(h))) for h in headers]]
    for row in rows:
        cells = [inert(one_line("" if cell is None else str(cell))) for cell in row]
        table.append([clip(c, limits[i]) if i in limits else c for i, c in enumerate(cells)])
    widths = [max(cell_width(line[i]) for line in table) for i in range(len(headers))]
    lines = []
    for n, line in enumerate(table):
        padded = [_pad(cell, widths[i], i in right) for i, cell in enumerate(line)]
        lines.append("  ".join(padded).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_ts(seconds: int | float | None) -> str:
    """Unix seconds as local ``YYYY-MM-DD HH:MM:SS``; ``-`` for 0 or ``None`` (never set)."""
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def format_json(value: Any, *, indent: int | None = 2) -> str:
    """JSON for people: sorted keys, non-ASCII kept, indented (compact with ``indent=None``)."""
    separators = (",", ": ") if indent is not None else (", ", ": ")
    return json.dumps(
        value, ensure_ascii=False, sort_keys=True, indent=indent, separators=separators, default=str
    )


def format_age(seconds: float) -> str:
    """A duration for people: ``45s``, ``3m05s``, ``2h03m``, ``4d02h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


IN_FLIGHT_STATUSES = ("running", "pending")
"""Node statuses of work in flight (``running``: in its ``run`` or waiting for a retry; ``pending``:
between its ``run`` and a successful ``wait_check``)."""


def progress_of(context: Any) -> Any:
    """The ``system.progress`` a heartbeat stored, or ``None``."""
    system = context.get("system") if isinstance(context, dict) else None
    return system.get("progress") if isinstance(system, dict) else None


def in_flight_text(status: str, started_at: int | None, context: Any, now: float, fail_count: int = 0) -> str:
    """``running 2m05s, progress {...}`` for a node in flight; ``-`` otherwise."""
    if status not in IN_FLIGHT_STATUSES:
        return "-"
    text = status if not started_at else f"{status} {format_age(now - started_at)}"
    if status == "running" and fail_count:
        text += f" (retry {fail_count})"
    progress = progress_of(context)
    if progress is not None:
        text += f", progress {format_json(progress, indent=None)}"
    return text
