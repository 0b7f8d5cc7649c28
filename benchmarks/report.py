"""Turning measurements into result rows, a printed table, the JSON file and the README's results table."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import RunMeasurement, cpu_count, percentile, summarize

__all__ = [
    "README_END",
    "README_START",
    "RowKey",
    "aggregate",
    "attach_ratios",
    "environment",
    "format_table",
    "markdown_table",
    "update_readme",
    "write_json",
]

README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"
JSON_SCHEMA_VERSION = 1
_PACKAGES = ("asyncflow", "sqlalchemy", "asyncpg", "aiosqlite", "redis", "dbos", "psutil")


@dataclass(frozen=True, slots=True)
class RowKey:
    """What identifies a result row. ``kind`` is ``asyncflow``, ``dbos`` or ``floor``; for DBOS ``mode``
    is its launch mode and for the floor ``raw``; ``lock`` is ``None`` for the references."""

    kind: str
    scenario: str
    mode: str
    backend: str
    lock: str | None
    n: int
    concurrency: int
    node_count: int
    observer: str | None = None  # asyncflow rows: the service's observers (None: not asked for)
    visible_after: str | None = None  # asyncflow rows: the service's visible_after (None: not asked for)
    backlog: int = 0  # instances queued (due) before the timed part (``--backlog``)

    def label(self) -> str:
        lock = f"/{self.lock}" if self.lock else ""
        obs = f" observer={self.observer}" if self.observer else ""
        obs += f" visible_after={self.visible_after}" if self.visible_after else ""
        queued = f" backlog={self.backlog}" if self.backlog else ""
        where = f"{self.backend}{lock} n={self.n}{queued} c={self.concurrency}"
        return f"{self.kind} {self.scenario} {self.mode} {where}{obs}"


def aggregate(key: RowKey, runs: Sequence[RunMeasurement]) -> dict[str, Any]:
    """The JSON row of ``runs`` (the repeats of one row): medians with min and max, pooled latencies."""
    wfs = summarize([run.workflows_per_s for run in runs])
    steps = summarize([run.workflows_per_s * key.node_count for run in runs])
    latencies = [value for run in runs for value in run.latencies_s]
    commits = [run.commits / run.n for run in runs if run.commits is not None]
    writes = [run.write_commits / run.n for run in runs if run.write_commits is not None]
    row: dict[str, Any] = {
        "kind": key.kind,
        "scenario": key.scenario,
        "mode": key.mode,
        "backend": key.backend,
        "lock": key.lock,
        "observer": key.observer,
        "visible_after": key.visible_after,
        "n": key.n,
        "backlog": key.backlog,
        "concurrency": key.concurrency,
        "repeats": len(runs),
        "workflows_per_s": wfs.as_dict(1),
        "node_steps_per_s": steps.as_dict(1),
        "nodes_per_workflow": key.node_count,
        "commits_per_workflow": round(summarize(commits).median, 2) if commits else None,
        "writes_per_workflow": round(summarize(writes).median, 2) if writes else None,
        "latency_ms": {
            "p50": round(percentile(latencies, 50) * 1000, 2) if latencies else None,
            "p99": round(percentile(latencies, 99) * 1000, 2) if latencies else None,
            "samples": len(latencies),
        },
        "cpu_ms_per_workflow": round(summarize([run.cpu_s / run.n * 1000 for run in runs]).median, 3),
        "peak_rss_mib": round(max(run.peak_rss_bytes for run in runs) / 2**20, 1),
        "setup_s": round(summarize([run.setup_s for run in runs]).median, 3),
        "ratio_vs_dbos": None,
        "fraction_of_floor": None,
    }
    step_counts = [run.extra["steps"] / run.n for run in runs if "steps" in run.extra]
    if step_counts:
        row["steps_per_workflow"] = summarize(step_counts).as_dict(3)
    extras = [run.extra for run in runs if run.extra]
    if extras:
        row["extra"] = extras
    return row


def attach_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill ``ratio_vs_dbos`` and ``fraction_of_floor`` of the asyncflow rows from this run's references.

    DBOS rows match on shape, backend, n and concurrency; the floor (a ``linear3`` shape) on backend, n
    and concurrency, and only ``linear3`` rows get a fraction.
    """
    for row in rows:
        if row["kind"] != "asyncflow":
            continue
        mine = row["workflows_per_s"]["median"]
        for ref in rows:
            same = (ref["backend"], ref["n"], ref["concurrency"], ref.get("backlog", 0)) == (
                row["backend"],
                row["n"],
                row["concurrency"],
                row.get("backlog", 0),
            )
            if not same:
                continue
            theirs = ref["workflows_per_s"]["median"]
            if ref["kind"] == "dbos" and ref["scenario"] == row["scenario"] and theirs > 0:
                row["ratio_vs_dbos"] = round(mine / theirs, 2)
            if ref["kind"] == "floor" and row["scenario"] == "linear3" and theirs > 0:
                row["fraction_of_floor"] = round(mine / theirs, 3)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return round(pages * page_size / 2**30, 1)


