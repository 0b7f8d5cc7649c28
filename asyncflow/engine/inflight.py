"""Work in flight: a node attempt that lasts is stored as ``running`` (or keeps ``pending``) with its
progress while it runs.

A :class:`NodeWatch` accompanies every worker call of a pass. It costs a quick node no write and next
to no CPU: with ``visible_after`` set, the call is entered in the service's :class:`Watchtower` (a dict
entry) when it starts and removed when it ends. The watchtower is one task per service that wakes every
quarter of ``visible_after`` while calls are in flight (and ends when none are); for a call that has
lasted ``visible_after`` seconds it has the pass write the node's row as ``running`` with its
``started_at`` (one step, fenced by the pass's lease epoch like every other step). Arming an event
loop timer per call instead cost about 4.7 us of CPU per node on the reference machine; the dict
entry about 0.6 us. ``af.heartbeat(progress)`` keeps the latest progress and
writes it at most once per interval (throttled, trailing: the last progress reported is written).

The final write of the node is never overtaken by one of these: the call's end closes the watch (no
write starts after that) and waits for a write still in flight, so the final write is built on the
row that write left (its version) and is applied after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from ..status import SYSTEM, TaskStatus
from ..worker import WorkerCall

if TYPE_CHECKING:
    from ..definition import NodeDefinition
    from ..worker import ChildStart
    from .runner import PassRunner

__all__ = ["DEFAULT_BEAT_INTERVAL", "MIN_BEAT_INTERVAL", "NO_PROGRESS", "PROGRESS", "NodeWatch", "Watchtower"]

logger = logging.getLogger("asyncflow.engine")

DEFAULT_BEAT_INTERVAL = 1.0
"""Seconds between heartbeat writes when the service has no ``visible_after``."""

MIN_BEAT_INTERVAL = 0.1
"""The shortest time between two heartbeat writes of a node, even with a smaller ``visible_after``."""

PROGRESS = "progress"
"""The key under the node context's ``system`` where :func:`~asyncflow.heartbeat` stores progress."""

NO_PROGRESS: Any = object()

_RUN_PHASE = TaskStatus.RUNNING.value  # the phase of a ``run`` (``pending``: a ``wait_check``)


