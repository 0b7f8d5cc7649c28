"""``WorkflowDriver``: claims due instances and runs their passes, many at once.

Every instance row says when it should next be looked at (``next_run_at``). The driver claims due
``init``/``running`` rows in batches with one indexed query (the claim leases them for
``claim_lease`` seconds, so other drivers skip them), runs one pass per claimed instance under a hard
cap of ``concurrency`` simultaneous passes, and sleeps until the next due time, the poll interval or a
wake-up, whichever comes first: an in-process create/event/restart, or on PostgreSQL a NOTIFY from any
process. Near the cap it claims once an eighth of the slots are free, or after one poll interval with
any slot free (long passes never keep due work waiting longer). An instance claimed while its previous
pass is still ending (an event came during its lock release) runs again as soon as that pass ends.

While its passes keep ending, the driver claims ahead: it holds up to as many claimed instances as
its passes ended in the last poll interval (at most one claim batch), and the end of each pass starts
the oldest of them at once, so that no slot waits for a claim's round trip. A held instance is released
(made due again, for any driver) when its slots are taken by long passes: no pass ended for a poll
interval and a half while the event loop kept time and the database answered a read at once (a slow
moment, when passes still end or the database or the event loop stalls, releases nothing); also once
half its claim lease has gone by, and when the driver stops. (The poll interval here is at most half
the claim lease.) With a clock other than the system clock the driver does not claim ahead.

Lock conflicts are skipped quietly (and re-tried briefly, in case the holder was an event); a pass
that raises is logged and its instance pushed back with exponential back-off; one failing
instance never stops the others. A claim that fails (a database outage, or any other exception) is
logged and tried again with back-off: ``run_forever`` keeps going until it is stopped or cancelled
(``run_until_idle`` raises an exception that is not an ``AsyncflowError``).
``stop()`` stops claiming, releases the instances held ahead, waits ``grace`` seconds for running
passes, then cancels them (their nodes stay resumable) and waits ``stop_deadline`` more.

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
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._driver_config import DriverConfig, DriverStats, bounded, merge_config, seconds, wait_for_wake
from ._held import wait_cancelling
from ._schedule_firer import ScheduleFirer
from .clock import SystemClock
from .engine.service import WorkflowService, lock_key
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
# no pass ended for this many times the last gap between pass ends (and for the watch's window): stuck
_USUAL_GAPS = 10


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
        # claiming ahead (see the module's docstring); the watch runs on the monotonic clock, in seconds
        self._ahead: collections.deque[tuple[int, int]] = collections.deque()  # (id, lease_until ms)
        self._starting = False  # _start_ahead() is starting passes (an eager task may end inside it)
        self._ahead_max = 0  # how many to hold now: the passes that ended in the last poll interval
        self._threshold = self._refill  # free room (slots and ahead) that makes a claim worth it
        self._full = self._cap - self._refill  # claim once running and held ones are this many or fewer
        self._window = min(config.poll_interval, lease / 2)  # the watch's: at most half the lease
        self._tick_at = 0.0  # when the watch looks next (twice per window)
        self._tick_done = 0  # _passes_done at the last look
        self._tick_last = 0.0  # when that was
        self._quiet = 0.0  # seconds the watch saw no pass end, looking on time
        self._probed = False  # ... and the database then answered at once
        self._gap = 0.0  # seconds between pass ends, when they last ended
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
                    try:
                        await self._loop(until_idle)
                    except BaseException:
                        self._interrupted.update(self._hold_none())
                        raise
                    held = self._hold_none()  # nothing more starts: released during the grace
                    releasing = None
                    if held:
                        releasing = self._new_task(
                            self._release(held, "held ahead"), name="asyncflow-driver-release"
                        )
                    try:
                        await self._drain()
                    finally:
                        if releasing is not None:
                            await releasing
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
        ahead_ok = not self._fake_time
        while not self._stopping:
            self._wake.clear()
            self._spawn_rechecks()
            if self._ahead:
                self._start_ahead()
            try:
                if ahead_ok and (self._inflight or self._ahead):
                    if time.monotonic() >= self._tick_at:
                        await self._watch_ahead()
                elif self._ahead_max:  # nothing runs: hold none until passes are seen ending again
                    self._hold(0)
                firer = self._firer
                if (
                    firer is not None
                    and firer.next_at_ms <= self._now_ms()
                    and await firer.fire_due(self._now_ms())
                ):
                    claim_at = None  # the new instances are due now
                if (claim_at is None or claim_at <= self._now_ms()) and self._can_claim(starved):
                    starved = False
                    requested = min(self._room(), self._batch)
                    ids, lease_until = await self._claim(requested)
                    self._take(ids, lease_until)
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
            if ahead_ok and (self._inflight or self._ahead):  # the watch looks twice per window
                watch_in = max(0.0, self._tick_at - time.monotonic())
                timeout = watch_in if timeout is None else min(timeout, watch_in)
            woke = await self._wait(timeout)
            starved = self._want_slots and not woke
            self._want_slots = False
            if self._fatal is not None:
                raise self._fatal
            if self._claim_hint:
                claim_at = None
            query = query or self._query_hint
            self._claim_hint = self._query_hint = False

    def _room(self) -> int:
        """How many more instances this driver takes now: its free slots, and room to hold ahead."""
        return self._cap + self._ahead_max - len(self._inflight) - len(self._ahead)

    def _can_claim(self, any_free: bool = False) -> bool:
        """Enough room for a claim: a batch's worth of refill, or any when nothing runs."""
        room = self._room()
        return room >= self._threshold or (room > 0 and (any_free or not self._inflight))

    def _idle(self, mark: tuple[int, bool]) -> bool:
        """Nothing running, held or waiting to be re-tried, and nothing finished or woke us since
        ``mark``."""
        unchanged = mark == (self._passes_done, False) and not self._claim_hint
        return unchanged and not self._inflight and not self._rechecks and not self._ahead

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
        repo = self.service.repo
        handoffs = self.service._handoffs()
        claim_states = None if handoffs is None else self.service._claims_rows()
        if handoffs is None or claim_states is None:
            ids = await repo.claim_due_instances(
                now_ms=now, limit=limit, lease_ms=self._lease_ms, workflow_types=self._types or None
            )
        else:  # the rows of instances nobody has run yet go to their passes (Handoffs: no read of their own)
            mark, offered = handoffs.begin(), {}
            try:
                claimed = await claim_states(
                    now_ms=now, limit=limit, lease_ms=self._lease_ms, workflow_types=self._types or None
                )
                ids = [instance_id for instance_id, _ in claimed]
                offered = {lock_key(instance_id): row for instance_id, row in claimed if row is not None}
            finally:
                handoffs.end(mark, offered, repo)
        self._stats.claim_seconds += time.perf_counter() - started
        self._stats.claims += 1
        self._stats.claimed += len(ids)
        return ids, now + self._lease_ms

    async def _next_due(self) -> int | None:
        self._stats.idle_polls += 1
        return await self.service.repo.next_due_at(self._types or None)

    # ------------------------------------------------------------------ claiming ahead

    def _take(self, ids: list[int], lease_until: int) -> None:
        """Start the claimed instances in free slots, in claim order; hold the others ahead."""
        inflight, ahead, rechecks = self._inflight, self._ahead, self._rechecks
        for instance_id in ids:
            if instance_id in inflight:  # its pass is still ending: run it again after
                rechecks[instance_id] = _Recheck(lease_until, 1, self._now_ms())
                continue
            if rechecks:
                rechecks.pop(instance_id, None)
            if not ahead and len(inflight) < self._cap:
                self._spawn(instance_id, lease_until, 0)
            else:
                ahead.append((instance_id, lease_until))

    def _start_ahead(self) -> None:
        """Start held instances in the free slots, oldest first."""
        if self._starting:  # a pass that an eager task ran to its end inside _spawn below
            return
        self._starting = True
        ahead, inflight, cap = self._ahead, self._inflight, self._cap
        try:
            while ahead and len(inflight) < cap:
                instance_id, lease_until = ahead.popleft()
                if instance_id in inflight:  # claimed again while held (an event): run again after
                    self._rechecks[instance_id] = _Recheck(lease_until, 1, self._now_ms())
                else:
                    self._spawn(instance_id, lease_until, 0)
        finally:
            self._starting = False

    async def _watch_ahead(self) -> None:
        """Twice per window (a poll interval, or half the claim lease if shorter) while passes run:
        how many instances to hold ahead, and which held ones to release.

        Holds as many as the passes that ended in the last window (at most a claim batch), so that a
        held instance waits about a window at most. Releases every held instance once no pass ended
        for a window (and for ten times the gap between pass ends before that) and half a window
        more, although the event loop and the database were not slow: the looks came on time (a
        late one means the event loop was held up) and a read of the next due time, made once no
        pass ended for that long, came back within a quarter of a window (a database that stalls
        holds the passes up, not long workers). Releases any instance held for half its claim
        lease, before that lease can end."""
        now = time.monotonic()
        half = self._window / 2
        done = self._passes_done
        ended, elapsed = done - self._tick_done, now - self._tick_last
        late = now - self._tick_at > half / 2
        self._tick_done, self._tick_last, self._tick_at = done, now, now + half
        self._hold(min(self._batch, int(ended * self._window / elapsed)) if elapsed > 0 else 0)
        if ended:
            self._gap = elapsed / ended
        if ended or late:
            self._quiet, self._probed = 0.0, False
        else:
            self._quiet += elapsed
        ahead = self._ahead
        if not ahead:
            return
        release: list[int] = []
        stuck = self._quiet >= self._window and self._quiet >= _USUAL_GAPS * self._gap
        if stuck and self._probed:  # the slots are taken by long passes
            release = [instance_id for instance_id, _ in ahead]
            ahead.clear()
            self._probed = False
        elif stuck:
            await self._next_due()  # does the database answer?
            answered = time.monotonic()
            self._probed = answered - now < half / 2  # (a pass that ends meanwhile: the next look)
            self._tick_at = answered + half
        expires = self._now_ms() + self._lease_ms // 2  # half its lease gone: before it can expire
        while ahead and ahead[0][1] <= expires:
            release.append(ahead.popleft()[0])
        if release:
            await self._release(release, "held ahead")

    def _hold(self, most: int) -> None:
        """Hold up to ``most`` instances ahead; claim again once half of them started."""
        self._ahead_max = most
        self._threshold = max(self._refill, most // 2)
        self._full = self._cap + most - self._threshold

    def _hold_none(self) -> list[int]:
        """The loop ended: the held instances, to be released (not started)."""
        held = [instance_id for instance_id, _ in self._ahead]
        self._ahead.clear()
        self._hold(0)
        self._quiet, self._probed, self._gap = 0.0, False, 0.0
        return held

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
        the pass resumes the task through each coroutine that awaits it. Its end starts the next held
        instance, and wakes the loop when it has something to do."""
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
            if self._ahead and not self._rechecks:  # (due re-tries first: the loop starts both)
                self._start_ahead()
            if not inflight:  # all done: time to read when the next instance is due
                self._query_hint = True
                self._wake.set()
            elif self._rechecks or (self._want_slots and len(inflight) + len(self._ahead) <= self._full):
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
        inflight = self._inflight
        await wait_cancelling(lambda: [task for task in inflight.values() if not task.done()])

    async def _release_interrupted(self) -> None:
        """Make interrupted instances due now (not after the claim lease), so any driver resumes them."""
        ids, self._interrupted = tuple(self._interrupted), set()  # _release() sorts them
        if ids:
            await self._release(ids, "interrupted")

    async def _release(self, ids: Sequence[int], what: str) -> None:
        """Make claimed instances due now (not after the claim lease), so that any driver runs them."""
        handoffs = self.service._handoffs()
        if handoffs is not None and len(handoffs):  # rows their claim handed over: no pass takes them now
            for instance_id in ids:
                handoffs.drop(lock_key(instance_id))
        write = self.service.repo.update_workflow_instances(
            InstanceWhere(ids=tuple(sorted(ids)), status_in=_ACTIVE),
            InstanceFields(next_run_at=self._now_ms()),
        )
        problem = await bounded(write, max(self.config.stop_deadline, 0.1))
        if problem is not None:
            logger.warning(
                "could not release %d %s instances (%s): they wait out their lease", len(ids), what, problem
            )


_Context = contextvars.Context


def _task_maker(loop: asyncio.AbstractEventLoop) -> Any:
    """How the driver makes a pass's task on ``loop`` (the running loop: tasks are made from it):
    ``asyncio.Task`` itself on a plain asyncio loop without a task factory (what ``loop.create_task``
    would do, without its Python frame; the task finds the running loop itself, which costs less than
    a ``functools.partial`` binding ``loop=``), else ``loop.create_task`` (a task factory, uvloop,
    debug mode's traceback trimming)."""
    plain = type(loop).create_task is asyncio.BaseEventLoop.create_task
    if plain and loop.get_task_factory() is None and not loop.get_debug():
        return asyncio.Task
    return loop.create_task


def _report_crash(task: asyncio.Task[None]) -> None:
    """A background driver that dies says so at once (``__aexit__`` raises it again later)."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("the background WorkflowDriver stopped", exc_info=task.exception())
