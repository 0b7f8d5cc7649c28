"""Observers: hooks the service calls as instances and nodes move (metrics, traces, audit).

A :class:`WorkflowObserver` may define any of its methods, as plain or ``async def``. The service
calls them through one :class:`ObserverSet`, which keeps every pass safe from them:

* a plain method is called inline (it must be quick, like a logging handler); an exception it raises
  is logged (with its traceback the first time, for each observer, hook and exception type) and
  dropped; a call slower than ``slow_call`` seconds is logged once per observer and hook;
* an ``async`` method (or a plain one that returns an awaitable) runs as a task of its own that the
  pass never awaits: it gets ``timeout`` seconds, then is cancelled (logged); at most ``max_pending``
  such tasks run at once, calls beyond that are dropped (logged, counted in :attr:`ObserverSet.dropped`).
  :meth:`ObserverSet.aclose` (called by ``WorkflowService.aclose()``) waits for them briefly, then
  cancels the rest: no task outlives the service.

With no observer, the service does none of this: the pass does not even build the arguments.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from ..errors import ParamInvalidError

if TYPE_CHECKING:
    from ..records import WorkflowInstance
    from ..worker import NodeInfo

__all__ = ["HOOKS", "OUTCOMES", "NodeOutcomeName", "ObserverSet", "WorkflowObserver"]

logger = logging.getLogger("asyncflow.observers")

NodeOutcomeName = Literal[
    "completed", "pending", "not_ready", "retry", "failed_continue", "failed", "skipped", "interrupted"
]

#: what ``node_finished`` reports for one attempt of a node (``interrupted``: the pass was cut, by a
#: cancel or restart that changed the instance under it, a lost lease, a store error or a cancellation)
OUTCOMES: tuple[str, ...] = (
    "completed",
    "pending",
    "not_ready",
    "retry",
    "failed_continue",
    "failed",
    "skipped",
    "interrupted",
)

HOOKS = ("trace_context", "instance_created", "node_started", "node_finished", "instance_finished")


@runtime_checkable
class WorkflowObserver(Protocol):
    """What the service tells observers. Every method is optional and may be plain or ``async def``.

    * ``instance_created(instance)``: a new :class:`~asyncflow.records.WorkflowInstance` was stored;
    * ``node_started(node)``: an attempt of a node (its ``run`` and/or ``wait_check``) begins;
      ``node`` is the :class:`~asyncflow.worker.NodeInfo` the worker sees;
    * ``node_finished(node, outcome, error, duration)``: the attempt ended; ``outcome`` is one of
      :data:`OUTCOMES`, ``error`` the exception the worker raised (or ``None``), ``duration`` seconds;
    * ``instance_finished(instance)``: the instance became ``completed``, ``failed`` or ``canceled``
      (by this process);
    * ``trace_context()`` (plain only): a string stored with a new instance and handed back in
      ``NodeInfo.trace_context`` (the OpenTelemetry observer stores a W3C ``traceparent``).

    Every ``node_started`` is followed by exactly one ``node_finished`` for the same ``NodeInfo``. A node
    that ends ``skipped`` (a branch not chosen, or a skip propagated by a join) never runs: it is
    reported when its ``skipped`` row is written, as ``node_started`` immediately followed by
    ``node_finished(node, "skipped", None, 0.0)``.
    """


_Call = tuple[Callable[..., Any], Any]  # (bound method, observer)


class ObserverSet:
    """The observers of one service, called safely (see the module docstring)."""

    def __init__(
        self,
        observers: Iterable[object] = (),
        *,
        timeout: float = 10.0,
        max_pending: int = 1000,
        slow_call: float = 0.05,
    ) -> None:
        self._hooks: dict[str, list[_Call]] = {name: [] for name in HOOKS}
        self._timeout = timeout
        self._max_pending = max_pending
        self._slow_call = slow_call
        self._pending: set[asyncio.Task[None]] = set()
        self._reported: set[tuple[int, str, str]] = set()
        self.dropped = 0
        self.close_wait = 1.0
        self.active = False
        for observer in observers:
            self.add(observer)

    def add(self, observer: object) -> None:
        """Call ``observer``'s hooks too. An object with none of them is a ``ParamInvalidError``."""
        found = False
        for name in HOOKS:
            method = getattr(observer, name, None)
            if method is None:
                continue
            if not callable(method):
                raise ParamInvalidError(f"observer {observer!r}: {name} is not callable")
            if name == "trace_context" and inspect.iscoroutinefunction(method):
                raise ParamInvalidError(f"observer {observer!r}: trace_context must be a plain method")
            self._hooks[name].append((method, observer))
            found = True
        if not found:
            raise ParamInvalidError(
                f"observer {observer!r} has none of the WorkflowObserver methods ({', '.join(HOOKS[1:])})"
            )
        self.active = True

    @property
    def pending(self) -> int:
        """Async observer calls still running."""
        return len(self._pending)

    # ------------------------------------------------------------------ the hooks

    def trace_context(self) -> str | None:
        """The first non-empty ``trace_context()`` of the observers (``None`` if none gives one)."""
        for method, observer in self._hooks["trace_context"]:
            try:
                value = method()
            except Exception as exc:
                self._failed(observer, "trace_context", exc)
                continue
            if isinstance(value, str) and value:
                return value
        return None

    def instance_created(self, instance: WorkflowInstance) -> None:
        self._emit("instance_created", (instance,))

    def node_started(self, node: NodeInfo) -> None:
        self._emit("node_started", (node,))

    def node_finished(
        self, node: NodeInfo, outcome: str, error: BaseException | None, duration: float
    ) -> None:
        self._emit("node_finished", (node, outcome, error, duration))

    def instance_finished(self, instance: WorkflowInstance) -> None:
        self._emit("instance_finished", (instance,))

    # ------------------------------------------------------------------ dispatch

    def _emit(self, hook: str, args: tuple[Any, ...]) -> None:
        for method, observer in self._hooks[hook]:
            started = time.perf_counter()
            try:
                result = method(*args)
            except Exception as exc:
                self._failed(observer, hook, exc)
                continue
            if inspect.isawaitable(result):
                self._schedule(observer, hook, result)
                continue
            took = time.perf_counter() - started
            if took > self._slow_call and self._first(observer, hook, "slow"):
                logger.warning(
                    "observer %r took %.3f s in %s, called inline: a slow observer delays passes "
                    "(make it async def, or hand the work to a queue)",
                    observer,
                    took,
                    hook,
                )

    def _schedule(self, observer: object, hook: str, awaitable: Awaitable[Any]) -> None:
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            _close(awaitable)
            if self._first(observer, hook, "dropped"):
                logger.warning(
                    "observer %r is too slow: %d of its calls still run; %s calls are dropped meanwhile",
                    observer,
                    len(self._pending),
                    hook,
                )
            return
        try:
            task = asyncio.get_running_loop().create_task(
                self._guarded(observer, hook, awaitable), name=f"asyncflow-observer-{hook}"
            )
        except RuntimeError:  # no running loop (a plain method returned an awaitable off the loop)
            _close(awaitable)
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _guarded(self, observer: object, hook: str, awaitable: Awaitable[Any]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await awaitable
        except TimeoutError:
            if self._first(observer, hook, "timeout"):
                logger.warning(
                    "observer %r: %s took over %.1f s and was cancelled", observer, hook, self._timeout
                )
        except Exception as exc:
            self._failed(observer, hook, exc)

    def _failed(self, observer: object, hook: str, exc: Exception) -> None:
        first = self._first(observer, hook, type(exc).__qualname__)
        logger.log(
            logging.ERROR if first else logging.DEBUG,
            "observer %r failed in %s (ignored): %r",
            observer,
            hook,
            exc,
            exc_info=exc if first else None,
        )

    def _first(self, observer: object, hook: str, kind: str) -> bool:
        key = (id(observer), hook, kind)
        if key in self._reported or len(self._reported) > 10_000:
            return False
        self._reported.add(key)
        return True

    async def aclose(self) -> None:
        """Wait up to ``close_wait`` s for async observer calls still running, then cancel them."""
        timeout = self.close_wait
        if not self._pending:
            return
        tasks = set(self._pending)
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=timeout)
            logger.warning("cancelled %d observer calls still running at close", len(late))


def _close(awaitable: Awaitable[Any]) -> None:
    """Close a coroutine that will never run (no "never awaited" warning)."""
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()
