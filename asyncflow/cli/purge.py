"""``asyncflow purge``: delete old finished instances (and the duration syntax ``30d``, ``12h``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..engine.retention import PURGEABLE_STATUSES, purge_request
from ..errors import AsyncflowError
from ..records import Pager, QueryWorkflowInstanceParams
from ..registry import Registry
from ..status import RUNNABLE_INSTANCE_STATUSES
from .backend import open_service

if TYPE_CHECKING:
    from ..engine.service import WorkflowService

__all__ = ["cmd_purge", "duration", "retaining"]

logger = logging.getLogger("asyncflow.worker")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or plain seconds, for argparse."""
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 30d, 12h, 90m or seconds, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


async def cmd_purge(args: argparse.Namespace) -> int:
    """Delete finished instances last updated more than ``--older-than`` ago (``--dry-run``: count)."""
    statuses = tuple(args.status or PURGEABLE_STATUSES)
    types = tuple(args.type) if args.type else None
    async with open_service(args.db, args.redis, Registry()) as svc:
        if not args.dry_run:
            deleted = await svc.purge_workflow_instances(
                older_than=args.older_than, statuses=statuses, workflow_types=types, limit=args.limit
            )
            print(f"purged {deleted} instance(s)")
            return 0
        request = purge_request(svc.clock.time(), args.older_than, statuses, types, None)
        count, last_id = 0, 0
        active: dict[int, bool] = {}  # parent id -> still active (a purge keeps its finished children)

        async def parent_waits(parent_id: int | None) -> bool:
            if parent_id is None:
                return False
            if parent_id not in active:
                parent = await svc.repo.get_workflow_instance(parent_id)
                active[parent_id] = parent is not None and parent.status in RUNNABLE_INSTANCE_STATUSES
            return active[parent_id]

        while True:  # read-only: pages of ids, oldest first
            page = await svc.query_workflow_instances(
                QueryWorkflowInstanceParams(
                    status_in=request.statuses,
                    workflow_type_in=request.workflow_types or (),
                    id_greater_than=last_id,
                    order_by_id_asc=True,
                    page=Pager(page=1, size=500),
                )
            )
            for inst in page:
                if inst.updated_at < request.updated_before and not await parent_waits(inst.parent_id):
                    count += 1
            if len(page) < 500 or (args.limit is not None and count >= args.limit):
                break
            last_id = page[-1].id
    if args.limit is not None:
        count = min(count, args.limit)
    print(f"would purge {count} instance(s) (dry run: nothing deleted)")
    return 0


@contextlib.asynccontextmanager
async def retaining(
    svc: WorkflowService, retain: float | None, interval: float | None = None
) -> AsyncIterator[asyncio.Task[None] | None]:
    """While the block runs, purge finished instances older than ``retain`` seconds every ``interval``
    (default ``retain / 10``, between 1 s and 1 h) in a task named ``asyncflow-worker-purge``; the task
    is cancelled and awaited when the block ends. ``retain=None``: nothing runs."""
    if retain is None:
        yield None
        return
    pause = interval if interval is not None else min(max(retain / 10, 1.0), 3600.0)

    async def loop() -> None:
        while True:
            try:
                await svc.purge_workflow_instances(older_than=retain)  # logs what it deleted
            except AsyncflowError as error:  # a database hiccup: try again next round
                logger.warning("retention: purge failed: %s", error)
            await asyncio.sleep(pause)

    task = asyncio.create_task(loop(), name="asyncflow-worker-purge")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
