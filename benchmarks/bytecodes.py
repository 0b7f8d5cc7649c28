"""Bytecodes per ``linear3`` workflow, per function: a profile that does not depend on the machine.

Wall-clock and CPU figures move with the machine and its load (the thirteenth round in README.md saw the
same code at 50% and at 100% of the floor on two machines). This counts what the interpreter executes:
every bytecode instruction of every Python function, and how many times each function was called
(``sys.monitoring`` on Python 3.12 or newer: calls are starts, and every thread counts; on 3.11
``sys.settrace`` with opcode events: calls also count each resumption of a coroutine, and only the
event loop's thread counts, so SQLite's thread is left out). It runs ``hot_path``'s rows twice,
with ``-n`` and with ``--base`` workflows, and reports the difference divided by the difference in
workflows, so that set-up, warm-up and the run's own start and end cancel out. Each run is a process of
its own (what a process does once, its first statement's preparation, the caches it fills, falls on
both alike).

    python -m benchmarks.bytecodes --backend postgres --rows direct -n 1300 --base 300
    python -m benchmarks.bytecodes --backend memory --rows direct,driver --top 40

A bytecode of a C call (``orjson.dumps``, a ``dict`` method) counts as one, whatever the call costs:
this is a count of the interpreter's work in Python code, not of the time. It costs the run about forty
times its normal time. Two runs of the same tree differ by under 1% (how steps fall into batches
depends on timing).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
from types import CodeType, FrameType
from typing import Any

from . import hot_path

TOOL_ID = 4  # sys.monitoring's free ids are 0-5; 0-2 are for debuggers, coverage and profilers


def _label(code: CodeType) -> str:
    path = code.co_filename
    for marker in ("/site-packages/", "/asyncflow/", "/benchmarks/", "/lib/python"):
        at = path.rfind(marker)
        if at >= 0:
            path = path[at + 1 :]
            break
    return f"{path}:{code.co_firstlineno}:{code.co_qualname}"


def count(argv: list[str]) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Bytecodes and calls per function during ``hot_path`` with ``argv``."""
    instructions: collections.Counter[CodeType] = collections.Counter()
    calls: collections.Counter[CodeType] = collections.Counter()
    if hasattr(sys, "monitoring"):
        _monitored(argv, instructions, calls)
    else:
        _traced(argv, instructions, calls)
    by_label: collections.Counter[str] = collections.Counter()
    calls_by_label: collections.Counter[str] = collections.Counter()
    for code, n in instructions.items():
        by_label[_label(code)] += n
    for code, n in calls.items():
        calls_by_label[_label(code)] += n
    return by_label, calls_by_label


def _traced(
    argv: list[str], instructions: collections.Counter[CodeType], calls: collections.Counter[CodeType]
) -> None:
    """Python 3.11: ``sys.settrace`` with ``f_trace_opcodes`` (each frame's opcodes)."""

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            instructions[frame.f_code] += 1
        return local

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        if event != "call":
            return None
        calls[frame.f_code] += 1
        frame.f_trace_opcodes = True
        return local

    sys.settrace(on_call)
    try:
        asyncio.run(hot_path.main(hot_path.parse(argv)))
    finally:
        sys.settrace(None)


def _monitored(
    argv: list[str], instructions: collections.Counter[CodeType], calls: collections.Counter[CodeType]
) -> None:
    """Python 3.12+: ``sys.monitoring``'s INSTRUCTION and PY_START events."""
    monitoring: Any = getattr(sys, "monitoring")  # noqa: B009 - mypy checks against 3.11

    def on_instruction(code: CodeType, offset: int) -> None:
        instructions[code] += 1

    def on_start(code: CodeType, offset: int) -> None:
        calls[code] += 1

    events = monitoring.events
    monitoring.use_tool_id(TOOL_ID, "asyncflow-bytecodes")
    try:
        monitoring.register_callback(TOOL_ID, events.INSTRUCTION, on_instruction)
        monitoring.register_callback(TOOL_ID, events.PY_START, on_start)
        monitoring.set_events(TOOL_ID, events.INSTRUCTION | events.PY_START)
        try:
            asyncio.run(hot_path.main(hot_path.parse(argv)))
        finally:
            monitoring.set_events(TOOL_ID, 0)
    finally:
        monitoring.free_tool_id(TOOL_ID)


def report(
    high: tuple[collections.Counter[str], collections.Counter[str]],
    low: tuple[collections.Counter[str], collections.Counter[str]],
    workflows: int,
    top: int,
) -> dict[str, Any]:
    """Per workflow: the total, the share of each file, and the ``top`` functions."""
    per_function = {
        label: (
            (n - low[0].get(label, 0)) / workflows,
            (high[1].get(label, 0) - low[1].get(label, 0)) / workflows,
        )
        for label, n in high[0].items()
    }
    total = sum(n for n, _ in per_function.values())
    files: dict[str, float] = collections.defaultdict(float)
    for label, (n, _) in per_function.items():
        files[label.split(":", 1)[0]] += n
    print(f"bytecodes per workflow: {total:,.0f}")
    print("\nby file:")
    for path, n in sorted(files.items(), key=lambda item: -item[1])[:15]:
        print(f"{n:9,.0f} {n / total:6.1%}  {path}")
    print(f"\ntop {top} functions (bytecodes, share, calls per workflow):")
    ranked = sorted(per_function.items(), key=lambda item: -item[1][0])[:top]
    for label, (n, called) in ranked:
        print(f"{n:9,.0f} {n / total:6.1%} {called:7.2f}  {label}")
    return {"total": total, "files": dict(files), "functions": dict(ranked)}


def _count_in_process(argv: list[str]) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """:func:`count` in a new process (``--count-only``), which writes its counts as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "counts.json")
        command = [sys.executable, "-m", "benchmarks.bytecodes", "--count-only", out, "--", *argv]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            instructions, calls = json.load(f)
    return collections.Counter(instructions), collections.Counter(calls)


def main(argv: list[str]) -> dict[str, dict[str, Any]]:
    if argv[:1] == ["--count-only"]:  # a run of _count_in_process: hot_path's arguments after "--"
        instructions, calls = count(argv[3:])
        with open(argv[1], "w") as f:
            json.dump([instructions, calls], f)
        return {}
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bytecodes", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--backend", default="postgres", help="one of hot_path's backends")
    parser.add_argument("--rows", default="direct", help="hot_path rows (not floor), each counted on its own")
    parser.add_argument("-n", type=int, default=1300)
    parser.add_argument("--base", type=int, default=300, help="the run whose counts are taken away")
    parser.add_argument("-c", type=int, default=32)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--pg-url", default=hot_path.PG_URL)
    args = parser.parse_args(argv)
    if args.n <= args.base:
        parser.error("-n must be larger than --base")
    results = {}
    for row in args.rows.split(","):
        common = ["--backend", args.backend, "--rows", row, "-c", str(args.c), "--repeat", "1"]
        common += ["--pg-url", args.pg_url]
        high = _count_in_process([*common, "-n", str(args.n)])
        low = _count_in_process([*common, "-n", str(args.base)])
        print(f"\n== {args.backend} {row} (I({args.n}) - I({args.base})) ==")
        results[row] = report(high, low, args.n - args.base, args.top)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
