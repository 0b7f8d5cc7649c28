"""Checked, serialized forms of what callers hand a repo, built before any database work.

Both repos run these, so a value refused by one backend is refused by every backend, and nothing is
written when an argument is invalid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from .._text import SHORT_ID, shown, too_long
from ..errors import ParamInvalidError
from ..records import (
    InstanceFields,
    InstanceWhere,
    NewWorkflowInstance,
    Step,
    TaskFields,
    TaskInsert,
    TaskUpdate,
    TaskWhere,
)
from ..status import RUNNABLE_INSTANCE_STATUSES
from ._json import (
    INT64_MAX,
    INT64_MIN,
    ORJSON_OPTIONS,
    TEXT_JSON,
    check_int,
    check_ints,
    check_text,
    check_texts,
    checked_name,
    dumps_context,
    encode_context,
    orjson_dumps,
)
from ._sql import UNIQUE_MODES

_CHECKED_STATUS_IN = (RUNNABLE_INSTANCE_STATUSES,)
"""``Step.instance_status_in`` values known to pass :func:`check_texts` (the engine's default)."""


@dataclass(slots=True)  # internal, never changed: not frozen (cheaper to build)
class InstanceRow:
    """A new instance, checked; ``context`` is canonical JSON text."""

    workflow_type: str
    business_id: str
    status: str
    context: str
    task_id: int
    next_run_at: int
    trace_context: str | None = None
    unique: str | None = None  # None, "active" or "always" (stored as workflow_instance.unique_key)
    plain: bool = False  # orjson wrote ``context`` (see asyncflow.store._json.encode_context)
    lease_epoch: int = 0  # NewWorkflowInstance.lease_epoch


@dataclass(slots=True)  # internal, never changed: not frozen (cheaper to build)
class Refused:
    """A unique row that was not inserted: ``existing`` is the unique instance of its key that
    refused it, when the insert could see it (else the repo looks it up)."""

    existing: int | None


TaskRow: TypeAlias = tuple[str, str, str, int, int, bool]
"""A new node row, checked: ``(task_type, status, context, fail_count, started_at, plain)``;
``started_at`` 0 means "now"; ``plain``: orjson wrote ``context`` (see
asyncflow.store._json.encode_context). A plain tuple, read by position: a pass builds one per insert,
and a tuple display is one instruction where a named tuple (even built by ``tuple.__new__``) costs a
call, two more tuples and a heavier dealloc."""


class InstanceChange(NamedTuple):
    """Checked ``InstanceFields`` (``None`` = unchanged)."""

    status: str | None
    context: str | None
    next_run_at: int | None


StepChange: TypeAlias = tuple[str | None, str | None, int | None]
"""A step's instance change, a plain tuple in :class:`InstanceChange`'s field order ``(status,
context, next_run_at)`` (an ``InstanceChange`` is one too)."""


class TaskChange(NamedTuple):
    """Checked ``TaskFields`` / the fields of a ``TaskUpdate`` (``None`` = unchanged)."""

    status: str | None
    context: str | None
    fail_count: int | None
    started_at: int | None


@dataclass(slots=True)  # internal, never changed: not frozen (cheaper to build)
class TaskFilter:
    """Checked ``TaskWhere``."""

    ids: tuple[int, ...]
    workflow_instance_id: int | None
    task_type_in: tuple[str, ...]
    status_in: tuple[str, ...]
    version: int | None


PreparedStep: TypeAlias = tuple[
    int,  # instance_id
    tuple[str, ...],  # instance_status_in
    StepChange,  # instance_change
    tuple[tuple[int, int, TaskChange], ...],  # updates: (id, expected_version, change)
    tuple[TaskRow, ...],  # inserts
    bool,  # cancel_other_tasks
    int | None,  # lease_epoch
]
"""A checked :class:`~asyncflow.records.Step`, a plain tuple read by position (or unpacked): every
step of every pass builds one (see :data:`TaskRow`)."""


def claim_args(
    now_ms: object, limit: object, lease_ms: object, workflow_types: Sequence[str] | None
) -> tuple[int, tuple[str, ...]]:
    """Checked arguments of a claim (``claim_due_instances``, ``claim_due_states``): the lease's end
    (``now_ms + lease_ms``) and the workflow types (``()``: any)."""
    check_int(now_ms, "now_ms", minimum=0)
    check_int(lease_ms, "lease_ms", minimum=0)
    until = check_int(now_ms + lease_ms, "now_ms + lease_ms", minimum=0)  # type: ignore[operator]
    check_int(limit, "limit", minimum=0)
    return until, check_texts(workflow_types or (), "workflow_types")


def instance_row(new: NewWorkflowInstance) -> InstanceRow:
    """Check a :class:`~asyncflow.records.NewWorkflowInstance`."""
    if not isinstance(new, NewWorkflowInstance):
        raise ParamInvalidError(f"expected NewWorkflowInstance, got {type(new).__name__}")
    workflow_type = check_text(new.workflow_type, "workflow_type")
    business_id = check_text(new.business_id, "business_id")
    if len(business_id) > SHORT_ID or len(workflow_type) > SHORT_ID:  # else short enough, whatever it holds
        for what, text in (("workflow_type", workflow_type), ("business_id", business_id)):
            problem = too_long(text)
            if problem is not None:
                raise ParamInvalidError(f"{what} {problem}, got {len(text)} characters")
    status = check_text(new.status, "status")
    context, plain = encode_context(new.workflow_context, "workflow_context")
    return InstanceRow(  # positional (a class called with keywords costs a dict), in field order
        workflow_type,
        business_id,
        status,
        context,
        check_int(new.task_id, "task_id"),
        check_int(new.next_run_at, "next_run_at", minimum=0),
        _trace_context(new.trace_context),
        _unique(new.unique),
        plain,
        _first_epoch(new.lease_epoch),
    )


def _first_epoch(value: object) -> int:
    if value.__class__ is not int or not 0 <= value <= 1:
        raise ParamInvalidError(f"lease_epoch of a new instance must be 0 or 1, got {shown(value)}")
    return value


def _trace_context(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 1024:
        raise ParamInvalidError(
            f"trace_context must be a str of at most 1024 characters or None: {shown(value)}"
        )
    return check_text(value, "trace_context")


def _unique(value: object) -> str | None:
    if value is None or value in UNIQUE_MODES:
        return value
    raise ParamInvalidError(f"unique must be None, 'active' or 'always', got {shown(value)}")


def task_row(new: TaskInsert) -> TaskRow:
    """Check a :class:`~asyncflow.records.TaskInsert`."""
    if not isinstance(new, TaskInsert):
        raise ParamInvalidError(f"expected TaskInsert, got {type(new).__name__}")
    task_type, status, fail_count, started_at = new.task_type, new.status, new.fail_count, new.started_at
    # names already checked skip check_text (see TEXT_JSON); ints in range skip check_int
    if type(task_type) is not str or task_type not in TEXT_JSON:
        task_type = checked_name(task_type, "task_type")
    if type(status) is not str or status not in TEXT_JSON:
        status = checked_name(status, "status")
    if not (type(fail_count) is int and 0 <= fail_count <= INT64_MAX):
        fail_count = check_int(fail_count, "fail_count", minimum=0)
    if not (type(started_at) is int and 0 <= started_at <= INT64_MAX):
        started_at = check_int(started_at, "started_at", minimum=0)
    context, plain = encode_context(new.node_context, "node_context")
    return (task_type, status, context, fail_count, started_at, plain)


def _optional_text(value: object, what: str) -> str | None:
    return None if value is None else check_text(value, what)


def _optional_int(value: object, what: str, minimum: int = 0) -> int | None:
    return None if value is None else check_int(value, what, minimum=minimum)


def instance_change(fields: InstanceFields, *, allow_empty: bool = False) -> InstanceChange:
    """Check :class:`~asyncflow.records.InstanceFields`; all ``None`` is refused unless allowed."""
    change = InstanceChange(
        status=_optional_text(fields.status, "status"),
        context=None
        if fields.workflow_context is None
        else dumps_context(fields.workflow_context, "workflow_context"),
        next_run_at=_optional_int(fields.next_run_at, "next_run_at"),
    )
    if not allow_empty and change == InstanceChange(None, None, None):
        raise ParamInvalidError("an instance update needs at least one field to set")
    return change


def task_change(fields: TaskFields | TaskUpdate, *, allow_empty: bool = False) -> TaskChange:
    """Check :class:`~asyncflow.records.TaskFields` (or the fields of a ``TaskUpdate``)."""
    change = TaskChange(
        status=_optional_text(fields.status, "status"),
        context=None if fields.node_context is None else dumps_context(fields.node_context, "node_context"),
        fail_count=_optional_int(fields.fail_count, "fail_count"),
        started_at=_optional_int(fields.started_at, "started_at"),
    )
    if not allow_empty and change == TaskChange(None, None, None, None):
        raise ParamInvalidError("a node update needs at least one field to set")
    return change


def instance_where(where: InstanceWhere) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Check :class:`~asyncflow.records.InstanceWhere`: ``(ids, status_in)``; ids are required."""
    ids = check_ints(where.ids, "InstanceWhere.ids")
    if not ids:
        raise ParamInvalidError("an instance update needs InstanceWhere.ids (refusing to update every row)")
    return ids, check_texts(where.status_in, "InstanceWhere.status_in")


def task_filter(where: TaskWhere) -> TaskFilter:
    """Check :class:`~asyncflow.records.TaskWhere`; ``ids`` or ``workflow_instance_id`` is required."""
    result = TaskFilter(
        ids=check_ints(where.ids, "TaskWhere.ids"),
        workflow_instance_id=_optional_int(
            where.workflow_instance_id, "workflow_instance_id", minimum=-(2**63)
        ),
        task_type_in=check_texts(where.task_type_in, "TaskWhere.task_type_in"),
        status_in=check_texts(where.status_in, "TaskWhere.status_in"),
        version=_optional_int(where.version, "TaskWhere.version", minimum=-(2**63)),
    )
    if not result.ids and result.workflow_instance_id is None:
        raise ParamInvalidError("a node update needs TaskWhere.ids or workflow_instance_id")
    return result


def prepared_step(step: Step) -> PreparedStep:
    """Check a :class:`~asyncflow.records.Step` and serialize its contexts.

    Every check and error of :func:`task_row`, :func:`task_change`, :func:`check_int` and
    :func:`check_text`, in the same order; what the engine's steps hold (names and statuses already
    seen, ints in range, contexts orjson encodes) is checked inline, without their calls. (Loops and
    inline checks, not helpers: every step of every pass runs it.)"""
    if not isinstance(step, Step):
        raise ParamInvalidError(f"expected Step, got {type(step).__name__}")
    texts = TEXT_JSON
    updates = []
    for update in step.updates:
        if not isinstance(update, TaskUpdate):
            raise ParamInvalidError(f"Step.updates must hold TaskUpdate, got {type(update).__name__}")
        task_id, expected = update.id, update.expected_version
        if not (type(task_id) is int and INT64_MIN <= task_id <= INT64_MAX):
            task_id = check_int(task_id, "TaskUpdate.id")
        if not (type(expected) is int and INT64_MIN <= expected <= INT64_MAX):
            expected = check_int(expected, "TaskUpdate.expected_version")
        updates.append((task_id, expected, task_change(update, allow_empty=True)))
    inserts = []
    for new in step.inserts:
        if type(new) is not TaskInsert:  # a subclass, or no TaskInsert (task_row raises)
            inserts.append(task_row(new))
            continue
        task_type, status, context = new.task_type, new.status, new.node_context
        fail_count, started_at = new.fail_count, new.started_at
        if type(task_type) is not str or task_type not in texts:
            task_type = checked_name(task_type, "task_type")
        if type(status) is not str or status not in texts:
            status = checked_name(status, "status")
        # both in [0, 2**63 - 1] exactly when their bitwise or is (ints: a negative one makes it negative)
        if not (
            type(fail_count) is int and type(started_at) is int and 0 <= fail_count | started_at <= INT64_MAX
        ):
            fail_count = check_int(fail_count, "fail_count", minimum=0)
            started_at = check_int(started_at, "started_at", minimum=0)
        # encode_context's orjson path inline; anything else (not a dict, orjson refused it, a null
        # that may be a NaN, an escaped NUL) goes through encode_context, which decides and raises
        # (searched in the decoded text: ``bytes in bytes`` first tries the needle as an int, and
        # raises and clears a TypeError inside, each time)
        if type(context) is dict:
            try:
                text = orjson_dumps(context, option=ORJSON_OPTIONS).decode()
            except TypeError:  # orjson.JSONEncodeError
                text = "null"
        else:
            text = "null"
        if "null" in text or "\\u0000" in text:
            text, plain = encode_context(context, "node_context")
        else:
            plain = True
        inserts.append((task_type, status, text, fail_count, started_at, plain))
    instance_id, status_in = step.instance_id, step.instance_status_in
    if not (type(instance_id) is int and INT64_MIN <= instance_id <= INT64_MAX):
        instance_id = check_int(instance_id, "Step.instance_id")
    if status_in not in _CHECKED_STATUS_IN:
        status_in = check_texts(status_in, "Step.instance_status_in")
    new_status, next_run_at, epoch = step.instance_status, step.next_run_at, step.lease_epoch
    if next_run_at is not None and not (type(next_run_at) is int and 0 <= next_run_at <= INT64_MAX):
        next_run_at = check_int(next_run_at, "Step.next_run_at", minimum=0)
    if new_status is not None and (type(new_status) is not str or new_status not in texts):
        new_status = checked_name(new_status, "Step.instance_status")
    cancel = bool(step.cancel_other_tasks)
    if epoch is not None and not (type(epoch) is int and 0 <= epoch <= INT64_MAX):
        epoch = check_int(epoch, "Step.lease_epoch", minimum=0)
    return (  # in PreparedStep's order
        instance_id,
        status_in,
        (new_status, None, next_run_at),  # StepChange: (status, context, next_run_at)
        tuple(updates) if updates else (),
        tuple(inserts),
        cancel,
        epoch,
    )


def child_key(parent_id: object, parent_node: object, key: object) -> tuple[int, str, str]:
    """Check the ``(parent instance, parent node, key)`` of a child instance."""
    return (
        check_int(parent_id, "parent_id", minimum=1),
        check_text(parent_node, "parent_node"),
        check_text(key, "child_key"),
    )
