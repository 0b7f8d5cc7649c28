"""``asyncflow purge``: delete old finished instances (and the duration syntax ``30d``, ``12h``)."""

from __future__ import annotations

import argparse
import re

from ..engine.retention import PURGEABLE_STATUSES, purge_request
from ..records import Pager, QueryWorkflowInstanceParams
from ..registry import Registry
from .backend import open_service

__all__ = ["cmd_purge", "duration"]

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
                older_than=args.older_than, statuses=statuses, workflow_types=types
            )
            print(f"purged {deleted} instance(s)")
            return 0
        request = purge_request(svc.clock.time(), args.older_than, statuses, types, None)
        count, last_id = 0, 0
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
            count += sum(1 for inst in page if inst.updated_at < request.updated_before)
            if len(page) < 500:
                break
            last_id = page[-1].id
    print(f"would purge {count} instance(s) (dry run: nothing deleted)")
    return 0
