"""Group commit: steps that wait at the same time go to the database together, as one commit.

A workflow pass needs each step durable before it goes on, but many passes run at once, and each
step alone costs a round trip (or a trip to SQLite's thread), a commit (an fsync) and the driver's
per-statement work. :class:`StepBatcher` keeps at most ``slots`` batches in flight; steps submitted
meanwhile (and in the same event-loop turn) queue up and leave together. A full queue found with
nothing in flight leaves as two halves: the database then works on one while the process handles the
other's outcomes, instead of each waiting for the other. The backend's runner
applies each step of a batch on its own (PostgreSQL: first all in one statement, then, if any step is
refused, each in a subtransaction; SQLite: a SAVEPOINT each), so one step's failed condition or error
rolls back that step alone, and commits the batch once. Under light load a step
goes alone, as before; a caller cancelled while waiting does not stop its batch (its step lands
whole or not at all, as a single statement would).
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from .._held import HeldFuture, defer

__all__ = ["StepBatcher"]

T = TypeVar("T")

_ORDER = operator.itemgetter(0)
"""A queued entry's ``order`` (a C call, not a lambda: every batch sorts by it)."""
_ITEM = operator.itemgetter(1)
_FUTURE = operator.itemgetter(2)
"""A queued entry's item and future, picked by ``map`` in C rather than unpacked in a loop."""

BatchRunner = Callable[[Sequence[T]], Awaitable[Sequence[Any]]]
"""Applies a batch; one outcome per item, in order. An exception outcome is raised in its caller; an
exception the runner raises is raised in every caller of the batch."""


