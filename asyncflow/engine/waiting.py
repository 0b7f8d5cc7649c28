"""``wait_for_workflow``: waiters of one service, woken when their instance ends.

Every waiter registers a future under its instance id, then reads the instance. It is woken:

* at once when the instance ends through this service (it calls :meth:`Waiters.finished` after a
  pass or a cancel that ended it);
* on PostgreSQL, when it ends elsewhere (another process, another service): one LISTEN connection (the repo's
  ``listen_finished``), started with the first waiter and asked to stop by the last, serves every
  waiter of the service. The last waiter does not wait for it to stop (a connection still being
  opened to a slow database would hold it up past its timeout): the stopping task is kept, and the
  service's ``aclose()`` (:meth:`Waiters.aclose`) waits for it, for :data:`LISTENER_STOP_GRACE`
  seconds, then cancels it. Only watched instances notify: a waiter first asks the repo to watch its
  instance (``watch_finished``, which flags the row), then reads it;
* otherwise by polling: the waiter re-reads its instance every :data:`POLL_INTERVAL` seconds
  (:data:`LISTENING_POLL_INTERVAL` while the LISTEN connection is up, as a safety net).

A woken waiter re-reads its instance and returns it if it is terminal.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .._held import wait_to_end
from ..errors import InstanceNotFoundError
from ..records import WorkflowInstanceRecord
from ..status import TERMINAL_STATUSES
from ..store.protocol import DueListener, ListensFinished, WatchesFinished, WorkflowRepo

__all__ = ["LISTENER_STOP_GRACE", "LISTENING_POLL_INTERVAL", "POLL_INTERVAL", "Waiters"]

logger = logging.getLogger("asyncflow.engine")

POLL_INTERVAL = 1.0
"""Seconds between a waiter's reads of its instance when no wake-up can reach it."""

LISTENING_POLL_INTERVAL = 10.0
"""Seconds between a waiter's reads while a LISTEN connection carries the wake-ups."""

LISTENER_STOP_GRACE = 2.0
"""Seconds :meth:`Waiters.aclose` lets a stopped LISTEN task end on its own (closing its connection, or
one it is opening) before it cancels it."""


class Waiters:
    """The waiters of one service (see the module doc)."""

    def __init__(self, repo: WorkflowRepo) -> None:
        self._repo = repo
        self._futures: dict[int, set[asyncio.Future[None]]] = {}
        self._count = 0
        self._listener: DueListener | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()  # asked to stop, not ended yet
        self._closed = False  # after aclose(): waiters poll

    @property
    def waiting(self) -> int:
        """Waiters right now."""
        return self._count

    @property
    def listening(self) -> bool:
        """Whether a LISTEN connection carries wake-ups right now."""
        return self._listener is not None and self._listener.listening

    def finished(self, instance_id: int | None) -> None:
        """Wake the waiters of ``instance_id`` (``None``: every waiter, to re-read)."""
        if instance_id is None:
            groups = list(self._futures.values())
        else:
            futures = self._futures.get(instance_id)
            if futures is None:  # no one waits for it: every pass that ends an instance comes here
                return
            groups = [futures]
        for futures in groups:
            for future in futures:
                if not future.done():
                    future.set_result(None)

    async def wait(
        self, instance_id: int, read: Callable[[int], Awaitable[WorkflowInstanceRecord | None]]
    ) -> WorkflowInstanceRecord:
        """The instance once it is terminal (cancel the call, e.g. with a timeout, to give up)."""
        self._count += 1
        self._start_listening()
        watch = self._repo.watch_finished if isinstance(self._repo, WatchesFinished) else None
        try:
            while True:
                future = asyncio.get_running_loop().create_future()
                self._futures.setdefault(instance_id, set()).add(future)
                try:
                    if watch is not None:  # once: the flag stays on the row
                        await watch(instance_id)
                        watch = None
                    record = await read(instance_id)  # after registering: an end from now on wakes us
                    if record is None:
                        raise InstanceNotFoundError(f"workflow instance {instance_id} not found")
                    if record.status in TERMINAL_STATUSES:
                        return record
                    interval = LISTENING_POLL_INTERVAL if self.listening else POLL_INTERVAL
                    # not wait_for(shield(...)): on 3.11 it returns a result that is ready instead
                    # of raising a cancel (a timeout) that arrives in the same step
                    await asyncio.wait([future], timeout=interval)
                finally:
                    futures = self._futures.get(instance_id)
                    if futures is not None:
                        futures.discard(future)
                        if not futures:
                            del self._futures[instance_id]
        finally:
            self._count -= 1
            if self._count == 0:
                self._stop_listening()

    def _start_listening(self) -> None:
        if self._listen_task is not None or self._closed or not isinstance(self._repo, ListensFinished):
            return
        listener = self._repo.listen_finished(self.finished)
        if listener is None:
            return
        self._listener = listener
        self._listen_task = asyncio.create_task(listener.run(), name="asyncflow-wait-listen")
        self._listen_task.add_done_callback(_report)

    def _stop_listening(self) -> None:
        """The last waiter leaves: ask the LISTEN to end (a new waiter starts another), without
        waiting for it; :meth:`aclose` waits for the tasks still stopping."""
        task, listener = self._listen_task, self._listener
        self._listen_task = self._listener = None
        if task is not None and listener is not None:
            stop = getattr(listener, "stop", None)
            if callable(stop):
                stop()  # cooperative: a connection being opened right now is closed too
            else:
                task.cancel()
            if not task.done():
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)

    async def aclose(self) -> None:
        """End the LISTEN tasks (the waiters' own, if some still wait: they poll from now on, as
        waiters that come later do), waiting :data:`LISTENER_STOP_GRACE` for them to stop, then
        cancelling those left. A cancellation of this call cancels them too, and still waits."""
        self._closed = True
        self._stop_listening()
        self.finished(None)  # waiters still waiting re-read now, and poll
        tasks = set(self._stopping)
        if not tasks:
            return
        try:
            _, left = await asyncio.wait(tasks, timeout=LISTENER_STOP_GRACE)
        except asyncio.CancelledError:
            left = tasks
            raise
        finally:
            for task in left:
                task.cancel()
            if left:
                await wait_to_end(left)


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the wait_for_workflow listener stopped: %r", task.exception())
