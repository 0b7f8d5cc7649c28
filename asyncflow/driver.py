"""``WorkflowDriver``: claims due instances and runs their passes, many at once.

Every instance row says when it should next be looked at (``next_run_at``). The driver claims due
``init``/``running`` rows in batches with one indexed query (the claim leases them for
``claim_lease`` seconds, so other drivers skip them), runs one pass per claimed instance under a hard
cap of ``concurrency`` simultaneous passes, and sleeps until the next due time, the poll interval or a
wake-up, whichever comes first: an in-process create/event/restart, or on PostgreSQL a NOTIFY from any
process. Near the cap it claims once an eighth of the slots are free, or after one poll interval with
any slot free (long passes never keep due work waiting longer). An instance claimed while its previous
pass is still ending (an event came during its lock release) runs again as soon as that pass ends.
Lock conflicts are skipped quietly (and re-tried briefly, in case the holder was an event); a pass
that raises is logged and its instance pushed back with exponential back-off; one failing
instance never stops the others. A claim that fails (a database outage, or any other exception) is
logged and tried again with back-off: ``run_forever`` keeps going until it is stopped or cancelled
(``run_until_idle`` raises an exception that is not an ``AsyncflowError``).
``stop()`` stops claiming, waits ``grace`` seconds for running passes, then cancels them (their nodes
stay resumable) and waits ``stop_deadline`` more.

Passes run in a fresh ``contextvars`` context (they never inherit a caller's lock holds), each in a
task of its own that the driver tracks itself (no task group: a pass's own ``finally`` does the
bookkeeping a done-callback would); the driver's run ends only once every pass it started has ended.
With a clock other than the system clock (``FakeClock`` in tests) the driver's sleeps move fake time,
but only while no pass runs, so a pass sees the time it started with.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._driver_config import DriverConfig, DriverStats, bounded, merge_config, seconds, wait_for_wake
from ._schedule_firer import ScheduleFirer
from .clock import SystemClock
from .engine.service import WorkflowService
from .errors import AsyncflowError, InvalidStateError, LockFailedError, ParamInvalidError, is_serious_error
from .records import InstanceFields, InstanceWhere
from .retry import RetryPolicy
from .status import RUNNABLE_INSTANCE_STATUSES
from .store.protocol import DueListener, ListensDue

__all__ = ["DriverConfig", "DriverStats", "WorkflowDriver"]

logger = logging.getLogger(__name__)

_ACTIVE = RUNNABLE_INSTANCE_STATUSES
_FAILURE_MEMORY = 10_000  # instances whose consecutive pass errors are remembered (for back-off)
_LOCK_RETRIES = 8  # re-tries of a lock conflict: 10 ms, 20 ms, ... (capped at the poll interval)
_SHORT_WAIT = 0.01  # s: first lock re-try; also the pause before re-claiming a row others claim
_SHORT_MS = 10
_NEVER = 2**62


@dataclass(slots=True)
class _Recheck:
    lease_until: int  # ms: the claim's lease; the instance is ours to retry until then
    attempt: int
    at: int  # ms


class WorkflowDriver:
    """Runs the due instances of ``service`` until idle (:meth:`run_until_idle`) or until :meth:`stop`.

    ``async with driver:`` runs :meth:`run_forever` in a background task for the block. Keyword
    arguments ``concurrency``, ``poll_interval``, ``workflow_types`` and any other
    :class:`DriverConfig` field build the config; with ``config=`` given they override its fields
    (``concurrency``/``poll_interval``/``workflow_types`` only when they differ from their defaults).
    """

    def __init__(
        self,
        service: WorkflowService,
        *,
        concurrency: int = 64,
        poll_interval: float = 1.0,
        workflow_types: Sequence[str] | None = None,
        config: DriverConfig | None = None,
        **more: Any,
    ) -> None:
        if not isinstance(service, WorkflowService):
            raise ParamInvalidError(f"service must be a WorkflowService, got {type(service).__name__}")
        options = dict(
            more, concurrency=concurrency, poll_interval=poll_interval, workflow_types=workflow_types
        )
        config = merge_config(config, options)
        self.service = service
        self.config = config
        self._types = tuple(config.workflow_types or ())
        self._cap = config.concurrency
        self._batch = min(config.batch_size or config.concurrency, config.concurrency)
        self._refill = max(1, self._batch // 8)
        lease = config.claim_lease if config.claim_lease is not None else service.lock_ttl
        self._lease_ms = max(1, int(lease * 1000))
        self._run_pass = service._driver_passes(config.poll_interval)
        self._backoff = RetryPolicy(
            initial_interval=config.error_backoff_base,
            max_interval=config.error_backoff_max,
            jitter=config.error_backoff_jitter,
        )
        self._stats = DriverStats()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._rechecks: dict[int, _Recheck] = {}
        self._failures: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._interrupted: set[int] = set()
        self._running = False
        self._stopping = False
        self._grace = config.stop_grace
        self._drain_deadline: float | None = None  # loop time the grace ends, once the drain began
        self._regrace = asyncio.Event()  # a later stop() shortened the grace
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        self._claim_hint = self._query_hint = self._want_slots = False
        self._passes_done = 0
        self._fatal: BaseException | None = None  # what a pass raised that is not an Exception
        self._new_task: Any = None  # makes a pass's task: the running loop's create_task, or Task
        self._notifier: DueListener | None = None
        self._task: asyncio.Task[None] | None = None
        self._fake_time = not isinstance(service.clock, SystemClock)  # e.g. a FakeClock in tests
        schedules = [
            s for s in service.registry.schedules if not self._types or s.workflow_type in self._types
        ]
        self._firer = ScheduleFirer(service, schedules) if schedules else None

    # ------------------------------------------------------------------ public surface

    @property
    def stats(self) -> DriverStats:
        """Live counters of what this driver did."""
        return self._stats

    @property
    def running(self) -> bool:
        """True while ``run_until_idle``/``run_forever`` (or an ``async with`` block) runs."""
        return self._running

    @property
    def in_flight(self) -> int:
        """Passes running right now."""
        return len(self._inflight)

    @property
    def listening(self) -> bool:
        """True while the repo's wake-ups arrive (a PostgreSQL LISTEN connection is active)."""
        return self._notifier is not None and self._notifier.listening

    async def run_until_idle(self) -> None:
        """Claim and run passes until nothing is due now and nothing is running, then return."""
        await self._run(until_idle=True)

    async def run_forever(self) -> None:
        """Claim and run passes until :meth:`stop` (or cancellation)."""
        await self._run(until_idle=False)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming, wait up to ``grace`` s for running passes, then cancel them (two phases).

        Returns when the driver has stopped, or after ``grace + stop_deadline`` (plus a second) if a
        worker ignores cancellation (logged at ERROR). A no-op when the driver is not running. Called
        again while stopping, a shorter ``grace`` cuts the wait short (``stop(grace=0)``: cancel the
        running passes now; their nodes stay resumable).
        """
        grace = seconds("grace", grace)
        if not self._running:
            return
        if self._stopping:
            self._grace = min(self._grace, grace)
            if self._drain_deadline is not None:
                now = asyncio.get_running_loop().time()
                self._drain_deadline = min(self._drain_deadline, now + grace)
                self._regrace.set()
        else:
            self._grace = grace
        self._stopping = True
        self._wake.set()
        try:
            async with asyncio.timeout(grace + self.config.stop_deadline + 1.0):
                await self._done.wait()
        except TimeoutError:
            logger.error("driver did not stop in time: %d passes ignore cancellation", self.in_flight)

    async def __aenter__(self) -> WorkflowDriver:
        if self._running or self._task is not None:
            raise InvalidStateError("this WorkflowDriver is already running")
        self._reserve()  # now, so that a stop() right after the block starts is not lost
        self._task = asyncio.create_task(self._run(until_idle=False, reserved=True), name="asyncflow-driver")
        self._task.add_done_callback(_report_crash)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        await self.stop(self.config.stop_grace)
        if task is not None and task.done() and not task.cancelled() and exc_info[0] is None:
            error = task.exception()
            if error is not None:
                raise error

    # ------------------------------------------------------------------ the loop

    def _reserve(self) -> None:
        if self._running:
            raise InvalidStateError("this WorkflowDriver is already running")
        self._running = True
        self._stopping = False
        self._drain_deadline = None
        self._wake, self._done = asyncio.Event(), asyncio.Event()

    async def _run(self, *, until_idle: bool, reserved: bool = False) -> None:
        if not reserved:
            self._reserve()
        repo = self.service.repo
        self._notifier = None
        self._fatal = None
        try:
            if self._firer is not None:
                self._firer.check()
        except BaseException:
            self._running = False
            self._done.set()
            raise
        self._new_task = _task_maker(asyncio.get_running_loop())
        if not until_idle and self.config.listen and isinstance(repo, ListensDue):
            self._notifier = repo.listen_due(self._on_notify)
        self.service.add_due_listener(self._on_due)
        try:
            async with asyncio.TaskGroup() as tg:  # the LISTEN task's group; passes are tracked apart
                listener = None
                if self._notifier is not None:
                    listener = tg.create_task(self._notifier.run(), name="asyncflow-driver-listen")
                try:
                    await self._loop(until_idle)
                    await self._drain()
                    if self._fatal is not None:  # a pass raised it meanwhile: no longer waited for
                        raise self._fatal
                except BaseException:  # an error or a cancellation: the passes go too
                    for task in self._inflight.values():
                        task.cancel()
                    raise
                finally:
                    try:
                        await self._settle()  # no pass outlives the driver's run
                    finally:
                        if listener is not None:
                            listener.cancel()
        except BaseExceptionGroup as group:  # the loop's own error, not wrapped by the task group
            if len(group.exceptions) != 1:
                raise
            leaf = group.exceptions[0]
            raise leaf from leaf.__cause__
        finally:
            self.service.remove_due_listener(self._on_due)
            self._reap_unstarted()  # every pass has ended
            self._interrupted.update(self._rechecks)
            self._rechecks.clear()
            await self._release_interrupted()
            self._running = False
            self._done.set()

    async def _loop(self, until_idle: bool) -> None:
        poll_ms = int(self.config.poll_interval * 1000)
        claim_at: int | None = None  # ms; None: claim as soon as there are free slots
        look_at = _NEVER  # ms: when to read the next due time (at least once per poll interval)
        query = False  # read it now
        errors = 0
        starved = False  # a poll interval passed with free slots below the refill: claim them anyway
        while not self._stopping:
            self._wake.clear()
            self._spawn_rechecks()
            try:
                firer = self._firer
                if (
                    firer is not None
                    and firer.next_at_ms <= self._now_ms()
                    and await firer.fire_due(self._now_ms())
                ):
                    claim_at = None  # the new instances are due now
                if (claim_at is None or claim_at <= self._now_ms()) and self._can_claim(starved):
                    starved = False
                    requested = min(self._cap - len(self._inflight), self._batch)
                    ids, lease_until = await self._claim(requested)
                    for instance_id in ids:
                        if instance_id in self._inflight:  # its pass is still ending: run it again after
                            self._rechecks[instance_id] = _Recheck(lease_until, 1, self._now_ms())
                        else:
                            if self._rechecks:
                                self._rechecks.pop(instance_id, None)
                            self._spawn(instance_id, lease_until, 0)
                    if len(ids) == requested or self._stopping:  # more is due: claim, no need to read
                        claim_at, look_at = None, _NEVER  # when (a short claim reads it again)
                        continue
                    claim_at, look_at = _NEVER, self._now_ms() + poll_ms  # drained
                    query = query or not self._inflight  # else the passes still running will tell
                if query or look_at <= self._now_ms():
                    mark = (self._passes_done, self._claim_hint)
                    due = await self._next_due()
                    query, now = False, self._now_ms()
                    look_at = now + poll_ms
                    if due is not None:  # due now right after a claim: others are claiming it, wait a bit
                        # (with a fake clock and passes running, time stands still: no pause)
                        pause = 0 if self._fake_time and self._inflight else _SHORT_MS
                        claim_at = min(now if claim_at is None else claim_at, max(due, now + pause))
                    if until_idle and (due is None or due > now) and self._idle(mark):
                        return
            except Exception as exc:  # a database failure (or a bug): wait, then try again
                if until_idle and not isinstance(exc, AsyncflowError):
                    raise  # run_until_idle (tests, batch jobs): a bug surfaces instead of retrying forever
                errors += 1
                self._stats.errors += 1
                if isinstance(exc, AsyncflowError):
                    logger.warning("claiming due instances failed: %s", exc)
                else:  # not the repo's own error type: keep going, but with the traceback
                    logger.error("claiming due instances failed unexpectedly: %r", exc, exc_info=exc)
                query = True
                await self._wait(min(self._backoff.delay(errors), max(self.config.poll_interval, 5.0)))
                continue
            errors = 0
            now = self._now_ms()
            claim_due = claim_at is None or claim_at <= now
            if claim_due and self._can_claim():
                continue  # the claim time came (or slots freed) during the reads above: claim now
            self._want_slots = claim_due  # at the cap: a pass that ends wakes us
            timeout = None if self._want_slots else (min(look_at, claim_at or _NEVER) - now) / 1000
            if self._want_slots and len(self._inflight) < self._cap:  # long passes may keep those slots
                timeout = self.config.poll_interval
            if self._firer is not None:  # wake for the next tick
                tick_in = max(0.0, (self._firer.next_at_ms - now) / 1000)
                timeout = tick_in if timeout is None else min(timeout, tick_in)
            if self._inflight and self._fake_time:
                timeout = None  # fake time moves only while no pass runs: passes see a fixed "now"
            waiting = [r.at for i, r in self._rechecks.items() if i not in self._inflight]
            if waiting and len(self._inflight) < self._cap:  # at the cap: a finishing pass wakes us
                soonest = (min(waiting) - now) / 1000
                timeout = max(0.0, soonest if timeout is None else min(timeout, soonest))
            woke = await self._wait(timeout)
            starved = self._want_slots and not woke
            self._want_slots = False
            if self._fatal is not None:
                raise self._fatal
            if self._claim_hint:
                claim_at = None
            query = query or self._query_hint
            self._claim_hint = self._query_hint = False

    def _can_claim(self, any_free: bool = False) -> bool:
        """Enough free slots for a claim: a batch's worth of refill, or any when nothing runs."""
        free = self._cap - len(self._inflight)
        return free >= self._refill or (free > 0 and (any_free or not self._inflight))

    def _idle(self, mark: tuple[int, bool]) -> bool:
        """Nothing running or waiting to be re-tried, and nothing finished or woke us since ``mark``."""
        unchanged = mark == (self._passes_done, False) and not self._claim_hint
        return unchanged and not self._inflight and not self._rechecks

    async def _wait(self, seconds: float | None) -> bool:
        if seconds is None and self._fake_time and not self._want_slots:
            # fake time stands still while passes run: look at the fake clock again every (real) poll
            # interval, in case it was moved past a due time meanwhile (a test's advance())
            return await wait_for_wake(self._wake, SystemClock(), self.config.poll_interval)
        return await wait_for_wake(self._wake, self.service.clock, seconds)

    def _on_due(self, instance_id: int) -> None:
        self._claim_hint = True
        self._wake.set()

    def _on_notify(self) -> None:
        self._stats.notifications += 1
        self._on_due(0)

    def _now_ms(self) -> int:
        return int(self.service.clock.time() * 1000)

    async def _claim(self, limit: int) -> tuple[list[int], int]:
        now = self._now_ms()
        started = time.perf_counter()
        ids = await self.service.repo.claim_due_instances(
            now_ms=now, limit=limit, lease_ms=self._lease_ms, workflow_types=self._types or None
        )
        self._stats.claim_seconds += time.perf_counter() - started
        self._stats.claims += 1
        self._stats.claimed += len(ids)
        return ids, now + self._lease_ms

    async def _next_due(self) -> int | None:
        self._stats.idle_polls += 1
        return await self.service.repo.next_due_at(self._types or None)

    # ------------------------------------------------------------------ passes

    def _spawn(self, instance_id: int, lease_until: int, attempt: int) -> None:
        # a fresh context: a pass must not inherit the caller's lock holds (re-entrant by context)
        task = self._new_task(
            self._pass(instance_id, lease_until, attempt),
            name=f"asyncflow-driver-pass-{instance_id}",
            context=_Context(),
        )
        if not task.done():  # an eager task factory may have run the whole pass (its end left _inflight)
            self._inflight[instance_id] = task

    def _reap_unstarted(self) -> None:
        """A pass cancelled before it began (a ``stop(grace=0)`` right after its claim) never ran its
        own clean-up: do it here, so that its claimed instance is released, not left to its lease.

        Called once no pass starts any more and the cancelled ones are done (after the drain's
        cancellations, and once every pass ended): a done task still in ``_inflight`` is such a
        pass, since every pass that began leaves it in its ``finally``. (A done-callback per pass did
        this before: an event-loop callback for every pass, for a case that only a stop can make.)"""
        for instance_id, task in list(self._inflight.items()):
            if task.done():
                del self._inflight[instance_id]
                self._interrupted.add(instance_id)
                self._stats.cancelled += 1
                self._passes_done += 1

    def _spawn_rechecks(self) -> None:
        if not self._rechecks:
            return
        now = self._now_ms()
        for instance_id, recheck in list(self._rechecks.items()):
            if len(self._inflight) >= self._cap:
                return
            if recheck.at <= now and instance_id not in self._inflight:
                del self._rechecks[instance_id]
                self._spawn(instance_id, recheck.lease_until, recheck.attempt)

    async def _pass(self, instance_id: int, lease_until: int, attempt: int) -> None:
        """One pass, counted; a lock conflict is re-tried later, an error backs the instance off.

        One coroutine (the service's :meth:`~WorkflowService._driver_passes` adds none): every step of
        the pass resumes the task through each coroutine that awaits it. Its end wakes the loop when it
        has something to do."""
        try:
            try:
                if attempt and not await self._still_ours(instance_id, lease_until):
                    return
                instance = await self._run_pass(instance_id)
            except LockFailedError as exc:
                self._stats.lock_skips += 1
                logger.debug(
                    "instance %s is locked elsewhere, skipped: %s",
                    instance_id,
                    exc,
                    extra={"instance_id": instance_id},
                )
                self._recheck_later(instance_id, lease_until, attempt + 1)
                return
            except Exception as exc:  # one failing instance never stops the others
                self._stats.errors += 1
                level = logging.ERROR if is_serious_error(exc) else logging.WARNING
                trace = None if isinstance(exc, AsyncflowError) else exc
                logger.log(
                    level,
                    "pass of instance %s failed: %s",
                    instance_id,
                    exc,
                    exc_info=trace,
                    extra={"instance_id": instance_id},
                )
                await self._back_off(instance_id)
                return
            stats = self._stats
            stats.passes += 1
            status = instance.status
            if status == "completed":
                stats.completed += 1
            elif status == "failed":
                stats.failed += 1
            if self._failures:
                self._failures.pop(instance_id, None)
        except asyncio.CancelledError:
            self._interrupted.add(instance_id)
            self._stats.cancelled += 1
            raise
        except BaseException as exc:  # not an Exception (a worker's SystemExit, say): the driver stops
            if isinstance(exc, GeneratorExit):  # the coroutine is being closed, not run
                raise
            if self._fatal is None:
                self._fatal = exc
            self._wake.set()
        finally:
            inflight = self._inflight
            inflight.pop(instance_id, None)
            self._passes_done += 1
            if not inflight:  # all done: time to read when the next instance is due
                self._query_hint = True
                self._wake.set()
            elif self._rechecks or (self._want_slots and self._cap - len(inflight) >= self._refill):
                self._wake.set()

    async def _still_ours(self, instance_id: int, lease_until: int) -> bool:
        """Before re-trying a lock conflict: still active, and not rescheduled by whoever held it?"""
        record = await self.service.repo.get_workflow_instance(instance_id)
        if record is None or record.status not in _ACTIVE:
            return False
        return record.next_run_at == lease_until or record.next_run_at <= self._now_ms()

    def _recheck_later(self, instance_id: int, lease_until: int, attempt: int) -> None:
        """The holder may be a quick event or restart that just made the instance due: look again soon."""
        now = self._now_ms()
        if attempt > _LOCK_RETRIES or now >= lease_until:
            return  # a pass holds it: that pass writes the next due time itself
        delay = min(self.config.poll_interval, _SHORT_WAIT * 2 ** (attempt - 1))
        self._rechecks[instance_id] = _Recheck(lease_until, attempt, now + int(delay * 1000))

    async def _back_off(self, instance_id: int) -> None:
        count = self._failures.pop(instance_id, 0) + 1
        self._failures[instance_id] = count
        while len(self._failures) > _FAILURE_MEMORY:
            self._failures.popitem(last=False)
        due = self._now_ms() + int(self._backoff.delay(count) * 1000)
        try:
            await self.service.repo.update_workflow_instances(
                InstanceWhere(ids=(instance_id,), status_in=_ACTIVE), InstanceFields(next_run_at=due)
            )
        except AsyncflowError as exc:  # the claim's lease delays the instance anyway
            logger.debug("could not back off instance %s: %s", instance_id, exc)

    # ------------------------------------------------------------------ shutdown

    async def _drain(self) -> None:
        """Second half of ``stop()``: wait ``grace`` for running passes, then cancel them."""
        running = set(self._inflight.values())
        if not running:
            return
        pending = await self._wait_grace(running)
        if not pending:
            return
        logger.warning("cancelling %d passes still running after the %.1f s grace", len(pending), self._grace)
        for task in pending:
            task.cancel()
        _, stuck = await asyncio.wait(pending, timeout=self.config.stop_deadline)
        if stuck:
            logger.error(
                "%d passes ignored cancellation: %s", len(stuck), sorted(t.get_name() for t in stuck)
            )
        self._reap_unstarted()
        await self._release_interrupted()

    async def _wait_grace(self, running: set[asyncio.Task[None]]) -> set[asyncio.Task[None]]:
        """Wait until ``running`` finished or the grace ended (a later ``stop()`` may shorten it)."""
        loop = asyncio.get_running_loop()
        self._drain_deadline = loop.time() + self._grace
        pending = set(running)
        while pending:
            remaining = self._drain_deadline - loop.time()
            if remaining <= 0:
                break
            self._regrace.clear()
            regraced: asyncio.Future[Any] = asyncio.ensure_future(self._regrace.wait())
            try:
                waiting: set[asyncio.Future[Any]] = {*pending, regraced}
                await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                regraced.cancel()
            pending = {task for task in pending if not task.done()}
        return pending

    async def _settle(self) -> None:
        """Wait until every pass this run started has ended, however long (passes that ignore their
        cancellation included); cancelled meanwhile, cancel them all and still wait, then raise."""
        cancelled: asyncio.CancelledError | None = None
        while True:
            pending = [task for task in self._inflight.values() if not task.done()]
            if not pending:
                break
            try:
                await asyncio.wait(pending)
            except asyncio.CancelledError as exc:
                cancelled = exc
                for task in pending:
                    task.cancel()
        if cancelled is not None:
            raise cancelled

    async def _release_interrupted(self) -> None:
        """Make interrupted instances due now (not after the claim lease), so any driver resumes them."""
        ids, self._interrupted = tuple(sorted(self._interrupted)), set()
        if not ids:
            return
        write = self.service.repo.update_workflow_instances(
            InstanceWhere(ids=ids, status_in=_ACTIVE), InstanceFields(next_run_at=self._now_ms())
        )
        problem = await bounded(write, max(self.config.stop_deadline, 0.1))
        if problem is not None:
            logger.warning(
                "could not release %d interrupted instances (%s): they wait out their lease",
                len(ids),
                problem,
            )


_Context = contextvars.Context


def _task_maker(loop: asyncio.AbstractEventLoop) -> Any:
    """How the driver makes a pass's task on ``loop``: ``asyncio.Task`` itself on a plain asyncio loop
    without a task factory (what ``loop.create_task`` would do, without its Python frame), else
    ``loop.create_task`` (a task factory, uvloop, debug mode's traceback trimming)."""
    plain = type(loop).create_task is asyncio.BaseEventLoop.create_task
    if plain and loop.get_task_factory() is None and not loop.get_debug():
        return functools.partial(asyncio.Task, loop=loop)
    return loop.create_task


def _report_crash(task: asyncio.Task[None]) -> None:
    """A background driver that dies says so at once (``__aexit__`` raises it again later)."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("the background WorkflowDriver stopped", exc_info=task.exception())
