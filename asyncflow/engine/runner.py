"""One pass over one instance (``run_workflow``): run every ready node as far as it can go now.

Nodes on independent branches run concurrently (bounded); a node's successors that become ready run in
the same pass. Every write is one atomic :class:`~asyncflow.records.Step`, conditional on what the pass
last saw (instance status, row versions) and fenced by the pass's lease epoch (taken with its first
read); a step that does not apply means someone else (a cancel, a restart, another runner) got there
first, and the pass stops without writing more. A stale pass (a newer pass of the instance began:
its lock was lost to an expiry, a Redis restart, a pause) is told so by the store and logged once; its
worker calls in flight are cancelled.

Writes per node: one (``completed``) for a node without a wait check, two (``pending`` then
``completed``) with one; with ``visible_after``, a node whose ``run`` lasts longer gets one more
(``running``, see :mod:`asyncflow.engine.inflight`), and heartbeats add throttled ones. The implicit
``root`` rides along with the first write of the pass and ``end`` (with the instance's completion)
with the write of the last node before it. Writes that do not advance
the workflow (not ready, retryable failures) are gathered into one final write together with the
instance's next due time. That due time is the earliest of the nodes' own: a retryable failure's
back-off counts from the end of its attempt, not from the end of the pass (a slow sibling branch
does not delay it), at no extra commit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import logging
import sys
import time
import types
from asyncio import current_task as _current_task
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

from .._held import HOLD_STEPS, is_held, run_held, wait_cancelling
from .._json_depth import MAX_JSON_DEPTH, json_depth_exceeds
from ..context import JSONContext, wrap_dict
from ..errors import LockFailedError, ParamInvalidError, TaskFailedTerminate, TaskNotReady, is_serious_error
from ..records import (
    TaskInsert,
    TaskInstanceRecord,
    TaskUpdate,
    WorkflowInstance,
    WorkflowInstanceRecord,
    new_step,
    new_task_insert,
    new_task_record,
    new_task_update,
)
from ..status import (
    END_NODE,
    PRE_NODE_CONTEXT,
    ROOT_NODE,
    RUNNABLE_INSTANCE_STATUSES,
    SYSTEM,
    InstanceStatus,
    TaskStatus,
    is_over_instance_status,
)
from ..worker import ChildStart, NodeInfo, _current_call
from .inflight import NO_PROGRESS, PROGRESS, NodeWatch, Watchtower
from .rules import (
    CHOSEN,
    Join,
    Outcome,
    build_node_context,
    chosen_of,
    classify_failure,
    edge_status,
    join_decision,
    propagate_skips,
    record_error,
    sanitize_json,
)

if TYPE_CHECKING:
    from ..clock import Clock
    from ..definition import NodeDefinition, WorkflowDefinition
    from ..lock.protocol import LockLease
    from ..retry import RetryPolicy
    from ..store.protocol import WorkflowRepo
    from .observers import ObserverSet

__all__ = [
    "CHILDREN",
    "CHILD_KEYS",
    "ChildStart",
    "PassRunner",
    "StallWarnings",
    "active_passes",
]

CHILD_KEYS = "child_keys"
"""The key under a node context's ``system`` where the engine keeps the keys of the children its
``run()`` started (``af.start_child_workflow``), in order."""
RETRY_AT = "retry_at"
"""The key under a node context's ``system`` where a retryable failure stores when (unix ms) the node
is retried: a driver's pass before that time leaves the node alone."""
CHILDREN = "children"
"""The key of a node's context that holds its children's results once they are all terminal."""

logger = logging.getLogger("asyncflow.engine")

_COMPLETED = TaskStatus.COMPLETED.value
_RUNNING = TaskStatus.RUNNING.value
_PENDING = TaskStatus.PENDING.value
_FINISHING = TaskStatus.FINISHING.value
_RESTARTING = TaskStatus.RESTARTING.value
_FAILED = TaskStatus.FAILED.value
_CANCELED = TaskStatus.CANCELED.value
_SKIPPED = TaskStatus.SKIPPED.value
_INSTANCE_INIT = InstanceStatus.INIT.value
_INSTANCE_RUNNING = InstanceStatus.RUNNING.value
_INSTANCE_COMPLETED = InstanceStatus.COMPLETED.value
_ACTIVE_INSTANCE = (_INSTANCE_INIT, _INSTANCE_RUNNING)
_SETTLED = (_COMPLETED, _FAILED, _CANCELED)
_FAILS_A_PARENT = (InstanceStatus.FAILED.value, InstanceStatus.CANCELED.value)  # a child ending so

STORED_DEPTH_SLACK = 8
"""Levels the engine's own keys (``node_event``, ``pre_node_context``, ...) and workers may add to a
context on top of :data:`~asyncflow._json_depth.MAX_JSON_DEPTH` before a pass refuses it."""

#: instance ids whose pass runs in the current asyncio context (a worker must not run its own instance)
active_passes: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "asyncflow_active_passes", default=frozenset()
)


class StallWarnings:
    """What a service has already warned about (bounded), so a stalled node warns once, not every poll."""

    def __init__(self, memory: int = 10_000) -> None:
        self._seen: collections.OrderedDict[tuple[int, str, str], None] = collections.OrderedDict()
        self._memory = memory

    def first_time(self, key: tuple[int, str, str]) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        while len(self._seen) > self._memory:
            self._seen.popitem(last=False)
        return True


class _Slots:
    """The pass's branch slots: a counting semaphore whose free slot is taken without the generator
    ``asyncio.Semaphore.locked()`` builds on every acquire (a node's hot path). A released slot goes
    straight to the longest waiter.

    :meth:`PassRunner._drive` takes a free slot itself (``free > 0`` and no ``waiters``: ``free -= 1``),
    without the coroutine of :meth:`acquire`, which waits for one otherwise; :meth:`release` returns it."""

    __slots__ = ("free", "waiters")

    def __init__(self, count: int) -> None:
        self.free = count
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled: hand it on
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise

    def release(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class _InContext:
    """Awaits a coroutine in the awaiting task, every step of it run in ``context`` (what a task of
    its own would do, without the task, its loop turns and its callbacks): the context variables it
    sets stay in ``context``. Cancellations and other exceptions thrown into the awaiting task go to
    the coroutine; its result or exception is the await's."""

    __slots__ = ("_context", "_coro")

    def __init__(self, coro: Coroutine[Any, Any, Any], context: contextvars.Context) -> None:
        self._coro = coro
        self._context = context

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        run = self._context.run
        send = coro.send
        try:
            yielded = run(send, None)
            while True:
                try:
                    sent = yield yielded
                except GeneratorExit:  # the awaiting coroutine is closed: close this one too
                    run(coro.close)
                    raise
                except BaseException as exc:
                    yielded = run(coro.throw, exc)
                else:
                    yielded = run(send, sent)
        except StopIteration as stop:
            return stop.value


async def _started_later(drive: Coroutine[Any, Any, None]) -> None:
    """``drive``, from the next loop turn on (whatever the task factory does); closed unstarted when
    the task is cancelled before that turn."""
    try:
        await asyncio.sleep(0)
    except BaseException:
        drive.close()
        raise
    await drive


class _PassStopped(Exception):
    """A step did not apply: the instance changed under the pass. Stop quietly."""


class _PassFailed(Exception):
    """A node failed the instance; stop the other branches."""


_NONE: Any = types.MappingProxyType({})
"""The empty, read-only dict a :class:`PassRunner` container holds until its first entry."""

_UNGROUPED = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)
"""What a task group raises as it is, not in an exception group, when its body raises it."""


_Write = TaskInsert | TaskUpdate


