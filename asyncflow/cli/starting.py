"""``asyncflow start`` (create an instance: delayed, unique, waited for) and ``asyncflow schedules``."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from .._json_depth import loads_json_checked
from .._schedule_states import stored_schedule_states
from ..engine.service import WorkflowService
from ..errors import DuplicateWorkflowError
from .app import load_app
from .backend import CLIError, open_service
from .table import format_table

__all__ = ["cmd_schedules", "cmd_start", "duration", "moment"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def duration(text: str) -> float:
    """``--start-in``: seconds, or a number with ``s``/``m``/``h``/``d`` (``90s``, ``10m``, ``2h``)."""
    found = _DURATION.match(text.strip())
    if found is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 30, 90s, 10m, 2h or 1d, got {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2) or "s"]


def moment(text: str) -> datetime:
    """``--start-at``: an ISO 8601 time with a UTC offset or ``Z`` (a naive time is refused)."""
    try:
        value = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time like 2030-01-01T09:00:00Z, got {text!r}"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone: add Z or an offset like +02:00")
    return value


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


@contextlib.asynccontextmanager
async def _app_service(args: argparse.Namespace) -> AsyncIterator[WorkflowService]:
    app = await load_app(args.app)
    if isinstance(app, WorkflowService):
        yield app
        return
    async with open_service(args.db, args.redis, app) as svc:
        yield svc


def _context(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = loads_json_checked(text, "--context")  # too deep, even for the decoder: exit 2
    except json.JSONDecodeError as error:
        raise CLIError(f"--context is not valid JSON: {error.msg} (at character {error.pos})", 2) from error
    if not isinstance(value, dict):
        raise CLIError(f"--context must be a JSON object, got {type(value).__name__}", 2)
    return value


async def cmd_start(args: argparse.Namespace) -> int:
    """Create an instance (printing its id); ``--wait`` waits for its end (exit 1 unless completed)."""
    context = _context(args.context)
    if args.timeout is not None and not args.wait:
        raise CLIError("--timeout needs --wait", 2)
    async with _app_service(args) as svc:
        try:
            inst = await svc.create_workflow(
                args.type,
                args.business_id,
                context=context,
                start_in=args.start_in,
                start_at=args.start_at,
                unique=args.unique,
                on_duplicate="raise",
            )
            when = "" if args.start_in is None and args.start_at is None else " (delayed)"
            _out(f"created workflow instance {inst.id} ({inst.workflow_type}, {inst.business_id}){when}")
            instance_id = inst.id
        except DuplicateWorkflowError as duplicate:
            instance_id = duplicate.instance_id
            _out(f"workflow instance {instance_id} already exists ({args.type}, {args.business_id})")
        if not args.wait:
            return 0
        try:
            final = await svc.wait_for_workflow(instance_id, timeout=args.timeout)
        except TimeoutError:
            raise CLIError(
                f"workflow instance {instance_id} did not end within {args.timeout:g} s", 1
            ) from None
    _out(f"workflow instance {instance_id} {final.status}")
    return 0 if final.status == "completed" else 1


def _tick_text(tick: datetime) -> str:
    return tick.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def cmd_schedules(args: argparse.Namespace) -> int:
    """The schedules of ``--app``: id, workflow, cron, time zone, next tick, last fired tick."""
    async with _app_service(args) as svc:
        schedules = svc.registry.schedules
        states = await stored_schedule_states(svc.repo)  # an older schema: InvalidStateError, exit 1
    if not schedules:
        _out("no schedules in this app")
        return 0
    now = datetime.fromtimestamp(time.time(), UTC)
    rows = []
    for schedule in schedules:
        state = states.get(schedule.id)
        last = state.last_tick if state is not None and state.last_tick else "-"
        rows.append(
            [
                schedule.id,
                schedule.workflow_type,
                schedule.cron,
                schedule.timezone,
                _tick_text(schedule.next_tick(now)),
                last,
            ]
        )
    _out(format_table(["ID", "WORKFLOW", "CRON", "TIME ZONE", "NEXT TICK", "LAST FIRED"], rows))
    return 0
