"""Task workers: what a node does (``run``) and how it learns it is done (``wait_check``).

A worker signals outcomes by raising (see :mod:`asyncflow.errors`): ``TaskNotReady``,
``TaskFailedContinue``, ``TaskFailedTerminate``; anything else is a retryable failure. Mutations a worker
makes to its ``ctx`` are persisted by the engine.

Inside ``run``/``wait_check``, :func:`current_node` tells the worker which instance and node it serves.
"""

from __future__ import annotations

import contextvars
import inspect
import json
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from types import CoroutineType, FunctionType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

import anyio.to_thread

from asyncflow._frozen import quick_init
from asyncflow._json_depth import MAX_JSON_DEPTH, json_depth_exceeds
from asyncflow._text import shown
from asyncflow.errors import InvalidStateError, LockFailedError, ParamInvalidError

if TYPE_CHECKING:
    from asyncflow.context import JSONContext
    from asyncflow.records import WorkflowInstance, WorkflowInstanceRecord

__all__ = [
    "NOT_IMPLEMENTED",
    "BaseTaskWorker",
    "EmptyTaskWorker",
    "EndNodeWorker",
    "NodeInfo",
    "NormalTaskWorker",
    "RootNodeWorker",
    "TaskWorker",
    "WorkerCall",
    "WorkerFunction",
    "call_scope",
    "choice_scope",
    "choose",
    "current_node",
    "heartbeat",
    "node_scope",
    "start_child_workflow",
    "worker_has_wait_check",
]

#: The message of the error raised by a worker that has no implementation (the Go text).
NOT_IMPLEMENTED = "Not implemented"

#: A ``run``/``wait_check`` function: ``async def f(ctx)`` or a plain ``def f(ctx)`` (run in a thread).
WorkerFunction: TypeAlias = "Callable[[JSONContext], Awaitable[None]] | Callable[[JSONContext], None]"


@runtime_checkable
class TaskWorker(Protocol):
    """What the engine calls for a node (Go ``WorkflowTaskNodeWorker``).

    ``run`` starts the work; ``wait_check`` is polled after ``run`` succeeded until it returns without
    raising. Both return ``None`` on success and signal everything else by raising.
    """

    async def run(self, ctx: JSONContext) -> None:
        """Do the node's work; mutate ``ctx`` to pass data on."""
        ...

    async def wait_check(self, ctx: JSONContext) -> None:
        """Return when the work started by ``run`` is done; raise ``TaskNotReady`` while it is not."""
        ...


class EmptyTaskWorker:
    """A worker with no implementation: ``run`` and ``wait_check`` both raise ``NotImplementedError``."""

    async def run(self, ctx: JSONContext) -> None:
        """Always fails with ``NotImplementedError("Not implemented")`` (a retryable failure)."""
        raise NotImplementedError(NOT_IMPLEMENTED)

    async def wait_check(self, ctx: JSONContext) -> None:
        """Always fails with ``NotImplementedError("Not implemented")``."""
        raise NotImplementedError(NOT_IMPLEMENTED)


class BaseTaskWorker(EmptyTaskWorker):
    """Base class for workers: override ``run``; ``wait_check`` succeeds at once (a synchronous node).

    Override ``wait_check`` too for a node that polls for completion.
    """

    async def wait_check(self, ctx: JSONContext) -> None:
        """Succeeds: the node is done as soon as ``run`` succeeded."""
        return None


class RootNodeWorker(BaseTaskWorker):
    """The worker of the implicit ``root`` node: does nothing."""

    async def run(self, ctx: JSONContext) -> None:
        """No-op."""
        return None


class EndNodeWorker(BaseTaskWorker):
    """The worker of the implicit ``end`` node: does nothing."""

    async def run(self, ctx: JSONContext) -> None:
        """No-op."""
        return None


async def _call(fn: WorkerFunction, is_async: bool, ctx: JSONContext) -> None:
    if is_async:
        result: object = fn(ctx)
    else:
        # A plain callable may block: run it in a worker thread (contextvars are copied, so
        # current_node() works there). On cancellation the await ends at once; the thread cannot be
        # interrupted and finishes on its own, its result discarded.
        result = await anyio.to_thread.run_sync(fn, ctx, abandon_on_cancel=True)
    if inspect.isawaitable(result):
        await result


def _is_async_callable(fn: object) -> bool:
    if not callable(fn):
        return False
    if inspect.iscoroutinefunction(fn):
        return True
    # an object whose class defines ``async def __call__``
    return not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)


