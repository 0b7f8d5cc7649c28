"""Retention: which terminal instances ``purge_workflow_instances`` deletes (argument checks)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

from .._numbers import finite
from .._text import shown, unstorable
from ..errors import ParamInvalidError
from ..status import InstanceStatus

__all__ = ["PURGEABLE_STATUSES", "PurgeRequest", "purge_request"]

#: The statuses an instance may be purged in (terminal ones).
PURGEABLE_STATUSES = (
    InstanceStatus.COMPLETED.value,
    InstanceStatus.FAILED.value,
    InstanceStatus.CANCELED.value,
)


@dataclass(frozen=True, slots=True)
class PurgeRequest:
    """Checked purge arguments: ``updated_before`` in unix seconds."""

    updated_before: int
    statuses: tuple[str, ...]
    workflow_types: tuple[str, ...] | None
    limit: int | None


def _strings(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ParamInvalidError(
            f"{name} must be a list of strings, got {type(value).__name__} {shown(value)}"
        )
    items = tuple(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ParamInvalidError(f"{name} must hold non-empty strings, got {shown(item)}")
        # what no database stores: PostgreSQL refused it with a raw driver error, the others matched nothing
        problem = unstorable(item)
        if problem is not None:
            raise ParamInvalidError(f"{name}: {item!r} {problem}")
    return items


_EARLIEST = -(2**62)  # the cut-off of an older_than that goes back further (fits any SQL BIGINT)


def purge_request(
    now: float,
    older_than: object,
    statuses: object,
    workflow_types: object,
    limit: object,
) -> PurgeRequest:
    """Check the arguments of ``purge_workflow_instances``; bad ones raise ``ParamInvalidError``."""
    seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not finite(seconds):
        raise ParamInvalidError(f"older_than must be seconds or a timedelta, got {shown(older_than)}")
    if seconds < 0:
        raise ParamInvalidError(f"older_than must not be negative, got {shown(older_than)}")
    wanted = _strings(statuses, "statuses")
    if not wanted:
        raise ParamInvalidError("statuses must name at least one status")
    for status in wanted:
        if status not in PURGEABLE_STATUSES:
            raise ParamInvalidError(
                f"cannot purge instances in status {shown(status)}: only {', '.join(PURGEABLE_STATUSES)}"
            )
    types = None if workflow_types is None else _strings(workflow_types, "workflow_types")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ParamInvalidError(f"limit must be a positive int or None, got {shown(limit)}")
    # an age reaching before 1970 by more than any stored time: nothing is older (and a cut-off
    # beyond 64 bits would overflow the database's integers)
    updated_before = max(math.floor(now - seconds), _EARLIEST)
    return PurgeRequest(updated_before, wanted, types, limit)