class PassRunner:
    """Runs one pass. Create one per pass, under the instance lock, with everything read under it."""

    # the pass's state before it begins (class attributes: an instance sets one when it changes)
    wake_again = False
    """Set when a child the pass waited for ended between the pass's look and its last write:
    the service makes the instance due again at once."""
    _main_task: asyncio.Task[Any] | None = None  # the task of run()
    _interrupted_here = False  # interrupt() cancelled the node run() drives itself
    _carrying = False  # a step carrying the root is in flight
    _carry_done: asyncio.Event | None = None  # set when it ends, made by a step that waits for it
    _tg: asyncio.TaskGroup | None = None  # entered at the start, or by the first spawn (_alone)
    _alone_over = False  # _alone() has waited for the visibility writes made without a task group
    _loose: set[asyncio.Task[None]] | frozenset[asyncio.Task[None]] = frozenset()  # those writes
    # what most passes never fill: an empty immutable default until the first entry (_NONE, a
    # read-only dict, or an empty tuple or frozenset), so that a pass does not make eight empty
    # containers (about 6,500 CPU instructions)
    _awaiting: dict[str, list[str]] = _NONE  # node -> the keys of its children not all terminal
    _deferred: dict[str, _Write] = _NONE  # node -> its write that goes with the pass's last step
    _carry: list[tuple[str, _Write]] | tuple[()] = ()  # the root's write, carried by the next step
    _due: list[int] | tuple[()] = ()  # when (ms) each node that did not advance wants the next pass
    _writers: dict[str, asyncio.Task[None]] = _NONE  # node -> its in-flight visibility write
    _outcomes: dict[str, tuple[str, Exception | None]] = _NONE  # a failed attempt's outcome (observers)
    _skipped_with: dict[str, list[str]] = _NONE  # completed node -> nodes skipped in its write
    _dropped: set[str] | frozenset[str] = frozenset()  # nodes a ``first`` join canceled in this pass
    _continued: set[str] | frozenset[str] = frozenset()  # nodes whose run() failed and continued
    _stopped = False

    def __init__(  # called positionally by the service: a type called with keywords builds a dict
        self,
        repo: WorkflowRepo,
        clock: Clock,
        lease: LockLease | None,
        instance: WorkflowInstanceRecord,
        definition: WorkflowDefinition,
        rows: list[TaskInstanceRecord],
        retry: RetryPolicy,
        default_fail_max_count: int | None,
        wait_interval: float,
        branch_concurrency: int,
        stalls: StallWarnings | None = None,
        observers: ObserverSet | None = None,
        visible_after: float | None = None,
        watchtower: Watchtower | None = None,
        start_child: ChildStart | None = None,
        drive_here: bool = False,
        due_only: bool = False,
    ) -> None:
        self._repo = repo
        self._due_only = due_only  # a driver's pass: a node waiting out its retry back-off is not run
        # see _drive_here: never with a ``first`` join; in a copy of the caller's context unless the
        # pass runs in a task asyncflow made for it
        self._drive_here_ok = not definition.feeds_first
        self._own_task = drive_here
        self._start_child = start_child
        self._clock = clock
        self._lease = lease
        self._instance = instance
        self._definition = definition
        self._node_of = definition._by_type  # its dict, read only (a node's hot path)
        self._lone_successors = definition.lone_successors
        self._rows: dict[str, TaskInstanceRecord] = {row.task_type: row for row in rows}
        self._retry = retry
        self._default_fail_max_count = default_fail_max_count
        self._wait_interval = wait_interval
        self._slots = _Slots(branch_concurrency)
        self._held_steps = is_held(repo.apply_step)  # its steps run inline, not in a task of their own
        self._status = instance.status
        self._visited: set[str] = set()
        self._visible_after = visible_after
        self._watchtower = watchtower if visible_after is not None else None
        self._stalls = stalls if stalls is not None else StallWarnings()
        self._observers = observers  # None when there are none: the pass then costs nothing extra
        if observers is not None:
            self._outcomes = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # node -> the task driving it (first joins)

    @property
    def dropped(self) -> list[str]:
        """The nodes a ``first`` join canceled in this pass, as committed (their rows say ``canceled``)."""
        if not self._dropped:
            return []
        rows = self._rows
        return [t for t in self._dropped if (row := rows.get(t)) is not None and row.status == _CANCELED]

    @property
    def continued(self) -> list[str]:
        """The nodes whose ``run()`` failed with ``TaskFailedContinue`` in this pass, as committed
        (completed): a child workflow such a ``run()`` started has no node to wait for it."""
        if not self._continued:
            return []
        rows = self._rows
        return [t for t in self._continued if (row := rows.get(t)) is not None and row.status == _COMPLETED]

    # ------------------------------------------------------------------ entry point

    async def run(self) -> WorkflowInstance:
        main = self._main_task = asyncio.current_task()
        cancels = 0 if main is None else main.cancelling()  # requests the caller had before the pass
        self._cancels = cancels
        token = active_passes.set(active_passes.get() | {self._instance.id})
        try:
            if await self._too_deep():
                return self._result()
            if self._rows and await self._repair():  # a new instance (no rows) has nothing to repair
                return self._result()
            try:
                ready = self._initially_ready()
                if len(ready) <= 1 and self._drive_here_ok and self._watchtower is None:
                    await self._alone(ready[0] if ready else None)  # a task group only once one is needed
                else:
                    async with asyncio.TaskGroup() as tg:
                        self._tg = tg
                        here = ready.pop(0) if ready and self._drive_here_ok else None
                        for task_type in ready:
                            self._spawn(task_type)
                        if here is not None:
                            await self._drive_here(here)
            except BaseExceptionGroup as group:
                _, rest = group.split((_PassStopped, _PassFailed))
                if rest is not None:
                    raise _first_leaf(rest) from None
            except (_PassStopped, _PassFailed):  # the lone branch's, raised without a task group
                pass
            except BaseException as exc:  # raised without a task group: what the group would raise
                if self._tg is not None or isinstance(exc, _UNGROUPED):
                    raise
                raise exc from None  # a group of one, as ``_first_leaf`` raises it
            finally:
                # Python 3.11's TaskGroup cancels its task when a branch fails while it waits for
                # the branches, and never takes that request back (CPython gh-116720): the caller
                # would keep it (its asyncio.timeout() would raise CancelledError). A cancellation
                # of the caller itself is raised out of the group instead, so what is left here is
                # the group's.
                if main is not None and sys.exc_info()[0] is not asyncio.CancelledError:
                    while main.cancelling() > cancels:
                        main.uncancel()
            if self._stopped:
                return await self._reload()
            if self._status in _ACTIVE_INSTANCE:
                await self._flush()
                if self._stopped:
                    return await self._reload()
                if self._awaiting:
                    await self._look_again()
            return self._result()
        finally:
            active_passes.reset(token)
            observers = self._observers
            if observers is not None and self._status != self._instance.status and self._status in _SETTLED:
                observers.instance_finished(self._result())  # this pass ended the instance

    # ------------------------------------------------------------------ readiness

    def _open(self, task_type: str) -> bool:
        """The node has not run yet (no row, or restarting)."""
        row = self._rows.get(task_type)
        return row is None or row.status == _RESTARTING

    def _edge(self, pre: str, node: str, overrides: dict[str, str] | None = None) -> str | None:
        row = self._rows.get(pre)
        status = overrides.get(pre) if overrides and pre in overrides else (row.status if row else None)
        return edge_status(status, chosen_of(row.node_context) if row else None, node)

    def _join(self, task_type: str, overrides: dict[str, str] | None = None) -> Join:
        node = self._node_of[task_type]
        join = "end" if task_type == END_NODE else node.join
        if overrides:
            return join_decision(join, [self._edge(p, task_type, overrides) for p in node.pre_nodes])
        rows = self._rows
        edges: list[str | None] = []
        for p in node.pre_nodes:  # _edge() inline (a node's hot path)
            row = rows.get(p)
            edges.append(
                None if row is None else edge_status(row.status, chosen_of(row.node_context), task_type)
            )
        return join_decision(join, edges)

    def _initially_ready(self) -> list[str]:
        ready = []
        if not self._rows:  # a new instance: a node with predecessors waits for them (no row yet)
            ready = list(self._definition.starts)
            self._visited.update(ready)
            return ready
        for node in self._definition.nodes:
            row = self._rows.get(node.task_type)
            if row is None or row.status == _RESTARTING:
                decision = self._join(node.task_type)
                if decision is Join.RUN:
                    ready.append(node.task_type)
                elif decision is Join.SKIP:  # e.g. a restarted node on a branch not taken
                    fail_count = 0 if row is None else row.fail_count
                    now = int(self._clock.time())
                    skip = _write_for(node.task_type, row, _SKIPPED, {}, fail_count, now)
                    self._defer(node.task_type, skip)  # written with the pass's last step
            elif row.status in (_RUNNING, _PENDING, _FINISHING):
                retry_at = self._backing_off(row)
                if retry_at is None:
                    ready.append(node.task_type)
                else:  # its back-off is its own: a pass a sibling (an event, a restart) asked for skips it
                    self._due = [*self._due, retry_at]
            elif row.status not in _SETTLED and row.status != _SKIPPED:  # left alone: say once why it stalls
                first = self._stalls.first_time((self._instance.id, node.task_type, row.status))
                logger.log(
                    logging.WARNING if first else logging.DEBUG,
                    "node %s of instance %s has status %r, which the engine does not run: the instance "
                    "cannot advance past it (restart the node to run it again)",
                    node.task_type,
                    self._instance.id,
                    row.status,
                    extra=self._extra(node.task_type, row.status),
                )
        self._visited.update(ready)
        return ready

    def _backing_off(self, row: TaskInstanceRecord) -> int | None:
        """When (ms) a node waiting out its retry back-off is due, if a driver's pass runs before that."""
        if not self._due_only:
            return None
        system = row.node_context.get(SYSTEM)
        retry_at = system.get(RETRY_AT) if isinstance(system, dict) else None
        if type(retry_at) is not int or retry_at <= int(self._clock.time() * 1000):
            return None
        return retry_at

    def _newly_ready(self, done: str) -> list[str]:
        """The successors of ``done`` (just completed, or skipped with it) that run now; marked visited."""
        if self._skipped_with and done in self._skipped_with:
            return self._newly_ready_after_skips(done, self._skipped_with.pop(done))
        ready: list[str] = []
        visited = self._visited
        rows = self._rows
        passes = None  # the edge from ``done``: looked up for the first successor it decides
        chosen = None
        for succ in self._node_of[done].next_nodes:
            if succ in visited:
                continue
            row = rows.get(succ)  # _open() inline (a node's hot path)
            if row is not None and row.status != _RESTARTING:
                continue
            if self._lone_successors.get(succ) == done:  # its one edge decides (the join of one edge)
                if passes is None:
                    pre = rows.get(done)
                    if pre is not None and pre.status == _COMPLETED:
                        passes = True
                        if pre.node_context.get(SYSTEM) is not None:  # chosen_of()'s common case inline
                            chosen = chosen_of(pre.node_context)
                    else:
                        passes = False
                if not passes or (chosen is not None and succ not in chosen):
                    continue
            elif self._join(succ) is not Join.RUN:
                continue
            visited.add(succ)
            ready.append(succ)
        return ready

    def _newly_ready_after_skips(self, done: str, skipped: list[str]) -> list[str]:
        """:meth:`_newly_ready` for a node whose completion skipped ``skipped``: their successors too."""
        ready: list[str] = []
        visited = self._visited
        for source in (done, *skipped):
            for succ in self._node_of[source].next_nodes:
                if succ in visited or not self._open(succ) or self._join(succ) is not Join.RUN:
                    continue
                visited.add(succ)
                ready.append(succ)
        return ready

    async def _alone(self, here: str | None) -> None:
        """The pass's branches when at most one node is ready at its start (and no ``first`` join, no
        watchtower): ``here`` is driven in the pass's own task (:meth:`_drive_here`) without a task
        group, entered (:meth:`_enter_group`) only once a second branch starts, and left here as
        ``async with`` would leave it. A task group costs about 9,000 CPU instructions per pass, and a
        linear workflow never needs one. Raises what the branch raised (or the group's exception
        group); :meth:`run` makes of a lone branch's exception what the group would have made of it.

        Visibility writes started while there is no group (:meth:`spawn_write`) are waited for here,
        as the group waits for its tasks, and cancelled first when the branch raised, as it cancels them."""
        failing = True  # (a flag, not sys.exc_info(): that also sees an exception the caller handles)
        try:
            if here is not None:
                await self._drive_here(here)
        except BaseException as exc:
            tg = self._tg
            if tg is not None:  # raises the group's exception group, or returns (as None): the branch's
                await tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            tg = self._tg
            if tg is not None:
                await tg.__aexit__(None, None, None)
            failing = False
        finally:
            self._alone_over = True  # no visibility write starts outside a group any more
            if self._loose:
                await self._settle_loose(failing)

    async def _enter_group(self) -> None:
        """Enter the pass's task group, in the pass's own task (:meth:`_alone` leaves it)."""
        tg = asyncio.TaskGroup()
        await tg.__aenter__()
        self._tg = tg

    async def _settle_loose(self, failing: bool) -> None:
        """Wait for the visibility writes started without a task group (cancelled first if ``failing``);
        a cancellation meanwhile cancels them and is raised once they are done (a task group's way)."""
        loose = self._loose  # no write joins it any more (_alone_over)
        if failing:
            for task in loose:
                task.cancel()
        await wait_cancelling(lambda: [task for task in loose if not task.done()])

    async def _drive_here(self, task_type: str) -> None:
        """:meth:`_drive` in the pass's own task (in its task group, if it has one yet): one task fewer
        per pass.

        Where the pass runs in a task asyncflow made for it (the driver's, ``drive_here``), the workers
        share that task's context; in a caller's task (``run_workflow``), a copy of the caller's
        context, as a task of the pass would have (a context variable a worker sets stays in the
        pass). Not with a ``first`` join (a branch that completes one waits for the tasks it cancels,
        and this task waits for the group). A node that :meth:`interrupt` cancels, or whose worker
        raised ``CancelledError`` of its own (nobody cancelled the task), ends as a node task would:
        the pass goes on."""
        try:
            if self._own_task:
                await self._drive(task_type)
            else:
                await _InContext(self._drive(task_type), contextvars.copy_context())
        except asyncio.CancelledError:
            main = self._main_task
            if main is None:
                raise
            if self._interrupted_here:
                self._interrupted_here = False
                if main.uncancel() > self._cancels:  # cancelled from outside too (or by the group): it stands
                    raise
            elif main.cancelling() > self._cancels:  # a cancellation of the pass's task
                raise

    def _spawn(self, task_type: str) -> None:
        """Drive ``task_type`` in a task of the pass's task group (entered already)."""
        tg = self._tg
        assert tg is not None
        drive = self._drive(task_type)
        if asyncio.get_running_loop().get_task_factory() is not None:
            # the application's task factory (asyncio.eager_task_factory, Python 3.12+) may run a
            # task at once, before the node that spawned it goes on: node tasks still start one loop
            # turn later, as asyncio's own do (branches start in config order, a ``first`` join drops
            # the siblings not started yet, a failing branch stops the others before they start)
            drive = _started_later(drive)
        try:
            tg.create_task(drive, name=f"asyncflow-{self._instance.id}-{task_type}")
        except BaseException:  # refused (the group is ending): closed unstarted, a wrapped one too
            drive.close()
            raise

    async def _drive(self, task_type: str) -> None:
        """Process a node, then keep going inline with one newly ready successor (spawn the others).

        The task keeps its branch slot from one node to the next unless another branch waits for one
        (nothing else can take it in between: no await), and gives it back when it stops."""
        current = task_type
        task = asyncio.current_task()
        tasks, slots, observers = self._tasks, self._slots, self._observers
        by_type = self._node_of
        held = False  # a branch slot
        try:
            while True:
                if current in self._dropped:  # a ``first`` join dropped it before this task began
                    return
                node = by_type[current]
                if current == ROOT_NODE:  # no work, no await (its write is carried): no slot, never a loser
                    self._carry_root(node)
                else:
                    if task is not None:
                        tasks[current] = task
                    try:
                        if held:
                            if slots.waiters:  # a waiting branch goes first, as when released after a node
                                held = False
                                slots.release()
                                await slots.acquire()
                                held = True
                        elif slots.free > 0 and not slots.waiters:  # a free slot: taken without a coroutine
                            slots.free -= 1
                            held = True
                        else:
                            await slots.acquire()
                            held = True
                        if observers is None or current == END_NODE:
                            completed = await self._process(node)
                        else:
                            completed = await self._observed(node, observers)
                    finally:
                        tasks.pop(current, None)
                    if not completed:
                        return
                ready = self._newly_ready(current)
                if not ready:
                    return
                if len(ready) > 1:
                    if self._tg is None:  # the first branch to spawn (the pass's own task, see _alone)
                        await self._enter_group()  # returns at once: no other task runs meanwhile
                    for other in ready[1:]:
                        self._spawn(other)
                current = ready[0]
        finally:
            if held:
                if slots.waiters:
                    slots.release()
                else:  # release() without waiters, inline
                    slots.free += 1

    # ------------------------------------------------------------------ one node

    async def _process(self, node: NodeDefinition) -> bool:
        """Advance one node as far as it goes; True when it ends the pass completed."""
        task_type = node.task_type
        row = self._rows.get(task_type)
        clock = self._clock
        if row is None:
            context = self._fresh_context(node, None)
            status = _RUNNING
            fail_count = 0
            started_at = int(clock.time())
        elif row.status == _RESTARTING:
            context = self._fresh_context(node, row)
            status, fail_count, started_at = _RUNNING, row.fail_count, row.started_at
        else:
            context, status = row.node_context, row.status
            fail_count, started_at = row.fail_count, row.started_at
            system = context.get(SYSTEM)  # only a stored context holds a back-off: a fresh one has no system
            if isinstance(system, dict) and RETRY_AT in system:
                del system[RETRY_AT]  # this is the retry
        if task_type == END_NODE:
            await self._write_completed(node, row, context, fail_count, started_at)
            return True
        ctx = wrap_dict(context)  # JSONContext.from_map(): wraps the pass's own dict (no copy)
        if status == _RUNNING:
            # the call under its NodeWatch (as _check() makes a wait_check's), inline: a node's hot path
            watch = NodeWatch(
                self, node, _RUNNING, context, fail_count, started_at, clock.monotonic(), self._watchtower
            )
            token = _current_call.set(watch)
            try:
                run = node.run_function  # an ``async def`` function: awaited without worker.run()'s frame
                await (node.worker.run(ctx) if run is None else run(ctx))
            except Exception as exc:
                _current_call.reset(token)
                await watch.close()  # what stopped a visibility write is raised: no failure of the worker's
                return await self._failed(
                    node, self._rows.get(task_type), context, _RUNNING, fail_count, started_at, exc
                )
            except BaseException:
                _current_call.reset(token)
                watch.abort()
                raise
            _current_call.reset(token)
            if not watch.close_now():  # a visibility write is in flight: wait for it
                await watch.close()
            row = self._rows.get(task_type)  # a visibility write may have stored it meanwhile
            if node.has_wait_check or watch.chosen is not None or watch.keys:  # else: completed now
                chosen = watch.chosen
                child_keys = watch.keys
                if chosen is not None or child_keys:  # kept with the context: a later pass completes it
                    system = context.get(SYSTEM)
                    if not isinstance(system, dict):
                        system = context[SYSTEM] = {}
                    if chosen is not None:
                        system[CHOSEN] = list(chosen)
                    if child_keys:
                        system[CHILD_KEYS] = list(child_keys)
                if node.has_wait_check or child_keys:
                    pending = _write_for(node.task_type, row, _PENDING, context, fail_count, started_at)
                    try:
                        row = await self._write_one(node.task_type, pending)
                    except ParamInvalidError as exc:
                        return await self._not_json(node, row, context, _RUNNING, fail_count, started_at, exc)
                    status = _PENDING
        if status == _PENDING:
            try:
                await self._children_done(node.task_type, context)
            except Exception as exc:
                return await self._failed(node, row, context, _PENDING, fail_count, started_at, exc)
            error = await self._check(node, ctx, context, fail_count, started_at)
            row = self._rows.get(task_type)
            if error is not None:
                return await self._failed(node, row, context, _PENDING, fail_count, started_at, error)
        try:
            await self._write_completed(node, row, context, fail_count, started_at)
        except ParamInvalidError as exc:
            return await self._not_json(node, row, context, status, fail_count, started_at, exc)
        return True

    async def _observed(self, node: NodeDefinition, observers: ObserverSet) -> bool:
        """:meth:`_process` between ``node_started`` and ``node_finished`` (always both)."""
        row = self._rows.get(node.task_type)
        info = NodeInfo(
            instance_id=self._instance.id,
            workflow_type=self._instance.workflow_type,
            business_id=self._instance.business_id,
            task_type=node.task_type,
            fail_count=0 if row is None else row.fail_count,
            trace_context=self._instance.trace_context,
        )
        observers.node_started(info)
        started = time.perf_counter()
        outcome: str = "interrupted"
        error: BaseException | None = None
        try:
            completed = await self._process(node)
            outcome, error = self._outcomes.pop(node.task_type, ("completed", None))
            return completed
        except _PassFailed:
            outcome, error = self._outcomes.pop(node.task_type, ("failed", None))
            raise
        except _PassStopped:
            raise
        except BaseException as exc:  # cancelled, lease lost, store error: the attempt was cut
            written = self._outcomes.pop(node.task_type, None)
            if written is not None:  # unless its end was written first (a cancellation deferred past it)
                outcome, error = written
            else:
                error = exc
            raise
        finally:
            observers.node_finished(info, outcome, error, time.perf_counter() - started)

    async def _not_json(
        self,
        node: NodeDefinition,
        row: TaskInstanceRecord | None,
        context: dict[str, Any],
        status: str,
        fail_count: int,
        started_at: int,
        exc: ParamInvalidError,
    ) -> bool:
        """The worker left a context that cannot be stored: a counted failure, stored sanitized."""
        problem = ParamInvalidError(f"the worker left a node context that is not JSON: {exc}")
        return await self._failed(node, row, sanitize_json(context), status, fail_count, started_at, problem)

    async def _check(
        self,
        node: NodeDefinition,
        ctx: JSONContext,
        context: dict[str, Any],
        fail_count: int,
        started_at: int,
    ) -> Exception | None:
        """The worker's ``wait_check`` under a :class:`NodeWatch` (phase pending): its failure, if any.
        (:meth:`_process` makes ``run``'s call, phase running, the same way inline.)

        What stopped a visibility write (the pass stopped, the lease was lost) is raised, not returned:
        it is no failure of the worker's."""
        watch = NodeWatch(
            self, node, _PENDING, context, fail_count, started_at, self._clock.monotonic(), self._watchtower
        )
        # the watch is the call's context variable (its NodeInfo built only if current_node() asks for
        # it), set without call_scope()'s generator context manager (a node's hot path)
        token = _current_call.set(watch)
        try:
            await node.worker.wait_check(ctx)
        except Exception as exc:
            _current_call.reset(token)
            await watch.close()
            return exc
        except BaseException:
            _current_call.reset(token)
            watch.abort()
            raise
        _current_call.reset(token)
        if not watch.close_now():  # a visibility write is in flight: wait for it
            await watch.close()
        return None

    # ------------------------------------------------------------------ work in flight (NodeWatch)

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def visible_after(self) -> float | None:
        return self._visible_after

    @property
    def instance(self) -> WorkflowInstanceRecord:
        return self._instance

    @property
    def start_child(self) -> ChildStart | None:
        return self._start_child

    def row_of(self, task_type: str) -> TaskInstanceRecord | None:
        return self._rows.get(task_type)

    def spawn_write(self, write: Coroutine[Any, Any, None], task_type: str) -> asyncio.Task[None] | None:
        """Run a visibility write in the pass's task group, or in a task :meth:`_alone` waits for while
        the pass has no group (never an orphan: the pass waits for it); ``None`` when the pass is
        already ending (its task group shutting down)."""
        name = f"asyncflow-{self._instance.id}-{task_type}-running"
        try:
            tg = self._tg
            if tg is not None:
                task = tg.create_task(write, name=name)
            elif self._alone_over:  # _alone() has waited for its writes: the pass is ending
                raise RuntimeError("the pass is ending")
            else:  # no task group yet (_alone): a task _alone() waits for (or cancels), as a group would
                task = asyncio.get_running_loop().create_task(write, name=name)
                self._loose = {*self._loose, task}  # rare: heartbeats of a pass without a group
        except RuntimeError:  # the group is shutting down: the node's call is being cancelled too
            write.close()
            return None
        if self._writers is _NONE:
            self._writers = {}
        self._writers[task_type] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._writers.get(task_type) is done:
                del self._writers[task_type]

        task.add_done_callback(forget)
        return task

    async def show_in_flight(
        self, node: NodeDefinition, phase: str, progress: Any, fail_count: int, started_at: int
    ) -> None:
        """Store the node as ``phase`` (``running``/``pending``) with ``started_at`` and its progress."""
        task_type = node.task_type
        row = self._rows.get(task_type)
        if row is not None and row.status == phase:
            base = dict(row.node_context)  # stored in this phase already: keep what is stored
        else:
            base = self._fresh_context(node, row)  # what the worker started from
        if progress is not NO_PROGRESS:
            system = base.get(SYSTEM)
            system = dict(system) if isinstance(system, dict) else {}
            system[PROGRESS] = progress
            base[SYSTEM] = system
        write = _write_for(task_type, row, phase, base, fail_count, started_at)
        try:
            await self._apply([(task_type, write)])
        except ParamInvalidError as exc:  # a context the worker is changing is not JSON right now
            logger.debug(
                "node %s of instance %s: in-flight write skipped: %s", task_type, self._instance.id, exc
            )

    def interrupt(self, task_type: str) -> None:
        """A visibility write found the pass over: cancel the node's worker call (its result is moot)."""
        task = self._tasks.get(task_type)
        if task is not None and not task.done():
            if task is self._main_task:  # the node runs in the pass's own task (_drive_here)
                if self._interrupted_here:
                    return
                self._interrupted_here = True
            task.cancel()

    def warn_overdue(self, node: NodeDefinition, age: float) -> None:
        if not self._stalls.first_time((self._instance.id, node.task_type, "overdue")):
            return
        logger.warning(
            "node %s of instance %s has been running for %.0f s, longer than its max_wait_time_ts "
            "(%d s): it fails as timed out when this attempt ends",
            node.task_type,
            self._instance.id,
            age,
            node.max_wait_time_ts,
            extra=self._extra(node.task_type, _RUNNING),
        )

    async def _children_done(self, task_type: str, context: dict[str, Any]) -> None:
        """For a node whose ``run`` started children: raise ``TaskNotReady`` while one of them is not
        terminal, ``TaskFailedTerminate`` when one failed or was canceled; once all completed, put their
        results under ``children`` in ``context``."""
        system = context.get(SYSTEM)
        keys = system.get(CHILD_KEYS) if isinstance(system, dict) else None
        if not keys:
            return
        found = {
            c.child_key: c
            for c in await self._repo.query_child_instances(self._instance.id)
            if c.parent_node == task_type
        }
        waiting = []
        for key in keys:
            child = found.get(key)
            if child is None:
                raise TaskFailedTerminate(f"child workflow {key!r} of node {task_type!r} no longer exists")
            if child.status in _FAILS_A_PARENT:
                raise TaskFailedTerminate(
                    f"child workflow {key!r} (instance {child.id}, {child.workflow_type}) {child.status}"
                )
            if not is_over_instance_status(child.status):
                waiting.append(key)
        if waiting:
            if self._awaiting is _NONE:
                self._awaiting = {}
            self._awaiting[task_type] = list(keys)
            raise TaskNotReady(f"waiting for {len(waiting)} of {len(keys)} child workflow(s)")
        if self._awaiting:
            self._awaiting.pop(task_type, None)
        results: dict[str, Any] = {}
        for key in keys:
            child = found[key]
            rows = await self._repo.load_task_instances(child.id)
            end = next((r for r in rows if r.task_type == END_NODE), None)
            output = end.node_context.get(PRE_NODE_CONTEXT, {}) if end is not None else {}
            results[key] = {"instance_id": child.id, "status": child.status, "output": output}
        context[CHILDREN] = results

    async def _look_again(self) -> None:
        """After the pass's last write: a child that ended since the pass looked would have woken an
        instance that was still going to write a later due time; if one did, ask to be run again."""
        found = {
            (c.parent_node, c.child_key): c.status
            for c in await self._repo.query_child_instances(self._instance.id)
        }
        for task_type, keys in self._awaiting.items():
            statuses = [found.get((task_type, key)) for key in keys]
            ended = [s is None or is_over_instance_status(s) for s in statuses]
            if all(ended) or any(s in _FAILS_A_PARENT for s in statuses):
                self.wake_again = True
                return

    async def _failed(
        self,
        node: NodeDefinition,
        row: TaskInstanceRecord | None,
        context: dict[str, Any],
        status: str,
        fail_count: int,
        started_at: int,
        exc: Exception,
    ) -> bool:
        now = self._clock.time()
        decision = classify_failure(
            exc,
            fail_count=fail_count,
            fail_max_count=(
                node.fail_max_count if node.fail_max_count is not None else self._default_fail_max_count or 0
            ),
            max_wait_time_ts=node.max_wait_time_ts,
            started_at=started_at,
            now=int(now),
        )
        record_error(context, decision, now)
        outcome = decision.outcome
        self._log_failure(node.task_type, status, outcome, decision.last_error, exc)
        if self._observers is not None:
            self._outcomes[node.task_type] = (_observed_outcome(outcome, status), exc)
        if outcome is Outcome.NOT_READY:
            self._defer(
                node.task_type, _write_for(node.task_type, row, status, context, fail_count, started_at)
            )
            self._due = [*self._due, int((now + self._wait_interval) * 1000)]
            return False
        if outcome is Outcome.RETRY:
            retry_at = int((now + (node.retry or self._retry).delay(fail_count + 1)) * 1000)  # from its end
            context[SYSTEM][RETRY_AT] = retry_at  # record_error made it a dict
            self._defer(
                node.task_type, _write_for(node.task_type, row, status, context, fail_count + 1, started_at)
            )
            self._due = [*self._due, retry_at]
            return False
        if outcome is Outcome.CONTINUE:
            try:
                await self._write_completed(node, row, context, fail_count + 1, started_at)
            except BaseException:
                if self._outcomes and not self._has_status(node.task_type, _COMPLETED):
                    self._outcomes.pop(node.task_type, None)  # not written: the attempt was cut
                raise
            if status == _RUNNING:
                self._continued = {*self._continued, node.task_type}
            return True
        write = _write_for(node.task_type, row, _FAILED, context, fail_count + 1, started_at)
        try:
            await self._apply(
                [(node.task_type, write)], instance_status=InstanceStatus.FAILED.value, cancel=True
            )
        except BaseException:
            if self._outcomes and not self._has_status(node.task_type, _FAILED):
                self._outcomes.pop(node.task_type, None)  # not written: the attempt was cut
            raise
        logger.error(
            "workflow instance %s failed at node %s: %s",
            self._instance.id,
            node.task_type,
            decision.last_error,
            extra=self._extra(node.task_type, _FAILED),
        )
        raise _PassFailed

    def _log_failure(self, task_type: str, status: str, outcome: Outcome, text: str, exc: Exception) -> None:
        if outcome is Outcome.NOT_READY or outcome is Outcome.FATAL:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "node %s of instance %s: %s (%s)",
                    task_type,
                    self._instance.id,
                    outcome.value,
                    text,
                    extra=self._extra(task_type, status),
                )
            return
        level = logging.ERROR if is_serious_error(exc) else logging.WARNING
        logger.log(
            level,
            "node %s of instance %s failed (%s): %s",
            task_type,
            self._instance.id,
            outcome.value,
            text,
            extra=self._extra(task_type, status),
        )

    def _extra(self, task_type: str, status: str) -> dict[str, Any]:
        return {
            "instance_id": self._instance.id,
            "workflow_type": self._instance.workflow_type,
            "task_type": task_type,
            "status": status,
        }

    # ------------------------------------------------------------------ contexts

    def _fresh_context(self, node: NodeDefinition, row: TaskInstanceRecord | None) -> dict[str, Any]:
        rows = self._rows
        pre = []
        for p in node.pre_nodes:  # the predecessors whose edge to the node is completed
            pre_row = rows.get(p)
            if pre_row is not None and pre_row.status == _COMPLETED:
                context = pre_row.node_context
                if (
                    context.get(SYSTEM) is None  # chosen_of()'s common case inline: chose nothing
                    or (chosen := chosen_of(context)) is None
                    or node.task_type in chosen
                ):
                    pre.append((p, context))
        return build_node_context(
            pre, self._instance.workflow_context, None if row is None else row.node_context
        )

    # ------------------------------------------------------------------ writes

    def _carry_root(self, node: NodeDefinition) -> None:
        """The root does no work: its write rides along with the next step of this pass (:meth:`_drive`
        calls this instead of :meth:`_process`: the root never fails, so never has a back-off)."""
        row = self._rows.get(ROOT_NODE)
        if row is None or row.status == _RESTARTING:
            context = self._fresh_context(node, row)
        else:
            context = row.node_context
        write = _write_for(ROOT_NODE, row, _COMPLETED, context, 0, int(self._clock.time()))
        self._carry = [*self._carry, (ROOT_NODE, write)]
        self._rows[ROOT_NODE] = _provisional(self._instance.id, ROOT_NODE, row, write)

    async def _write_completed(
        self,
        node: NodeDefinition,
        row: TaskInstanceRecord | None,
        context: dict[str, Any],
        fail_count: int,
        started_at: int,
    ) -> None:
        """Complete the node; in the same step: the nodes this skips, the predecessors a ``first``
        join now cancels, and ``end`` (with the instance) when this was the last of its predecessors."""
        task_type = node.task_type
        instance_status = None
        extra: list[tuple[str, _Write]] | None = None
        told = False  # _completed() has skips or cancels to tell (else only the observers' outcome)
        if task_type == END_NODE:
            instance_status = _INSTANCE_COMPLETED
        else:
            definition = self._definition
            if task_type not in definition.feeds_first and (
                task_type in definition.lone_feeders
                and (context.get(SYSTEM) is None or chosen_of(context) is None)  # chosen_of() only with one
            ):
                # the common case: nothing to skip, no ``first`` join among the successors; ``end`` can
                # join only the write of one of its predecessors, here its only one (a lone feeder's
                # successors have one predecessor each), which completes now having chosen nothing: the
                # ``end`` join runs (what _consequences() finds, without the edges)
                if task_type in definition.end_feeders and END_NODE not in self._visited:
                    end = self._rows.get(END_NODE)
                    if end is None or end.status == _RESTARTING:
                        extra = [(END_NODE, self._end_write(end, [(task_type, context)]))]
                        instance_status = _INSTANCE_COMPLETED
            else:
                if task_type in definition.feeds_first:
                    await self._stop_losers(task_type, context)
                extra = self._consequences(task_type, context)
                if extra:
                    told = True
                    if extra[-1][0] == END_NODE:
                        instance_status = _INSTANCE_COMPLETED
        # _write_for() inline (a node's hot path)
        if row is None or row.id == 0:
            write: _Write = new_task_insert(task_type, _COMPLETED, context, fail_count, started_at)
        else:
            write = new_task_update(row.id, row.version, _COMPLETED, context, fail_count, started_at)
        writes = [(task_type, write)]
        if extra:
            writes += extra
        try:
            await self._apply(writes, instance_status=instance_status)
        except asyncio.CancelledError:  # deferred by the repo past a step that was written: still told
            if self._has_status(task_type, _COMPLETED):
                self._completed(task_type, extra)
            raise
        if told or self._observers is not None:  # else _completed() has nothing to do
            self._completed(task_type, extra)
        if instance_status is not None and logger.isEnabledFor(logging.INFO):  # no record's fields built else
            logger.info(
                "workflow instance %s completed",
                self._instance.id,
                extra=self._extra(END_NODE, _COMPLETED),
            )

    def _defer(self, task_type: str, write: _Write) -> None:
        """Keep ``write`` for the pass's last step (:meth:`_flush`)."""
        if self._deferred is _NONE:
            self._deferred = {}
        self._deferred[task_type] = write

    def _has_status(self, task_type: str, status: str) -> bool:
        row = self._rows.get(task_type)
        return row is not None and row.status == status

    def _completed(self, task_type: str, extra: list[tuple[str, _Write]] | None) -> None:
        """A node's completion was written: the nodes it skipped and, for observers, its attempt's outcome
        (told even when a cancellation the repo deferred past the write is raised next)."""
        skipped = [t for t, w in extra if w.status == _SKIPPED] if extra else []
        if skipped:
            if self._skipped_with is _NONE:
                self._skipped_with = {}
            self._skipped_with[task_type] = skipped
        if self._observers is not None:
            if task_type != END_NODE:
                self._outcomes.setdefault(task_type, ("completed", None))  # failed_continue stays
            if skipped:
                self._report_skipped(skipped)

    def _states(self, finishing: str, context: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
        return {finishing: _COMPLETED}, {finishing: context}

    def _edge_with(
        self, pre: str, succ: str, statuses: dict[str, str], contexts: dict[str, Any]
    ) -> str | None:
        row = self._rows.get(pre)
        status = statuses.get(pre, row.status if row is not None else None)
        ctx = contexts.get(pre, row.node_context if row is not None else None)
        return edge_status(status, chosen_of(ctx), succ)

    def _first_losers(self, finishing: str, statuses: dict[str, str], contexts: dict[str, Any]) -> list[str]:
        """Predecessors of a ``first`` join that ``finishing`` now lets run and that are not done yet."""
        losers: list[str] = []
        for succ in self._definition.node(finishing).next_nodes:
            succ_node = self._definition.node(succ)
            if succ_node.join != "first" or succ in self._visited or not self._open(succ):
                continue
            edges = [self._edge_with(p, succ, statuses, contexts) for p in succ_node.pre_nodes]
            if join_decision("first", edges) is not Join.RUN:
                continue
            for pre, edge in zip(succ_node.pre_nodes, edges, strict=True):
                if edge not in (_COMPLETED, _SKIPPED) and pre not in losers:
                    losers.append(pre)
        return losers

    async def _stop_losers(self, finishing: str, context: dict[str, Any]) -> None:
        """Cancel the worker calls of this pass still running for the predecessors a ``first`` join drops."""
        statuses, contexts = self._states(finishing, context)
        me = asyncio.current_task()
        tasks = []
        for loser in self._first_losers(finishing, statuses, contexts):
            task = self._tasks.get(loser)  # set only while the task works on that node
            if task is not None and task is not me and not task.done():
                task.cancel()
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks)  # never raises the tasks' cancellations into this one
        writers = [
            w
            for loser in self._first_losers(finishing, statuses, contexts)
            if (w := self._writers.get(loser))
        ]
        if writers:  # a loser's visibility write lands before its cancel is written on its row
            await asyncio.wait(writers)

    def _consequences(self, finishing: str, context: dict[str, Any]) -> list[tuple[str, _Write]]:
        """The writes that go with ``finishing``'s completion: skips, ``first``-join cancels, ``end``
        (:meth:`_write_completed` finds them itself for a lone feeder that chose nothing: ``end`` only)."""
        definition = self._definition
        statuses, contexts = self._states(finishing, context)
        writes: list[tuple[str, _Write]] = []
        now = int(self._clock.time())
        losers: list[str] = []
        if finishing in definition.feeds_first:
            losers = self._first_losers(finishing, statuses, contexts)
        for loser in losers:
            row = self._rows.get(loser)
            if row is not None and row.status in _SETTLED:
                continue
            if self._deferred:
                self._deferred.pop(loser, None)
            self._visited.add(loser)
            self._dropped = {*self._dropped, loser}
            statuses[loser] = _CANCELED
            old = {} if row is None else row.node_context
            writes.append(
                (loser, _write_for(loser, row, _CANCELED, old, 0 if row is None else row.fail_count, now))
            )

        def status_of(task_type: str) -> str | None:
            row = self._rows.get(task_type)
            return statuses.get(task_type, row.status if row is not None else None)

        def chosen(task_type: str) -> tuple[str, ...] | None:
            row = self._rows.get(task_type)
            return chosen_of(contexts.get(task_type, row.node_context if row is not None else None))

        skipped = propagate_skips(
            finishing,
            status_of=status_of,
            chosen=chosen,
            pre_nodes=lambda t: self._definition.node(t).pre_nodes,
            next_nodes=lambda t: self._definition.node(t).next_nodes,
            join_of=lambda t: self._definition.node(t).join,
            open_node=lambda t: t not in self._visited and self._open(t),
        )
        for task_type in skipped:
            row = self._rows.get(task_type)
            self._visited.add(task_type)
            statuses[task_type] = _SKIPPED
            fail_count = 0 if row is None else row.fail_count
            writes.append((task_type, _write_for(task_type, row, _SKIPPED, {}, fail_count, now)))
        end_write = self._end_if_ready(finishing, skipped, statuses, contexts)
        if end_write is not None:
            writes.append((END_NODE, end_write))
        return writes

    def _end_if_ready(
        self, finishing: str, skipped: list[str], statuses: dict[str, str], contexts: dict[str, Any]
    ) -> _Write | None:
        """``end`` joins this write when every predecessor of it is now done (completed or skipped)."""
        end = self._definition.end
        if END_NODE in self._visited or not self._open(END_NODE):
            return None
        if finishing not in end.pre_nodes and not (skipped and any(t in end.pre_nodes for t in skipped)):
            return None
        edges = [self._edge_with(p, END_NODE, statuses, contexts) for p in end.pre_nodes]
        if join_decision("end", edges) is not Join.RUN:
            return None
        pre = [
            (p, contexts[p] if p in contexts else self._rows[p].node_context)
            for p, edge in zip(end.pre_nodes, edges, strict=True)
            if edge == _COMPLETED
        ]
        return self._end_write(self._rows.get(END_NODE), pre)

    def _end_write(self, row: TaskInstanceRecord | None, pre: list[tuple[str, dict[str, Any]]]) -> _Write:
        """``end``'s completion, with the contexts of its predecessors whose edge is completed."""
        self._visited.add(END_NODE)
        context = build_node_context(
            pre, self._instance.workflow_context, None if row is None else row.node_context
        )
        if row is None:
            return new_task_insert(END_NODE, _COMPLETED, context, 0, int(self._clock.time()))
        return _write_for(END_NODE, row, _COMPLETED, context, row.fail_count, row.started_at)

    async def _write_one(self, task_type: str, write: _Write) -> TaskInstanceRecord:
        await self._apply([(task_type, write)])
        return self._rows[task_type]

    async def _apply(
        self,
        writes: list[tuple[str, _Write]],
        *,
        instance_status: str | None = None,
        cancel: bool = False,
        next_run_at: int | None = None,
    ) -> None:
        """Apply one step; on success record the new rows; if it does not apply, stop the pass."""
        if self._carrying and not self._carry:  # the root's step is in flight: this one goes after it
            done = self._carry_done
            if done is None:  # made by the first step to wait (most passes have none)
                done = self._carry_done = asyncio.Event()
            await done.wait()
        if self._lease is not None:  # checked right before the write (no await in between)
            self._lease.raise_if_lost()
        carried = self._carry
        if carried:
            writes = [*carried, *writes]
            self._carry = ()
            self._carrying = True
        if instance_status is None and self._status == _INSTANCE_INIT:
            instance_status = _INSTANCE_RUNNING
        # the engine's own writes are TaskInsert or TaskUpdate; most steps only insert (split in C then)
        updates: list[tuple[str, TaskUpdate]] | None = None
        if writes:
            names, inserts = zip(*writes)  # noqa: B905 - pairs: the same length
            if TaskUpdate in map(type, inserts):  # some update a row: split them off
                updates = [(t, w) for t, w in writes if isinstance(w, TaskUpdate)]
                names = tuple([t for t, w in writes if isinstance(w, TaskInsert)])
                inserts = tuple([w for _, w in writes if isinstance(w, TaskInsert)])
        else:
            names = inserts = ()
        instance = self._instance
        step = new_step(
            instance.id,
            RUNNABLE_INSTANCE_STATUSES,  # instance_status_in, Step's default
            instance_status,
            next_run_at,
            inserts,
            () if updates is None else tuple([w for _, w in updates]),
            cancel,
            instance.lease_epoch,
        )
        hold = HOLD_STEPS.set(True)  # the repo holds a cancellation until its step is done (asyncflow._held)
        write = self._repo.apply_step(step)
        try:
            # a repo that holds is awaited inline; any other runs in a task of its own, held the same way
            result = await (write if self._held_steps else run_held(write))
        except BaseException:
            self._carry = [*carried, *self._carry]  # not written: the next step carries it
            raise
        finally:
            HOLD_STEPS.reset(hold)
            if carried:
                self._carrying = False
                done = self._carry_done
                if done is not None:
                    self._carry_done = None
                    done.set()
        if not result.applied:
            self._stopped = True
            if result.stale:
                logger.warning(
                    "pass of instance %s stopped: a newer pass of the instance began (this pass's "
                    "lease epoch %s is stale: its lock was lost); nothing more of it is written",
                    self._instance.id,
                    self._instance.lease_epoch,
                    extra=self._extra("", self._status),
                )
            else:
                logger.info(
                    "pass of instance %s stopped: the instance changed under it (cancel, restart or "
                    "another runner)",
                    self._instance.id,
                    extra=self._extra("", self._status),
                )
            if self._cancel_pending():
                await asyncio.sleep(0)
            raise _PassStopped
        # the step applied: its rows, as written, become the pass's view (the repo returns the inserted
        # rows in the order of the step's inserts)
        rows = self._rows
        rows.update(zip(names, result.inserted, strict=True))
        if updates is not None:
            for task_type, update in updates:
                rows[task_type] = _updated(rows[task_type], update)
        if instance_status is not None:
            self._status = instance_status
        # _cancel_pending() inline (a node's hot path)
        task = _current_task()
        main = self._main_task
        if (task is not None and task.cancelling()) or (
            task is not main and main is not None and main.cancelling()
        ):
            await asyncio.sleep(0)

    def _cancel_pending(self) -> bool:
        """A cancellation of this task (deferred by the repo) or of the pass (which its task group
        passes on to this task) came during the write: the caller lets it land (``sleep(0)``), as it
        would have at the await of the write, before the next node starts or the pass stops (a
        deferred one must not outlive the step: in the pass's own task it would be raised later,
        outside the pass)."""
        main = self._main_task
        if main is not None and main.cancelling() > 0:
            return True
        task = _current_task()
        return task is not None and task is not main and task.cancelling() > 0

    async def _flush(self) -> None:
        """The pass's last write: deferred node writes, the root if still carried, the next due time."""
        poll = int((self._clock.time() + self._wait_interval) * 1000)
        next_run_at = min(self._due) if self._due else poll
        writes = list(self._deferred.items())
        self._deferred = _NONE
        try:
            try:
                await self._apply(writes, next_run_at=next_run_at)
            except ParamInvalidError:  # a worker left a context that is not JSON: store it sanitized
                await self._apply([(t, _sanitized(w)) for t, w in writes], next_run_at=next_run_at)
        except _PassStopped:
            return
        finally:  # the skips written, also when a cancellation the repo deferred past the write follows
            self._report_skipped(
                [t for t, w in writes if w.status == _SKIPPED and self._has_status(t, _SKIPPED)]
            )

    def _report_skipped(self, task_types: list[str]) -> None:
        """Tell observers about nodes this pass has just written ``skipped`` (they never ran): each is
        a ``node_started`` at once followed by ``node_finished(outcome="skipped", error=None, 0.0)``."""
        observers = self._observers
        if observers is None:
            return
        for task_type in task_types:
            row = self._rows.get(task_type)
            info = NodeInfo(
                instance_id=self._instance.id,
                workflow_type=self._instance.workflow_type,
                business_id=self._instance.business_id,
                task_type=task_type,
                fail_count=0 if row is None else row.fail_count,
                trace_context=self._instance.trace_context,
            )
            observers.node_started(info)
            observers.node_finished(info, "skipped", None, 0.0)

    async def _reload(self) -> WorkflowInstance:
        record = await self._repo.get_workflow_instance(self._instance.id)
        return WorkflowInstance.from_record(record or self._instance, self._definition)

    async def _repair(self) -> bool:
        """Finish transitions a crash (or an older engine) left half-done; True if the pass is over."""
        end = self._rows.get(END_NODE)
        if end is not None and end.status == _COMPLETED:
            await self._apply_quietly(InstanceStatus.COMPLETED.value, cancel=False)
            return True
        statuses = {row.status for row in self._rows.values()}
        if _FAILED in statuses:
            await self._apply_quietly(InstanceStatus.FAILED.value, cancel=True)
            return True
        if any(r.status == _CANCELED and not self._dropped_by_first(t) for t, r in self._rows.items()):
            await self._apply_quietly(InstanceStatus.CANCELED.value, cancel=True)
            return True
        return False

    def _dropped_by_first(self, task_type: str) -> bool:
        """A ``canceled`` row a ``first`` join left (a successor of it with that join has run)."""
        return any(
            self._definition.node(succ).join == "first" and not self._open(succ)
            for succ in self._definition.node(task_type).next_nodes
        )

    async def _too_deep(self) -> bool:
        """Fail the instance if a stored context nests deeper than the engine can work on (written by
        an older version or by a worker): every pass would fail on it otherwise. True if it did."""
        limit = MAX_JSON_DEPTH + STORED_DEPTH_SLACK
        where = None
        if json_depth_exceeds(self._instance.workflow_context, limit):
            where = "the workflow context"
        else:
            for task_type, row in self._rows.items():
                if json_depth_exceeds(row.node_context, limit):
                    where = f"the context of node {task_type!r}"
                    break
            else:
                return False
        failed = InstanceStatus.FAILED.value
        logger.error(
            "workflow instance %s fails: %s is nested more than %d levels deep (the most asyncflow works on)",
            self._instance.id,
            where,
            limit,
            extra=self._extra("", failed),
        )
        with contextlib.suppress(_PassStopped):
            await self._apply([], instance_status=failed, cancel=True)
        return True

    async def _apply_quietly(self, instance_status: str, *, cancel: bool) -> None:
        logger.warning(
            "repairing instance %s: its nodes say %s",
            self._instance.id,
            instance_status,
            extra=self._extra("", instance_status),
        )
        with contextlib.suppress(_PassStopped):
            await self._apply([], instance_status=instance_status, cancel=cancel)

    def _result(self) -> WorkflowInstance:
        return WorkflowInstance.from_record(
            self._instance, self._definition, status=self._status, updated_at=int(self._clock.time())
        )