class NormalTaskWorker(BaseTaskWorker):
    """A worker made of functions (Go ``NewNormalTaskWorker``).

    ``run`` and ``wait_check`` take the node context. Each may be an ``async def`` function or a plain
    callable; a plain one runs in a worker thread (``anyio.to_thread``) so it never blocks the event loop.
    Without ``run`` the node fails with ``"Not implemented"`` on every attempt; without ``wait_check`` the
    node is synchronous (it completes as soon as ``run`` succeeds).
    """

    def __init__(self, run: WorkerFunction | None = None, wait_check: WorkerFunction | None = None) -> None:
        for label, fn in (("run", run), ("wait_check", wait_check)):
            if fn is not None and not callable(fn):
                raise TypeError(f"NormalTaskWorker {label} must be callable, got {type(fn).__name__}")
        self._run = run
        self._run_is_async = _is_async_callable(run)
        self._wait_check = wait_check
        self._wait_check_is_async = _is_async_callable(wait_check)

    @property
    def run_function(self) -> WorkerFunction | None:
        """The ``run`` function given to the constructor."""
        return self._run

    @property
    def wait_check_function(self) -> WorkerFunction | None:
        """The ``wait_check`` function given to the constructor (``None``: a synchronous node)."""
        return self._wait_check

    async def run(self, ctx: JSONContext) -> None:
        """Call the ``run`` function, or fail with ``NotImplementedError`` when there is none."""
        fn = self._run
        if fn is None:
            raise NotImplementedError(NOT_IMPLEMENTED)
        if self._run_is_async:  # _call() inline (a node's hot path)
            result: object = fn(ctx)
            if type(result) is CoroutineType or inspect.isawaitable(result):  # a coroutine: no call
                await result
            return
        await _call(fn, False, ctx)

    async def wait_check(self, ctx: JSONContext) -> None:
        """Call the ``wait_check`` function; succeed at once when there is none."""
        if self._wait_check is not None:
            await _call(self._wait_check, self._wait_check_is_async, ctx)

    def __repr__(self) -> str:
        name = getattr(self._run, "__qualname__", None) or repr(self._run)
        return f"NormalTaskWorker(run={name}, wait_check={self._wait_check is not None})"


def worker_has_wait_check(worker: TaskWorker) -> bool:
    """Whether ``worker.wait_check`` may do anything but succeed at once.

    ``False`` for :class:`NormalTaskWorker` without a ``wait_check`` function, for :class:`BaseTaskWorker`
    subclasses that keep its ``wait_check`` (the root and end workers included); ``True`` otherwise,
    including :class:`EmptyTaskWorker` and any other implementation of the protocol. The engine may
    complete a node without a wait check in the same write that records ``run``'s success.
    """
    func = getattr(getattr(worker, "wait_check", None), "__func__", None)
    if func is BaseTaskWorker.wait_check:
        return False
    if func is NormalTaskWorker.wait_check and isinstance(worker, NormalTaskWorker):
        return worker.wait_check_function is not None
    return True


def direct_run_function(worker: TaskWorker) -> Callable[[JSONContext], Coroutine[Any, Any, None]] | None:
    """For the engine: the ``async def`` function that ``worker.run(ctx)`` does nothing but call and
    await (a :class:`NormalTaskWorker`, its ``run`` not overridden, made with one), which the engine
    may await itself (one coroutine fewer per call); ``None`` for any other worker."""
    if not isinstance(worker, NormalTaskWorker) or type(worker).run is not NormalTaskWorker.run:
        return None
    if "run" in vars(worker):  # replaced on the instance
        return None
    fn = worker.run_function
    if type(fn) is FunctionType and fn.__code__.co_flags & inspect.CO_COROUTINE:
        return fn
    return None


