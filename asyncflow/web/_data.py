"""What the pages and the JSON API show, read through the public ``WorkflowService`` / ``WorkflowRepo``.

The list reads one page of instances (newest first) and the counts by status for the type and
business-id filters. A repo may offer ``count_workflow_instances_by_status(params) -> {status: n}``
(one grouped query); without it the counts are one ``count_workflow_instances`` per status.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from ..engine.service import WorkflowService
from ..errors import InstanceNotFoundError, ParamInvalidError
from ..records import (
    Pager,
    QueryWorkflowInstanceParams,
    TaskInstanceDetail,
    WorkflowInstanceDetail,
    WorkflowInstanceRecord,
)
from ..status import InstanceStatus, is_over_instance_status, is_over_task_status

__all__ = [
    "MAX_PAGE_SIZE",
    "MAX_TYPES",
    "STATUSES",
    "ListFilters",
    "ListView",
    "child_dict",
    "children",
    "count_by_status",
    "duration",
    "instance_dict",
    "last_error",
    "load_children",
    "load_detail",
    "load_list",
    "node_dict",
    "progress",
    "record_dict",
]

STATUSES = tuple(s.value for s in InstanceStatus)
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 200
MAX_TYPES = 100  # workflow types one list filters by (each is a bound parameter of every count)
_BUSINESS_ID_LIMIT = 512


def _int(values: Sequence[str], name: str, default: int, low: int, high: int) -> int:
    if not values or values[-1] == "":
        return default
    try:
        value = int(values[-1])
    except ValueError:
        raise ParamInvalidError(f"{name} must be an integer, got {values[-1]!r}") from None
    if not low <= value <= high:
        raise ParamInvalidError(f"{name} must be between {low} and {high}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class ListFilters:
    """The list page's filters and paging, as parsed from the query string."""

    types: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    business_id: str | None = None
    page: int = 1
    size: int = DEFAULT_PAGE_SIZE

    @classmethod
    def parse(cls, multi: Mapping[str, Sequence[str]]) -> ListFilters:
        """From ``{name: [values]}``; ``type`` (also comma-separated) and ``status`` repeat.

        Bad values raise ``ParamInvalidError``.
        """
        named = (t.strip() for value in multi.get("type", ()) for t in value.split(","))
        types = tuple(dict.fromkeys(t for t in named if t))
        if len(types) > MAX_TYPES:
            raise ParamInvalidError(f"filter by at most {MAX_TYPES} workflow types, got {len(types)}")
        statuses = tuple(dict.fromkeys(s for s in multi.get("status", ()) if s))
        unknown = [s for s in statuses if s not in STATUSES]
        if unknown:
            raise ParamInvalidError(f"unknown status {unknown[0]!r}; expected one of {', '.join(STATUSES)}")
        business = [b for b in multi.get("business_id", ()) if b.strip()]
        business_id = business[-1].strip() if business else None
        if business_id is not None and (len(business_id) > _BUSINESS_ID_LIMIT or "\x00" in business_id):
            raise ParamInvalidError("business_id is too long or holds a NUL character")
        page = _int(multi.get("page", ()), "page", 1, 1, 10**9)
        size = _int(multi.get("size", ()), "size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        return cls(types, statuses, business_id, page, size)

    def query(self, **changes: Any) -> str:
        """The query string of these filters with ``changes`` applied (for links), without ``?``."""
        f = dataclasses.replace(self, **changes)
        pairs: list[tuple[str, str]] = [("type", t) for t in f.types]
        pairs += [("status", s) for s in f.statuses]
        if f.business_id:
            pairs.append(("business_id", f.business_id))
        if f.page != 1:
            pairs.append(("page", str(f.page)))
        if f.size != DEFAULT_PAGE_SIZE:
            pairs.append(("size", str(f.size)))
        return urlencode(pairs)

    def params(self) -> QueryWorkflowInstanceParams:
        """The repo query of this page (newest first)."""
        return QueryWorkflowInstanceParams(
            workflow_type_in=self.types,
            business_id=self.business_id,
            status_in=self.statuses,
            order_by_id_asc=False,
            page=Pager(self.page, self.size),
        )


@dataclass(frozen=True, slots=True)
class ListView:
    """One page of the list: its instances, the counts by status (type/business-id filters) and total."""

    filters: ListFilters
    instances: list[WorkflowInstanceRecord]
    counts: dict[str, int]
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.filters.size))


async def count_by_status(svc: WorkflowService, params: QueryWorkflowInstanceParams) -> dict[str, int]:
    """``{status: count}`` for every instance status, under ``params``' other filters."""
    grouped = getattr(svc.repo, "count_workflow_instances_by_status", None)
    if grouped is not None:
        found = await grouped(dataclasses.replace(params, status_in=()))
        return {s: int(found.get(s, 0)) for s in STATUSES}
    counts = {}
    for status in STATUSES:
        counts[status] = await svc.count_workflow_instances(dataclasses.replace(params, status_in=(status,)))
    return counts


