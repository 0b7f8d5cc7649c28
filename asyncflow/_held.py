"""Writes that land whole under cancellation and still report what they wrote.

A pass must know whether a step it started was written, even when its task is cancelled meanwhile (a
``first`` join dropping the node, a failing sibling branch, shutdown): the rows a written step changed
are what its later steps compare versions against. The engine used to run every step in a task of
its own and shield it (a task, a shield future and two extra event-loop turns per step); a repo whose
``apply_step`` is marked :func:`holds_cancellation` does the same work inline instead:

* it waits for its statement whatever happens to its caller (a write lands whole or not at all);
* a cancellation that arrives meanwhile is **deferred**: once the write is done the call returns its
  result, and the cancellation is raised at the task's next ``await`` (:func:`defer`);
* if the write failed, the cancellation is raised at once (the failure is moot).

The engine awaits inline only an ``apply_step`` that carries the mark; anything else (a wrapper, a
subclass that overrides it, another repo) runs in a task of its own under :func:`run_held`, with the
same outcome. The repo
holds only while :data:`HOLD_STEPS` is set in the caller's context (the engine sets it around its
step): any other caller of ``apply_step`` keeps the plain behaviour, where a cancelled call returns at
once (its statement may still land).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

__all__ = [
    "HOLD_STEPS",
    "HeldFuture",
    "defer",
    "held_if_asked",
    "holds_cancellation",
    "is_held",
    "run_held",
    "wait_cancelling",
    "wait_to_end",
]

HOLD_STEPS: contextvars.ContextVar[bool] = contextvars.ContextVar("asyncflow_hold_steps", default=False)
"""Set by the engine around a step it awaits inline: the repo's ``apply_step`` then holds."""

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_MARK = "_asyncflow_holds_cancellation"


def holds_cancellation(function: F) -> F:
    """Mark a coroutine function as one that defers its caller's cancellation (see the module)."""
    setattr(function, _MARK, True)
    return function


def is_held(method: object) -> bool:
    """Whether ``method`` (a function or a bound method) carries the :func:`holds_cancellation` mark."""
    return getattr(method, _MARK, False) is True


def defer(cancel: asyncio.CancelledError) -> None:
    """Put a cancellation of the current task back, to be raised at its next ``await`` (the number of
    cancellation requests, which ``asyncio.timeout`` and task groups read, stays the same)."""
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - a cancellation always has a task
        raise cancel
    task.uncancel()
    task.cancel(cancel.args[0] if cancel.args else None)


class HeldFuture(asyncio.Future[T]):
    """A future its awaiting task's cancellation cannot cancel: ``cancel()`` refuses (returns False),
    so the task's cancellation waits until the future is done. :meth:`abandon` cancels it for real."""

    def cancel(self, msg: Any | None = None) -> bool:
        return False

    def abandon(self) -> bool:
        """Cancel the future (its outcome will never come: its batch was cut)."""
        return super().cancel()


async def run_held(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if the caller is cancelled meanwhile; then return its result and
    :func:`defer` the cancellation, or, if it failed, raise the cancellation."""
    inner = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError as cancel:
        while not inner.done():  # later cancellations are absorbed: this one is raised or deferred
            try:
                await asyncio.shield(inner)
            except asyncio.CancelledError:
                continue
            except Exception:  # the write's own failure is moot: the caller is being cancelled
                break
        if inner.cancelled() or inner.exception() is not None:
            raise
        defer(cancel)
        return inner.result()


async def held_if_asked(aw: Awaitable[T]) -> T:
    """``aw`` under :func:`run_held` while :data:`HOLD_STEPS` is set (the engine's step), else as it is."""
    return await (run_held(aw) if HOLD_STEPS.get() else aw)


async def wait_to_end(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Wait until every task is done, even through cancellations of the caller (none is left running
    behind it), then raise the last of those cancellations."""
    tasks = tuple(tasks)
    cancelled: asyncio.CancelledError | None = None
    while not all(task.done() for task in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError as error:
            cancelled = error
    if cancelled is not None:
        raise cancelled


async def wait_cancelling(pending: Callable[[], list[asyncio.Task[Any]]]) -> None:
    """Wait until ``pending()`` (read again after each wait) holds no task, as a task group waits for
    its tasks: a cancellation of the caller meanwhile cancels the tasks still pending, waits on (tasks
    that ignore it included), and is raised once none is left. (:func:`wait_to_end` cancels none.)"""
    cancelled: asyncio.CancelledError | None = None
    while tasks := pending():
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError as error:
            cancelled = error
            for task in tasks:
                task.cancel()
    if cancelled is not None:
        raise cancelled