@quick_init  # built on every node: see asyncflow._frozen
@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Which node a worker call serves: see :func:`current_node`."""

    instance_id: int
    workflow_type: str
    business_id: str
    task_type: str
    fail_count: int
    trace_context: str | None = None  # what an observer stored with the instance (W3C traceparent)


class WorkerCall:
    """For the engine: the worker call in progress, the one context variable a call sets.

    :func:`current_node`, :func:`choose`, :func:`heartbeat` and :func:`start_child_workflow` read it.
    ``instance`` is the instance's record: its ``id``, ``workflow_type``, ``business_id`` and
    ``trace_context`` make the :class:`NodeInfo`, built when first asked for (most workers never
    ask), unless ``info`` is given. ``next_nodes`` is set for a ``run()`` only (:func:`choose` and
    :func:`start_child_workflow` refuse anything else), which records into ``chosen`` and ``keys``;
    ``start`` is the service's ``start(instance, task_type, workflow_type, key, context)`` of a child
    (``None``: a pass without a service). ``beat_target`` gets :func:`heartbeat`'s reports.

    What the call was given is read through properties: a subclass may derive them instead of storing
    them (the engine's :class:`~asyncflow.engine.inflight.NodeWatch`, built for every node, is its own
    call). No ``__slots__``: ``chosen``, ``keys`` and the info stay the class's until set (most calls
    never set them).
    """

    chosen: tuple[str, ...] | None = None
    keys: Sequence[str] = ()  # replaced, never changed in place (the class's is shared)
    _info: NodeInfo | None = None

    def __init__(
        self,
        task_type: str,
        instance: Any = None,
        fail_count: int = 0,
        info: NodeInfo | None = None,
        beat_target: HeartbeatTarget | None = None,
        next_nodes: tuple[str, ...] | None = None,
        start: ChildStart | None = None,
    ) -> None:
        self._task_type = task_type
        self._instance = instance
        self._fail_count = fail_count
        if info is not None:
            self._info = info
        self._beat_target = beat_target
        self._next_nodes = next_nodes
        self._start = start

    @property
    def task_type(self) -> str:
        return self._task_type

    @property
    def instance(self) -> Any:
        return self._instance

    @property
    def fail_count(self) -> int:
        return self._fail_count

    @property
    def beat_target(self) -> HeartbeatTarget | None:
        return self._beat_target

    @property
    def next_nodes(self) -> tuple[str, ...] | None:
        return self._next_nodes

    @property
    def start(self) -> ChildStart | None:
        return self._start

    @property
    def info(self) -> NodeInfo:
        """``LookupError`` for a call that has neither (e.g. :func:`choice_scope`'s)."""
        info = self._info
        if info is None:
            instance = self.instance
            if instance is None:
                raise LookupError(f"no node information for this worker call of {self.task_type!r}")
            info = self._info = NodeInfo(  # positional: a class called with keywords costs a dict
                instance.id,
                instance.workflow_type,
                instance.business_id,
                self.task_type,
                self.fail_count,
                instance.trace_context,
            )
        return info


_current_call: contextvars.ContextVar[WorkerCall] = contextvars.ContextVar("asyncflow_worker_call")


def current_node() -> NodeInfo:
    """The node whose ``run`` or ``wait_check`` is executing (also inside sync workers' threads).

    Raises ``LookupError`` when called outside a worker call.
    """
    try:
        call = _current_call.get()
    except LookupError:
        raise LookupError(
            "asyncflow.current_node() is only available inside a worker's run() or wait_check()"
        ) from None
    return call.info


@contextmanager
def call_scope(call: WorkerCall) -> Iterator[WorkerCall]:
    """For the engine: make ``call`` the worker call in progress inside the block (it replaces the
    enclosing one whole until the block ends)."""
    token = _current_call.set(call)
    try:
        yield call
    finally:
        _current_call.reset(token)


@contextmanager
def node_scope(info: NodeInfo) -> Iterator[NodeInfo]:
    """For the engine: make ``info`` what :func:`current_node` returns inside the block (a call of its
    own, as :func:`call_scope`: no :func:`choose`, :func:`heartbeat` or children inside it)."""
    with call_scope(WorkerCall(info.task_type, info=info, fail_count=info.fail_count)):
        yield info


def choose(*task_types: str) -> None:
    """Inside ``run()``: follow only these successors; the others become ``skipped`` when the node completes.

    ``choose()`` with no argument skips every successor; without a call every successor is followed.
    A later call replaces an earlier one. A name that is not one of the node's ``next_nodes`` raises
    :class:`~asyncflow.errors.ParamInvalidError`; a call outside a worker's ``run()`` ``LookupError``.
    """
    call = _current_call.get(None)
    next_nodes = None if call is None else call.next_nodes
    if call is None or next_nodes is None:
        raise LookupError("asyncflow.choose() is only available inside a worker's run()")
    unknown = [t for t in task_types if not isinstance(t, str) or t not in next_nodes]
    if unknown:
        raise ParamInvalidError(
            f"choose(): node {call.task_type!r} has no successor(s) {', '.join(map(repr, unknown))} "
            f"(its next nodes: {', '.join(map(repr, next_nodes))})"
        )
    call.chosen = tuple(dict.fromkeys(task_types))


def choice_scope(task_type: str, next_nodes: tuple[str, ...]) -> AbstractContextManager[WorkerCall]:
    """For the engine: inside the block :func:`choose` records into the call yielded (``chosen``); a
    call of its own, as :func:`call_scope` (:func:`current_node` raises ``LookupError`` inside it)."""
    return call_scope(WorkerCall(task_type, next_nodes=next_nodes))


class HeartbeatTarget(Protocol):
    """For the engine: what :func:`heartbeat` reports to (the node attempt in flight)."""

    def beat(self, progress: object) -> None: ...


async def heartbeat(progress: object = None) -> None:
    """Inside ``run()`` or ``wait_check()``: report that the node is alive and how far it got.

    ``progress`` (any JSON value: a number, a string, a dict ...) is stored under the node context's
    ``system.progress``, so queries, ``asyncflow show``/``ls`` and the dashboard show it while the node
    runs; the node becomes visible as ``running`` (with its ``started_at``) at the latest one throttle
    interval after it started. Writes are throttled: at most one per interval (the service's
    ``visible_after``, at least 0.1 s; 1 s without it); calls in between only replace the progress
    the next write stores, and the node's final write keeps the last one. It never waits for the database.

    Raises :class:`~asyncflow.errors.InvalidStateError` outside a worker's ``run``/``wait_check`` and
    :class:`~asyncflow.errors.ParamInvalidError` for a ``progress`` that is not JSON.
    """
    call = _current_call.get(None)
    target = None if call is None else call.beat_target
    if target is None:
        raise InvalidStateError(
            "asyncflow.heartbeat() is only available inside a worker's run() or wait_check()"
        )
    target.beat(_json_progress(progress))


def _json_progress(progress: object) -> object:
    if json_depth_exceeds(progress, MAX_JSON_DEPTH):
        raise ParamInvalidError(f"heartbeat(): progress nests more than {MAX_JSON_DEPTH} levels deep")
    try:
        text = json.dumps(progress, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ParamInvalidError(
            f"heartbeat(): progress must be JSON (str, number, bool, None, list, dict): {exc}"
        ) from None
    if "\\u0000" in text:
        raise ParamInvalidError("heartbeat(): progress must not contain NUL characters")
    return json.loads(text)  # a copy the worker cannot change under the engine


ChildStart: TypeAlias = (
    "Callable[[WorkflowInstanceRecord, str, str, str, Mapping[str, Any] | JSONContext | None], "
    "Awaitable[WorkflowInstance]]"
)
"""For the engine: the service's ``start(instance, task_type, workflow_type, key, context)``, which
creates (idempotently) a child of the instance's node ``task_type``."""


async def start_child_workflow(
    workflow_type: str, key: str, *, context: Mapping[str, Any] | JSONContext | None = None
) -> WorkflowInstance:
    """Inside ``run()``: start a child workflow instance of ``workflow_type`` for this node, once per ``key``.

    The child's business id is ``f"{parent_business_id}/{task_type}/{key}"``; it is linked to this
    instance (its record's ``parent_id``) and node. Idempotent per (instance, node, ``key``): a retry,
    a re-run after a crash or a concurrent pass gets the child created first (a unique index of the
    database decides), whatever ``context`` it passes then. Returns the child instance.

    The node then stays ``pending`` until every child it started is terminal; its context then gets
    ``children: {key: {"instance_id": id, "status": status, "output": output}}`` (``output``: the
    child's ``end`` node's ``pre_node_context``), its ``wait_check`` (if any) runs and it completes. A
    child that ends ``failed`` or ``canceled`` fails the node (and so the workflow).

    Raises :class:`~asyncflow.errors.InvalidStateError` outside a worker's ``run()`` (a ``wait_check``
    included) and when the instance is no longer active (canceled or failed while ``run()`` ran: the
    child is then canceled at once), :class:`~asyncflow.errors.ParamInvalidError` for an empty or
    non-``str`` key or type, or a key already used in this node for a child of another workflow type, and
    :class:`~asyncflow.errors.ConfigNotFoundError` for an unknown workflow type.
    """
    call = _current_call.get(None)
    if call is None or call.next_nodes is None:
        raise InvalidStateError("asyncflow.start_child_workflow() is only available inside a worker's run()")
    if not isinstance(workflow_type, str) or not workflow_type:
        raise ParamInvalidError(
            f"start_child_workflow(): workflow_type must be a non-empty str, got {shown(workflow_type)}"
        )
    if not isinstance(key, str) or not key:
        raise ParamInvalidError(f"start_child_workflow(): key must be a non-empty str, got {shown(key)}")
    start = call.start
    if start is None:
        raise LockFailedError("this pass runs without a service: it cannot start child workflows")
    child = await start(call.instance, call.task_type, workflow_type, key, context)
    if key not in call.keys:
        call.keys = [*call.keys, key]
    return child