async def load_list(svc: WorkflowService, filters: ListFilters) -> ListView:
    """The list page's data: counts by status, then the page (skipped when nothing matches)."""
    params = filters.params()
    counts = await count_by_status(svc, params)
    total = sum(counts[s] for s in (filters.statuses or STATUSES))
    first_row = (filters.page - 1) * filters.size
    instances = await svc.query_workflow_instances(params) if first_row < total else []
    return ListView(filters, instances, counts, total)


async def load_detail(svc: WorkflowService, instance_id: int) -> WorkflowInstanceDetail:
    """One instance with every node (``InstanceNotFoundError`` if there is none)."""
    found = await svc.query_workflow_instance_detail(
        QueryWorkflowInstanceParams(workflow_instance_id=instance_id)
    )
    if not found:
        raise InstanceNotFoundError(f"workflow instance {instance_id} not found")
    return found[0]


def record_dict(record: WorkflowInstanceRecord) -> dict[str, Any]:
    """An instance row for the JSON API."""
    out = {
        "id": record.id,
        "workflow_type": record.workflow_type,
        "business_id": record.business_id,
        "status": record.status,
        "task_id": record.task_id,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }
    parent = getattr(record, "parent_id", None)  # child workflows (0.2): present once they exist
    if parent is not None:
        out["parent_id"] = parent
    return out


async def load_children(svc: WorkflowService, instance_id: int) -> list[WorkflowInstanceRecord]:
    """The child workflows the instance's nodes started (``af.start_child_workflow``), by id."""
    return await svc.get_child_workflows(instance_id)


def child_dict(record: WorkflowInstanceRecord) -> dict[str, Any]:
    """A child workflow for the JSON API: its row plus the node and key that started it."""
    return {**record_dict(record), "parent_node": record.parent_node, "child_key": record.child_key}


def last_error(entry: TaskInstanceDetail) -> str:
    """The node's ``system.last_error`` (``""`` when there is none)."""
    system = (entry.node_context or {}).get("system")
    if isinstance(system, dict) and system.get("last_error"):
        return str(system["last_error"])
    return ""


def progress(entry: TaskInstanceDetail) -> Any:
    """The node's ``system.progress`` (heartbeats), or ``None``."""
    system = (entry.node_context or {}).get("system")
    return system.get("progress") if isinstance(system, dict) else None


def children(entry: TaskInstanceDetail) -> dict[str, dict[str, Any]]:
    """The node's ``children`` (``{key: {"instance_id", "status", ...}}``), only well-formed entries."""
    found = (entry.node_context or {}).get("children")
    if not isinstance(found, dict):
        return {}
    return {
        str(key): value
        for key, value in found.items()
        if isinstance(value, dict) and isinstance(value.get("instance_id"), int)
    }


def duration(entry: TaskInstanceDetail) -> int | None:
    """Seconds from the row's creation (or ``started_at``) to its last update, once it is terminal."""
    if entry.id == 0 or not is_over_task_status(entry.status):
        return None
    start = getattr(entry, "started_at", None) or entry.created_at
    return max(0, entry.updated_at - start)


def in_flight_age(entry: TaskInstanceDetail, now: float | None) -> int | None:
    """Seconds a node in flight (``running``/``pending`` with a row) has been going, else ``None``."""
    if now is None or entry.id == 0 or entry.status not in ("running", "pending") or not entry.started_at:
        return None
    return max(0, int(now - entry.started_at))


def node_dict(entry: TaskInstanceDetail, now: float | None = None) -> dict[str, Any]:
    """One node for the JSON API."""
    return {
        "task_type": entry.task_type,
        "task_name": entry.task_name,
        "status": entry.status,
        "id": entry.id,
        "fail_count": entry.fail_count,
        "created_at": entry.created_at,
        "updated_at": entry.updated_at,
        "started_at": getattr(entry, "started_at", None),
        "duration": duration(entry),
        "in_flight_for": in_flight_age(entry, now),
        "last_error": last_error(entry) or None,
        "progress": progress(entry),
        "children": children(entry),
        "pre_nodes": list(entry.pre_nodes_keys),
        "next_nodes": list(entry.next_nodes_keys),
        "node_context": entry.node_context,
    }


def instance_dict(
    detail: WorkflowInstanceDetail, children: Sequence[WorkflowInstanceRecord] = ()
) -> dict[str, Any]:
    """One instance with its nodes (and its child workflows, its parent) for the JSON API
    (``in_flight_for``: seconds, for nodes in flight)."""
    now = time.time()
    return {
        "id": detail.id,
        "workflow_type": detail.workflow_type,
        "business_id": detail.business_id,
        "status": detail.status,
        "task_id": detail.task_id,
        "created_at": detail.created_at,
        "updated_at": detail.updated_at,
        "workflow_context": detail.workflow_context,
        "nodes": [
            node_dict(e, None if is_over_instance_status(detail.status) else now)
            for e in detail.task_instances
        ],
        "parent_id": getattr(detail, "parent_id", None),
        "children": [child_dict(c) for c in children],
    }
