"""The engine's pure rules: what a worker outcome does to a node, node contexts, scheduling.

Nothing here does I/O, so every rule is testable without a database.
"""

from __future__ import annotations

import enum
import math
import random
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .._numbers import finite
from .._text import shown
from ..errors import (
    ParamInvalidError,
    TaskFailedContinue,
    TaskFailedTerminate,
    TaskNotReady,
    find_in_chain,
)
from ..retry import RetryPolicy
from ..status import (
    END_NODE,
    NODE_EVENT,
    PRE_NODE_CONTEXT,
    REASON,
    SYSTEM,
    TIMEOUT_REASON,
    WORKFLOW_CONTEXT,
    TaskStatus,
)

__all__ = [
    "CHOSEN",
    "Join",
    "NodeOutcome",
    "Outcome",
    "SchedulePolicy",
    "build_node_context",
    "chosen_of",
    "classify_failure",
    "edge_status",
    "error_text",
    "join_decision",
    "json_copy",
    "propagate_skips",
    "record_error",
    "sanitize_json",
]

_SCALARS = frozenset((str, int, float, bool, type(None)))
"""Types :func:`json_copy` returns as they are, checked by identity before a call per value."""


class Outcome(enum.Enum):
    """What a failed worker call does to its node (reference §4.7, SEMANTICS "Outcomes")."""

    NOT_READY = "not_ready"  # keep status and fail count; poll again later
    CONTINUE = "continue"  # completed, fail_count + 1; successors run
    FATAL = "fatal"  # node failed + instance failed + other nodes canceled
    RETRY = "retry"  # fail_count + 1, status kept, retried on a later pass


@dataclass(frozen=True, slots=True)
class NodeOutcome:
    """The decision for one failed worker call."""

    outcome: Outcome
    last_error: str
    timed_out: bool = False


def error_text(exc: BaseException) -> str:
    """The text stored in ``system.last_error`` (type and message, like Go's ``err.Error()``)."""
    message = str(exc)
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


def classify_failure(
    exc: BaseException,
    *,
    fail_count: int,
    fail_max_count: int,
    max_wait_time_ts: int,
    started_at: int,
    now: int,
) -> NodeOutcome:
    """Go's order: timeout, not ready, continue, fail max count, terminate, else retry.

    ``fail_count`` is the count before this failure. The timeout is strict: ``now - started_at >
    max_wait_time_ts > 0``. ``fail_max_count = N > 0`` fails the node on its N-th counted failure.
    """
    text = error_text(exc)
    if max_wait_time_ts > 0 and now - started_at > max_wait_time_ts:
        return NodeOutcome(Outcome.FATAL, text, timed_out=True)
    if find_in_chain(exc, TaskNotReady) is not None:
        return NodeOutcome(Outcome.NOT_READY, text)
    if find_in_chain(exc, TaskFailedContinue) is not None:
        return NodeOutcome(Outcome.CONTINUE, text)
    if fail_max_count > 0 and fail_count + 1 >= fail_max_count:
        return NodeOutcome(
            Outcome.FATAL, f"fail max count reached ({fail_count + 1}/{fail_max_count}): {text}"
        )
    if find_in_chain(exc, TaskFailedTerminate) is not None:
        return NodeOutcome(Outcome.FATAL, text)
    return NodeOutcome(Outcome.RETRY, text)


def record_error(context: dict[str, Any], outcome: NodeOutcome, now: float) -> None:
    """Write ``system.last_error``/``last_error_time`` (RFC 3339, local time) and the timeout reason."""
    system = context.get(SYSTEM)
    if not isinstance(system, dict):
        system = {}
        context[SYSTEM] = system
    system["last_error"] = outcome.last_error
    system["last_error_time"] = datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds")
    if outcome.timed_out:
        reason = context.get(REASON)
        if not (isinstance(reason, str) and reason):
            context[REASON] = TIMEOUT_REASON


