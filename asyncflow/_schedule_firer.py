"""A driver's cron schedules: fire every due tick once across processes (see :mod:`asyncflow.schedules`).

Each round reads the schedules' stored state, records schedules seen for the first time (they fire
from their next tick on), and fires the due ticks: per schedule the latest tick after the last fired
one (``catch_up=False``) or each of them, oldest first (``catch_up=True``, at most
:data:`MAX_TICKS_PER_ROUND` per round). A tick fires through the repo's ``fire_schedule_tick``: the
tick's row and its instance are written in one transaction, and the row's primary key lets exactly
one driver, in any process, fire it. A tick that fails (the database refuses its instance, say) is
logged and tried again :data:`_RETRY_MS` later; the other schedules, and the driver's claims, go on.
So is a round whose schedule state cannot be read (a database not migrated yet): instances run.
Time is the service's clock, so a ``FakeClock`` drives ticks.

The state belongs to a definition (``Schedule.fingerprint()``). A schedule stored with another one
starts over, as if seen for the first time (its old ``last_tick`` would fire the ticks of another
cron, or of the time it was removed, at once), if that definition was recorded before this firer's
first round. If it was recorded since, a process started after this one (a rolling deploy) has the
schedule: this one does not take it back (each would start it over at every tick, and neither would
fire), but fires its own ticks after its first round and after the last tick fired, until it stops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from itertools import islice

from .engine.service import WorkflowService
from .errors import AsyncflowError, ConfigError
from .records import NewWorkflowInstance, ScheduleState
from .schedules import Schedule, parse_tick, tick_name
from .store.protocol import StoresSchedules

__all__ = ["MAX_TICKS_PER_ROUND", "ScheduleFirer"]

logger = logging.getLogger("asyncflow.driver")

MAX_TICKS_PER_ROUND = 100
"""Missed ticks a catching-up schedule fires per round (the next round follows at once)."""

_PRUNE_AFTER = timedelta(days=7)  # tick rows older than this before a fired tick are deleted
_RETRY_MS = 5000  # a schedule whose tick failed is tried again after this (the others go on)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class ScheduleFirer:
    """Fires the due ticks of ``schedules`` through ``service`` (see the module doc)."""

    def __init__(self, service: WorkflowService, schedules: Sequence[Schedule]) -> None:
        self._service = service
        self._schedules = tuple(schedules)
        self._fingerprints = {schedule.id: schedule.fingerprint() for schedule in self._schedules}
        self._since_ms: int | None = None  # the first round (unix ms): later definitions are newer
        self.next_at_ms = 0  # when a tick may be due next (unix ms); 0: look now

    def check(self) -> None:
        """``ConfigError`` for a schedule whose workflow type does not build, or a repo without schedules."""
        if not isinstance(self._service.repo, StoresSchedules):
            raise ConfigError(f"{type(self._service.repo).__name__} cannot store schedules")
        for schedule in self._schedules:
            try:
                self._service.registry.get_workflow_definition(schedule.workflow_type)
            except AsyncflowError as exc:
                raise ConfigError(
                    f"schedule {schedule.id!r}: workflow type {schedule.workflow_type!r} does not "
                    f"build ({exc})",
                    workflow_type=schedule.workflow_type,
                ) from exc

    async def fire_due(self, now_ms: int) -> int:
        """Fire what is due at ``now_ms``; how many instances this call created."""
        repo = self._service.repo
        assert isinstance(repo, StoresSchedules)
        since = self._since_ms = now_ms if self._since_ms is None else self._since_ms
        try:
            states = await repo.schedule_states()
            stale = {
                schedule_id: fingerprint
                for schedule_id, fingerprint in self._fingerprints.items()
                if (state := states.get(schedule_id)) is None
                or state.fingerprint is None
                or (state.fingerprint != fingerprint and state.first_seen_at < since)
            }
            if stale:
                await repo.register_schedules(stale, now_ms, since)
                states = await repo.schedule_states()
        except AsyncflowError as exc:
            # Raised, it would keep the driver, which fires ticks before it claims, from claiming:
            # on a database this asyncflow has not migrated yet (deployed before `asyncflow
            # migrate`), no instance would run until someone migrated.
            logger.warning(
                "schedules: reading their state failed, trying again in %d s (a database older than "
                "this asyncflow needs migrate()): %s",
                _RETRY_MS // 1000,
                exc,
            )
            self.next_at_ms = now_ms + _RETRY_MS
            return 0
        now = datetime.fromtimestamp(now_ms / 1000, UTC)
        fired = 0
        next_at = _ms(now + timedelta(days=366))
        for schedule in self._schedules:
            state = states[schedule.id]
            ours = state.fingerprint in (None, self._fingerprints[schedule.id])
            ticks = self._due(schedule, state, now, None if ours else since)
            try:
                for tick in ticks:
                    fired += await self._fire(schedule, tick, now_ms)
            except AsyncflowError as exc:
                # This schedule's tick only (say the database refuses its instance): raised, it would
                # keep the schedules after it from firing, and the driver, which fires ticks before it
                # claims, from claiming. Its tick stays unfired, so the next try fires it.
                logger.warning(
                    "schedule %s: firing tick %s failed, trying again in %d s: %s",
                    schedule.id,
                    tick_name(tick),
                    _RETRY_MS // 1000,
                    exc,
                    extra={"schedule_id": schedule.id, "tick": tick_name(tick)},
                )
                next_at = min(next_at, now_ms + _RETRY_MS)
                continue
            if len(ticks) == MAX_TICKS_PER_ROUND:
                next_at = now_ms  # more missed ticks: go on at once
            next_at = min(next_at, _ms(schedule.next_tick(now)))
        self.next_at_ms = next_at
        return fired

    @staticmethod
    def _due(schedule: Schedule, state: ScheduleState, now: datetime, since_ms: int | None) -> list[datetime]:
        if state.last_tick is not None:
            after = parse_tick(state.last_tick)
        else:  # seen first at first_seen_at: from its next tick on
            after = datetime.fromtimestamp(state.first_seen_at / 1000, UTC)
        if since_ms is not None:  # the state of a newer definition: only this firer's ticks
            after = max(after, datetime.fromtimestamp(since_ms / 1000, UTC))
        if schedule.catch_up:
            return list(islice(schedule.ticks_between(after, now), MAX_TICKS_PER_ROUND))
        latest = schedule.latest_tick(now)
        return [latest] if latest > after else []

    async def _fire(self, schedule: Schedule, tick: datetime, now_ms: int) -> int:
        name = tick_name(tick)
        repo = self._service.repo
        assert isinstance(repo, StoresSchedules)
        new = NewWorkflowInstance(
            workflow_type=schedule.workflow_type,
            business_id=f"{schedule.id}@{name}",
            workflow_context=schedule.instance_context(name),
            next_run_at=now_ms,
        )
        instance_id = await repo.fire_schedule_tick(
            schedule.id, name, new, now_ms=now_ms, prune_before=tick_name(tick - _PRUNE_AFTER)
        )
        if instance_id is None:
            return 0  # another driver fired it
        logger.info(
            "schedule %s fired tick %s: workflow instance %s",
            schedule.id,
            name,
            instance_id,
            extra={"schedule_id": schedule.id, "tick": name, "instance_id": instance_id},
        )
        return 1