class StepBatcher(Generic[T]):
    """Queues items and hands them to ``run`` in batches of at most ``max_batch``, ``slots`` at a time."""

    def __init__(self, run: BatchRunner[T], *, slots: int, max_batch: int) -> None:
        self._runner = run
        self._slots = max(1, slots)
        self._max_batch = max_batch
        self._queue: list[tuple[int, T, asyncio.Future[Any]]] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, order: int, item: T, *, hold: bool = False) -> Any:
        """The outcome of ``item`` once its batch is done (batches are sorted by ``order``).

        ``hold``: a cancellation of the caller waits for the outcome; an outcome that is a result is
        then returned and the cancellation deferred to the caller's next ``await``
        (:mod:`asyncflow._held`); otherwise the cancellation is raised.

        :meth:`enqueue` and :meth:`held_outcome` do the same without this coroutine (a caller on
        every step of every pass awaits the future itself)."""
        future = self.enqueue(order, item, hold)
        if not hold:
            return await future
        try:
            return await future
        except asyncio.CancelledError as cancel:
            return self.held_outcome(future, cancel)

    def enqueue(self, order: int, item: T, hold: bool = False) -> asyncio.Future[Any]:
        """Queue ``item``; the future of its outcome, for the caller to await (see :meth:`submit`).

        Awaiting it is :meth:`submit` without ``hold``. With ``hold`` the future refuses its caller's
        cancellation (:class:`~asyncflow._held.HeldFuture`): the caller then awaits it in ``try`` and
        hands the ``CancelledError`` it catches to :meth:`held_outcome`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = HeldFuture(loop=loop) if hold else loop.create_future()
        self._queue.append((order, item, future))
        if not self._scheduled and self._inflight < self._slots:  # a start to come takes it otherwise
            self._schedule(loop)
        return future

    @staticmethod
    def held_outcome(future: asyncio.Future[Any], cancel: asyncio.CancelledError) -> Any:
        """The outcome of a held future (:meth:`enqueue` with ``hold``) whose caller was cancelled while
        awaiting it (the future is done then): a result is returned and the cancellation deferred to
        the caller's next ``await``; after an error outcome, or a cut batch, the cancellation is raised."""
        if future.cancelled() or future.exception() is not None:
            raise cancel
        defer(cancel)
        return future.result()

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start batches after this turn: what else is submitted in it joins.

        The first batch's task is made now and takes its batch when it starts (a task starts one loop
        turn later): that is the turn's end, with no callback of its own to get there. An application's
        task factory (``asyncio.eager_task_factory``) may run a task at once, before the turn's other
        steps are queued: then a callback starts the batches, as before."""
        self._scheduled = True
        if loop.get_task_factory() is None:
            self._launch(loop, None)
        else:
            loop.call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        loop = asyncio.get_running_loop()
        while self._queue and self._inflight < self._slots:
            self._launch(loop, self._take())

    def _take(self) -> list[tuple[int, T, asyncio.Future[Any]]]:
        """The next batch off the queue (which is not empty), counted in flight."""
        size = self._max_batch
        if self._inflight == 0 and self._slots > 1 and len(self._queue) >= size:
            # nothing in flight and a full batch waiting: two halves, so that the database works
            # on one while this process handles the outcomes of the other (one big batch makes
            # each wait for the other)
            size = min(size, (len(self._queue) + 1) // 2)
        batch, self._queue = self._queue[:size], self._queue[size:]
        batch.sort(key=_ORDER)  # rows locked in one order: no deadlock between batches
        self._inflight += 1
        return batch

    def _launch(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[int, T, asyncio.Future[Any]]] | None
    ) -> None:
        tasks = self._tasks
        if len(tasks) > 2 * self._slots:
            # ended batches leave here, a few at a time, rather than by a done callback each (an
            # event-loop callback per batch): at most ``slots`` batches (and a start) are running
            tasks.difference_update([task for task in tasks if task.done()])
        task = loop.create_task(self._run(batch), name="asyncflow-step-batch")
        tasks.add(task)

    async def _run(self, batch: list[tuple[int, T, asyncio.Future[Any]]] | None) -> None:
        """Apply ``batch``; ``None``: this task starts the batches (:meth:`_schedule`): it takes the
        first itself and gives each other one that a free slot allows a task of its own."""
        if batch is None:
            self._scheduled = False
            if not self._queue or self._inflight >= self._slots:  # pragma: no cover - never so
                return
            batch = self._take()
            if self._queue and self._inflight < self._slots:
                loop = asyncio.get_running_loop()
                while self._queue and self._inflight < self._slots:
                    self._launch(loop, self._take())
        try:
            outcomes = await self._runner(list(map(_ITEM, batch)))
            if len(outcomes) != len(batch):  # (compared here: zip's strict=True costs a keyword call)
                raise ValueError(f"{len(outcomes)} outcomes for a batch of {len(batch)}")
            for future, outcome in zip(map(_FUTURE, batch), outcomes):  # noqa: B905 - compared above
                if future.done():  # a caller cancelled meanwhile (not held)
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        except Exception as error:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
        except BaseException:
            for _, _, future in batch:
                if isinstance(future, HeldFuture):
                    future.abandon()
                else:
                    future.cancel()
            raise
        finally:
            self._inflight -= 1
            if self._queue and not self._scheduled and self._inflight < self._slots:
                self._schedule(asyncio.get_running_loop())

    async def aclose(self) -> None:
        """Wait for the batches in flight, and for those their ends start (items queued meanwhile).

        A cancellation or timeout that cuts the wait leaves the batches running: their steps may land
        (SQLite's thread runs a transaction to its end), so their callers get their outcomes, never a
        cancellation that nobody asked for (``gather`` would cancel them).

        An ended batch's task stays in ``_tasks`` until a later batch starts (:meth:`_launch` takes
        the ended ones out): the done tasks go here. (They used to leave by a done callback, which the
        event loop ran later; since Python 3.12, ``gather`` of tasks that are all done returns without
        yielding to the loop, so waiting until that callback emptied the set spun forever.)"""
        while self._tasks or self._scheduled:
            if not self._tasks:  # a batch ended and queued the next start: let it run
                await asyncio.sleep(0)
                continue
            tasks = tuple(self._tasks)
            await asyncio.wait(tasks)
            self._tasks.difference_update(tasks)