def _observed_outcome(outcome: Outcome, status: str) -> str:
    """The observers' name of a failed attempt's outcome (``pending``: waiting in its wait check)."""
    if outcome is Outcome.NOT_READY:
        return "pending" if status == _PENDING else "not_ready"
    if outcome is Outcome.CONTINUE:
        return "failed_continue"
    if outcome is Outcome.FATAL:
        return "failed"
    return "retry"


def _write_for(
    task_type: str,
    row: TaskInstanceRecord | None,
    status: str,
    context: dict[str, Any],
    fail_count: int,
    started_at: int,
) -> _Write:
    """An insert for a node without a committed row, else a compare-and-set update of its row."""
    # positional factories (asyncflow._frozen.positional): a node's hot path
    if row is None or row.id == 0:
        return new_task_insert(task_type, status, context, fail_count, started_at)
    return new_task_update(row.id, row.version, status, context, fail_count, started_at)


def _provisional(
    instance_id: int, task_type: str, row: TaskInstanceRecord | None, write: _Write
) -> TaskInstanceRecord:
    """An in-memory row for a write not yet committed (the carried root)."""
    return new_task_record(
        0 if row is None else row.id,
        instance_id,
        task_type,
        write.status or _COMPLETED,
        write.node_context or {},
        0,  # fail_count
        0 if row is None else row.created_at,
        0,  # updated_at
        0 if row is None else row.started_at,
        0 if row is None else row.version,
    )


def _updated(row: TaskInstanceRecord, update: TaskUpdate) -> TaskInstanceRecord:
    return new_task_record(  # not dataclasses.replace: a node's hot path
        row.id,
        row.workflow_instance_id,
        row.task_type,
        update.status if update.status is not None else row.status,
        update.node_context if update.node_context is not None else row.node_context,
        update.fail_count if update.fail_count is not None else row.fail_count,
        row.created_at,
        row.updated_at,
        update.started_at if update.started_at is not None else row.started_at,
        row.version + 1,
    )


def _sanitized(write: _Write) -> _Write:
    if write.node_context is None:
        return write
    return dataclasses.replace(write, node_context=sanitize_json(write.node_context))


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_leaf(exc)
        return exc
    return LockFailedError("pass aborted")  # pragma: no cover - groups are never empty