def environment(*, postgres: str | None = None, redis: str | None = None) -> dict[str, Any]:
    """Versions and machine of this run (server versions as the caller found them)."""
    versions = {package: _version(package) for package in _PACKAGES}
    versions["python"] = platform.python_version()
    versions["sqlite"] = sqlite3.sqlite_version
    versions["postgresql_server"] = postgres
    versions["redis_server"] = redis
    return {
        "versions": versions,
        "machine": {
            "cpu": _cpu_model(),
            "cores": cpu_count(),
            "memory_gib": _memory_gib(),
            "platform": platform.platform(),
            "implementation": sys.implementation.name,
        },
    }


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _spread(value: dict[str, float]) -> str:
    return f"{value['median']:,.0f} [{value['min']:,.0f}-{value['max']:,.0f}]"


def _runs(row: dict[str, Any]) -> str:
    """Runs the medians come from; ``2/3`` when one of three failed."""
    failed = int(row.get("failed_runs") or 0)
    return f"{row['repeats']}/{row['repeats'] + failed}" if failed else str(row["repeats"])


def _opt(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


_HEADERS = (
    "row", "scenario", "mode", "backend", "lock", "N", "c", "runs", "wf/s [min-max]", "steps/s",
    "commits/wf", "writes/wf", "p50 ms", "p99 ms", "CPU ms/wf", "RSS MiB", "vs DBOS", "of floor",
)  # fmt: skip


def _kind(row: dict[str, Any]) -> str:
    kind = f"{row['kind']}+{row['observer']}" if row.get("observer") else row["kind"]
    return kind + (f" va={row['visible_after']}" if row.get("visible_after") else "")


def _cells(row: dict[str, Any]) -> list[str]:
    latency = row["latency_ms"]
    return [
        _kind(row),
        row["scenario"],
        row["mode"],
        row["backend"],
        row["lock"] or "-",
        f"{row['n']:,}" + (f" +{row['backlog']:,} queued" if row.get("backlog") else ""),
        str(row["concurrency"]),
        _runs(row),
        _spread(row["workflows_per_s"]),
        f"{row['node_steps_per_s']['median']:,.0f}",
        _opt(row["commits_per_workflow"], "{:.2f}"),
        _opt(row["writes_per_workflow"], "{:.2f}"),
        _opt(latency["p50"], "{:.1f}"),
        _opt(latency["p99"], "{:.1f}"),
        f"{row['cpu_ms_per_workflow']:.2f}",
        f"{row['peak_rss_mib']:.0f}",
        _opt(row["ratio_vs_dbos"], "{:.1f}x"),
        _opt(row["fraction_of_floor"], "{:.0%}"),
    ]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table for the terminal."""
    table = [list(_HEADERS)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADERS))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "---|" * len(_HEADERS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def _machine_line(env: dict[str, Any]) -> str:
    machine, versions = env["machine"], env["versions"]
    parts = [
        f"{machine['cores']} cores ({machine['cpu']})",
        f"{machine['memory_gib']} GiB" if machine.get("memory_gib") else None,
        f"Python {versions['python']}",
        f"PostgreSQL {versions['postgresql_server']}" if versions.get("postgresql_server") else None,
        f"Redis {versions['redis_server']}" if versions.get("redis_server") else None,
        f"SQLite {versions['sqlite']}",
        f"SQLAlchemy {versions['sqlalchemy']}",
        f"asyncpg {versions['asyncpg']}" if versions.get("asyncpg") else None,
        f"DBOS {versions['dbos']}" if versions.get("dbos") else None,
    ]
    load = machine.get("load_average_1m")
    if load and load.get("start") is not None:
        parts.append(f"1-min load average {load['start']} at the start, {load['end']} at the end")
    return ", ".join(part for part in parts if part)


def results_section(payload: dict[str, Any]) -> str:
    """The README block between the markers: when, where, the command, the table and any skips."""
    lines = [
        f"Measured {payload['generated_at']} on {_machine_line(payload['environment'])}.",
        "",
        f"Command: `{payload['command']}`",
        "",
        markdown_table(payload["results"]),
    ]
    if payload.get("skipped"):
        lines += ["", "Skipped or failed rows:", ""]
        lines += [f"- {item['row']}: {item['reason']}" for item in payload["skipped"]]
    return "\n".join(lines)


def update_readme(path: str | Path, payload: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
    """Replace the text between :data:`README_START` and :data:`README_END` in ``path``.

    Several payloads (runs) give one section each, in order, each with its own time and command.
    """
    readme = Path(path)
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {README_START} ... {README_END} markers")
    payloads = [payload] if isinstance(payload, dict) else list(payload)
    sections = "\n\n".join(results_section(item) for item in payloads)
    block = f"{README_START}\n{sections}\n{README_END}"
    readme.write_text(pattern.sub(lambda _: block, text, count=1), encoding="utf-8")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