def json_copy(value: Any) -> Any:
    """Deep copy of JSON-shaped data (dicts, lists, scalars); other objects are shared as they are."""
    kind = type(value)
    if kind is dict:  # exact types first: the isinstance() checks below are for subclasses
        return {k: v if type(v) in _SCALARS else json_copy(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _SCALARS else json_copy(v) for v in value]
    if kind in _SCALARS:
        return value
    if isinstance(value, dict):
        return {k: json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_copy(v) for v in value]
    return value


def sanitize_json(value: Any) -> Any:
    """A JSON-safe copy: non-JSON values become their ``repr``, NaN/inf their text, NUL U+FFFD."""
    if isinstance(value, dict):
        return {_clean_str(str(k)): sanitize_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize_json(v) for v in value]
    if isinstance(value, str):
        return _clean_str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return _clean_str(repr(value))


def _clean_str(text: str) -> str:
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no database stores it
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def build_node_context(
    pre_contexts: Iterable[tuple[str, Mapping[str, Any]]],
    workflow_context: Mapping[str, Any],
    keep_event_from: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A node's initial context, exactly as Go builds it (reference §4.5.1).

    ``pre_node_context`` maps each direct predecessor to a copy of its context minus ``system``,
    ``pre_node_context`` and ``workflow_context``; ``workflow_context`` is a copy of the instance's.
    A restarted node keeps the ``node_event`` of its previous context (``keep_event_from``).
    """
    # a shallow copy, then json_copy() of the values that are not scalars (a node's hot path: most
    # are, which one look in C tells: the set of the values' types is one of the scalars')
    pre: dict[str, Any] = {}
    for task_type, ctx in pre_contexts:
        copied = pre[task_type] = dict(ctx)
        copied.pop(SYSTEM, None)  # minus the keys the engine keeps per node
        copied.pop(PRE_NODE_CONTEXT, None)
        copied.pop(WORKFLOW_CONTEXT, None)
        if not _SCALARS.issuperset(map(type, copied.values())):
            for k, v in copied.items():
                if type(v) not in _SCALARS:
                    copied[k] = json_copy(v)  # the same key: the dict's size does not change
    workflow = dict(workflow_context)
    if workflow and not _SCALARS.issuperset(map(type, workflow.values())):
        for k, v in workflow.items():
            if type(v) not in _SCALARS:
                workflow[k] = json_copy(v)
    context: dict[str, Any] = {PRE_NODE_CONTEXT: pre, WORKFLOW_CONTEXT: workflow}
    if keep_event_from is not None and NODE_EVENT in keep_event_from:
        context[NODE_EVENT] = json_copy(keep_event_from[NODE_EVENT])
    return context


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulePolicy:
    """When the driver should next look at an instance after a pass.

    ``poll_interval``: seconds before a node that is not ready (or pending) is checked again. Retry
    back-off is :class:`~asyncflow.retry.RetryPolicy` (``WorkflowService(retry=...)`` or a node's
    ``retry``). ``retry_base``/``retry_max``/``retry_jitter`` are deprecated (0.2; removed in 0.3): they
    warn and become :attr:`legacy_retry`, which a service uses when it is given no ``retry``.
    """

    poll_interval: float = 1.0
    retry_base: float | None = None
    retry_max: float | None = None
    retry_jitter: float | None = None

    def __post_init__(self) -> None:
        value = self.poll_interval
        if isinstance(value, bool) or not isinstance(value, int | float) or not finite(value):
            raise ParamInvalidError(
                f"SchedulePolicy.poll_interval must be a finite number, got {shown(value)}"
            )
        if value < 0:
            raise ParamInvalidError(f"SchedulePolicy.poll_interval must not be negative, got {shown(value)}")
        if self.legacy_retry is not None:
            warnings.warn(
                "SchedulePolicy retry_base/retry_max/retry_jitter are deprecated: use "
                "WorkflowService(retry=RetryPolicy(initial_interval=..., max_interval=..., jitter=...))",
                DeprecationWarning,
                stacklevel=3,
            )

    @property
    def legacy_retry(self) -> RetryPolicy | None:
        """The deprecated retry fields as a :class:`RetryPolicy` (``None`` when none is set)."""
        if self.retry_base is None and self.retry_max is None and self.retry_jitter is None:
            return None
        defaults = RetryPolicy()
        try:
            return RetryPolicy(
                initial_interval=defaults.initial_interval if self.retry_base is None else self.retry_base,
                max_interval=defaults.max_interval if self.retry_max is None else self.retry_max,
                jitter=defaults.jitter if self.retry_jitter is None else self.retry_jitter,
            )
        except ParamInvalidError as exc:
            raise ParamInvalidError(str(exc).replace("RetryPolicy.", "SchedulePolicy (retry) ")) from None

    def retry_delay(self, fail_count: int, rng: random.Random | None = None) -> float:
        """Deprecated: :meth:`RetryPolicy.delay` of :attr:`legacy_retry` (or the default policy)."""
        warnings.warn(
            "SchedulePolicy.retry_delay is deprecated: use RetryPolicy.delay",
            DeprecationWarning,
            stacklevel=2,
        )
        return (self.legacy_retry or RetryPolicy()).delay(fail_count, rng)


# ---------------------------------------------------------------------------- branches and joins

CHOSEN = "chosen"
"""The key under a node context's ``system`` where the engine keeps what ``af.choose`` chose."""

_DONE_COMPLETED = TaskStatus.COMPLETED.value
_DONE_SKIPPED = TaskStatus.SKIPPED.value


class Join(enum.Enum):
    """What a node's join makes of its predecessors' states now."""

    WAIT = "wait"  # a predecessor is not done yet
    RUN = "run"
    SKIP = "skip"


def chosen_of(context: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """The successors a completed node chose (``None``: it did not call ``choose``: all of them)."""
    system = context.get(SYSTEM) if context is not None else None
    if system is None:  # the common case, before the (slower) Mapping check
        return None
    chosen = system.get(CHOSEN) if isinstance(system, Mapping) else None
    if isinstance(chosen, list) and all(isinstance(t, str) for t in chosen):
        return tuple(chosen)
    return None


def edge_status(status: str | None, chosen: Sequence[str] | None, successor: str) -> str | None:
    """A predecessor's state as ``successor`` sees it: a completed node that did not choose it is skipped."""
    if status == _DONE_COMPLETED and chosen is not None and successor not in chosen:
        return _DONE_SKIPPED
    return status


def join_decision(join: str, statuses: Sequence[str | None]) -> Join:
    """Whether a node runs, is skipped or waits, from its predecessors' (edge) statuses.

    ``None`` is a predecessor without a row. ``all``: runs when every predecessor completed, skipped
    once every one is done (completed or skipped) and one was skipped. ``any``: once every predecessor
    is done, runs if one completed, else skipped. ``first``: runs as soon as one completed; skipped
    when every one was skipped. ``end`` (join ``end``): completes once every predecessor is done.
    """
    completed = statuses.count(_DONE_COMPLETED)
    skipped = statuses.count(_DONE_SKIPPED)
    all_done = completed + skipped == len(statuses)
    if join == "first" and completed:
        return Join.RUN
    if not all_done:
        return Join.WAIT
    if join == "end":
        return Join.RUN
    if join == "all":
        return Join.SKIP if skipped else Join.RUN
    return Join.RUN if completed else Join.SKIP


def propagate_skips(
    start: str,
    *,
    status_of: Callable[[str], str | None],
    chosen: Callable[[str], Sequence[str] | None],
    pre_nodes: Callable[[str], Sequence[str]],
    next_nodes: Callable[[str], Sequence[str]],
    join_of: Callable[[str], str],
    open_node: Callable[[str], bool],
) -> list[str]:
    """The nodes that become ``skipped`` because ``start`` is now done, in the order found.

    ``status_of`` gives a node's current status (``start`` already completed or skipped), ``chosen``
    what a completed node chose, ``open_node`` whether a node has not run yet (no row, or restarting).
    Each skip may skip the nodes after it in turn; ``end`` is never skipped (it completes instead).
    """
    skipped: list[str] = []
    decided: dict[str, str] = {}

    def status(task_type: str) -> str | None:
        return decided.get(task_type, status_of(task_type))

    todo = [start]
    while todo:
        done = todo.pop(0)
        for succ in next_nodes(done):
            if succ == END_NODE or succ in decided or not open_node(succ):
                continue
            edges = [edge_status(status(p), chosen(p), succ) for p in pre_nodes(succ)]
            if join_decision(join_of(succ), edges) is Join.SKIP:
                decided[succ] = _DONE_SKIPPED
                skipped.append(succ)
                todo.append(succ)
    return skipped
