"""Measured runs in a subprocess of their own, so a hung or crashed run cannot take the runner down.

The child (``python -m <module> ...``) prints one ``BENCH_RESULT {json}`` line with its
:class:`~benchmarks.harness.RunMeasurement`; the parent enforces a wall-clock limit (a run whose event
loop is starved cannot time itself out), kills the child past it, and drops the PostgreSQL databases
the child created (their names carry the child's pid).
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .databases import PgAdmin
from .harness import RunMeasurement

__all__ = ["RunFailedError", "print_result", "run_module"]

RESULT_PREFIX = "BENCH_RESULT "
REPO_ROOT = str(Path(__file__).resolve().parent.parent)


class RunFailedError(RuntimeError):
    """The subprocess of a run failed, printed no result, or did not finish in time."""


def print_result(measurement: RunMeasurement) -> None:
    """The child's side: print the result line (the last one wins)."""
    print(RESULT_PREFIX + json.dumps(asdict(measurement)), flush=True)


def _last_error_line(stderr: str) -> str:
    """The last line of ``stderr`` that names an error (else its last line): one line for the report."""
    lines = [line.strip(" |+-") for line in stderr.strip().splitlines() if line.strip(" |+-")]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line
    return lines[-1] if lines else "(no output)"


def _parse(data: dict[str, Any]) -> RunMeasurement:
    return RunMeasurement(**data)


async def run_module(
    module: str, args: list[str], *, timeout_s: float, pg_admin: PgAdmin | None = None
) -> RunMeasurement:
    """Run ``python -m module *args`` and return the measurement it printed.

    Raises :class:`RunFailedError` naming the child's last error line when it fails, and when it
    runs past ``timeout_s`` (the child is killed; with ``pg_admin`` its databases are dropped).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    timed_out = False
    try:
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await proc.communicate()
        except TimeoutError:
            timed_out = True
            proc.kill()
            out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    finally:
        if pg_admin is not None and proc.returncode is not None and proc.returncode != 0:
            await asyncio.shield(pg_admin.drop_databases_of(proc.pid))
    last = _last_error_line(err.decode(errors="replace"))
    if timed_out:
        raise RunFailedError(f"{module} did not finish within {timeout_s:.0f} s (killed); last error: {last}")
    lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RunFailedError(f"{module} failed (exit {proc.returncode}): {last}")
    return _parse(json.loads(lines[-1][len(RESULT_PREFIX) :]))