class NodeWatch(WorkerCall):
    """One worker call of a pass (``run`` in phase ``running``, ``wait_check`` in phase ``pending``),
    itself the call's :class:`~asyncflow.worker.WorkerCall` (the context variable the worker's
    ``af.*`` functions read): its own heartbeat target, the rest derived from the node and the pass.

    Built for every call, most of which never beat, last no ``visible_after`` and have no
    ``max_wait_time_ts``: the construction stores only what the call began with (no ``__slots__``:
    what a quick call never changes stays the class's default, set per watch only once it changes).
    ``started`` is the clock's ``monotonic()`` at the start (the heartbeat throttle counts from it);
    whether the node's row is already stored in ``phase`` is looked up when first needed (at once
    with a watchtower), as nothing but this watch writes the row while its call lasts.
    """

    # the state of a call that nothing has happened to yet (each is set on the watch when it changes)
    _timer: asyncio.TimerHandle | None = None
    _overdue: asyncio.TimerHandle | None = None
    _writer: asyncio.Task[None] | None = None
    _error: BaseException | None = None
    _dirty = False
    _closed = False
    _progress: Any = NO_PROGRESS
    _watched = False
    _visible: bool | None = None  # already stored in this phase (None: not looked up yet)
    _busy = False  # set for good once a timer, a write or the watchtower is involved (close_now() looks)
    _tower: Watchtower  # set with a watchtower only

    def __init__(
        self,
        runner: PassRunner,
        node: NodeDefinition,
        phase: str,
        context: dict[str, Any],
        fail_count: int,
        started_at: int,
        started: float,
        tower: Watchtower | None,
    ) -> None:
        self._runner = runner
        self._node = node
        self._phase = phase
        self._context = context
        self._fail_count = fail_count
        self._started_at = started_at
        self._last = started  # of the start, then of the last write (throttle)
        if tower is not None:
            self._tower = tower
            if not self._stored():
                self._watched = self._busy = True
                tower.add(self)
        if node.max_wait_time_ts > 0:
            self._arm_overdue()

    def _stored(self) -> bool:
        """Whether the node's row is stored in this phase (looked up once; a write of this watch sets it)."""
        visible = self._visible
        if visible is None:
            row = self._runner.row_of(self._node.task_type)
            visible = self._visible = row is not None and row.status == self._phase
        return visible

    @property
    def _interval(self) -> float:
        """Seconds between two writes of this watch (the heartbeat throttle)."""
        visible_after = self._runner.visible_after
        return DEFAULT_BEAT_INTERVAL if visible_after is None else max(visible_after, MIN_BEAT_INTERVAL)

    # ------------------------------------------------------------------ the worker call (for af.*)

    @property
    def task_type(self) -> str:
        return self._node.task_type

    @property
    def instance(self) -> Any:
        return self._runner.instance

    @property
    def beat_target(self) -> NodeWatch:
        return self

    @property
    def next_nodes(self) -> tuple[str, ...] | None:
        """For ``run`` only (``af.choose`` and children): not for a ``wait_check``."""
        return tuple(self._node.next_nodes) if self._phase == _RUN_PHASE else None

    @property
    def start(self) -> ChildStart | None:
        return self._runner.start_child

    # ------------------------------------------------------------------ the worker's side

    def beat(self, progress: object) -> None:
        """``af.heartbeat(progress)``: keep ``progress`` in the context; write it (throttled)."""
        system = self._context.get(SYSTEM)
        if not isinstance(system, dict):
            system = self._context[SYSTEM] = {}
        system[PROGRESS] = progress  # the final write keeps the last progress
        if self._closed:
            return
        self._progress = progress
        self._dirty = True
        if self._writer is not None or self._timer is not None or self._watched:
            return  # the write in flight loops once more / the timer or the watchtower writes it
        self._stored()  # looked up before a write of this watch can change the row
        wait = self._interval - (self._runner.clock.monotonic() - self._last)
        if wait <= 0:
            self._start_writer()
        else:
            self._busy = True
            self._timer = asyncio.get_running_loop().call_later(wait, self._due)

    # ------------------------------------------------------------------ the engine's side

    async def close(self) -> None:
        """The call ended: no write starts any more; wait for one in flight; raise what stopped it."""
        self._closed = True
        self._cancel_timers()
        writer = self._writer
        if writer is not None:
            await asyncio.wait([writer])  # the writer catches its errors: they are in _error
        if self._error is not None:
            raise self._error

    def close_now(self) -> bool:
        """:meth:`close` without awaiting, when no write is in flight and none failed: True if it
        closed (else nothing changed: await :meth:`close`)."""
        if self._busy:  # else nothing but the close to do (most calls)
            if self._writer is not None or self._error is not None:
                return False
            self._closed = True
            self._cancel_timers()
            return True
        self._closed = True
        return True

    def abort(self) -> asyncio.Task[None] | None:
        """The call was cut (cancelled): stop the timers; a write in flight lands: the pass waits for it."""
        self._closed = True
        self._cancel_timers()
        return self._writer

    def _cancel_timers(self) -> None:
        if self._watched:
            self._watched = False
            self._tower.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None

    def visible_due(self) -> None:
        """The watchtower: the call has lasted ``visible_after``; store the node as in flight."""
        self._watched = False
        if self._closed or self._writer is not None or self._visible:
            return
        self._start_writer()

    def _due(self) -> None:
        self._timer = None
        if self._closed or self._writer is not None:
            return
        if self._stored() and not self._dirty:
            return
        self._start_writer()

    def _start_writer(self) -> None:
        self._busy = True
        self._writer = self._runner.spawn_write(self._write(), self._node.task_type)

    async def _write(self) -> None:
        runner = self._runner
        try:
            while not self._closed:
                self._dirty = False
                await runner.show_in_flight(
                    self._node, self._phase, self._progress, self._fail_count, self._started_at
                )
                self._visible = True
                self._last = runner.clock.monotonic()
                if not self._dirty or self._closed:
                    break
                # heartbeats arrived during the write: the next one after a full interval (trailing)
                self._timer = asyncio.get_running_loop().call_later(self._interval, self._due)
                break
        except Exception as exc:  # the pass stopped, the lease was lost, the store failed
            self._error = exc
            self._closed = True
            self._cancel_timers()
            runner.interrupt(self._node.task_type)
        finally:
            self._writer = None

    def _arm_overdue(self) -> None:
        clock = self._runner.clock
        left = self._started_at + self._node.max_wait_time_ts - clock.time()
        self._busy = True
        self._overdue = asyncio.get_running_loop().call_later(max(left, 0.0) + 0.001, self._check_overdue)

    def _check_overdue(self) -> None:
        self._overdue = None
        if self._closed:
            return
        runner = self._runner
        age = runner.clock.time() - self._started_at
        if age <= self._node.max_wait_time_ts:
            left = self._node.max_wait_time_ts - age
            self._overdue = asyncio.get_running_loop().call_later(max(left, 1.0), self._check_overdue)
            return
        runner.warn_overdue(self._node, age)


class Watchtower:
    """The ``visible_after`` clock of one service: the calls in flight and when each becomes visible.

    One task (``asyncflow-visible-after``) wakes every quarter of ``visible_after`` (at least 5 ms) while
    calls are entered, so a slow node is stored within 1.25 x ``visible_after`` of its start; it ends
    after a few idle ticks and starts again with the next call. :meth:`aclose` cancels it.
    """

    def __init__(self, visible_after: float) -> None:
        self._after = visible_after
        self._tick = max(visible_after / 4, 0.005)
        self._watches: dict[NodeWatch, float] = {}  # watch -> time.monotonic() it becomes visible
        self._task: asyncio.Task[None] | None = None

    def add(self, watch: NodeWatch) -> None:
        self._watches[watch] = time.monotonic() + self._after
        task = self._task
        if task is None or task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="asyncflow-visible-after")

    def discard(self, watch: NodeWatch) -> None:
        self._watches.pop(watch, None)

    async def _run(self) -> None:
        idle = 0
        while idle < 4:
            await asyncio.sleep(self._tick)
            if not self._watches:
                idle += 1
                continue
            idle = 0
            now = time.monotonic()
            due = [watch for watch, at in self._watches.items() if at <= now]
            for watch in due:
                del self._watches[watch]
                try:
                    watch.visible_due()
                except Exception:  # never let one node stop the others from being shown
                    logger.exception("asyncflow: storing a node in flight failed")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        self._watches.clear()
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
