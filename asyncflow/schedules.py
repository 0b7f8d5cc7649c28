"""Cron schedules: :class:`Schedule` (``registry.add_schedule``) and its tick arithmetic.

Cron expressions are the standard five fields (minute, hour, day of month, month, day of week),
parsed and evaluated by `cronsim <https://pypi.org/project/cronsim/>`_: a small, typed,
dependency-free library (maintained for healthchecks.io) that evaluates expressions in a
``zoneinfo`` time zone and handles daylight-saving gaps and repeats the way cron does. (croniter
also works, but it accepts non-standard 6- and 7-field forms we would have to refuse ourselves, and
its maintenance has changed hands.) A tick is an instant; it is named in UTC as
``YYYY-MM-DDTHH:MM:SSZ``, so tick names sort in time order.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ._json_depth import check_json_depth
from ._text import MAX_ID_BYTES, shown, too_long, unstorable
from .errors import ConfigError, ParamInvalidError
from .store._json import dumps_context

__all__ = ["Schedule", "parse_tick", "tick_name"]

_TICK_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_DST_MARGIN = timedelta(hours=3)  # more than any daylight-saving shift


_LONGEST_TICK = "2000-01-01T00:00:00Z"
"""A tick name as long as any (:func:`tick_name`)."""


def tick_name(tick: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` (UTC) of an aware datetime."""
    return tick.astimezone(UTC).strftime(_TICK_FORMAT)


def parse_tick(name: str) -> datetime:
    """The aware UTC datetime of a tick name."""
    return datetime.strptime(name, _TICK_FORMAT).replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Schedule:
    """Start ``workflow_type`` at every tick of ``cron`` (standard 5 fields) in ``timezone``.

    Each tick creates one instance (exactly once across processes) with business id
    ``f"{id}@{tick}"`` and context ``{**context, "schedule": {"id": id, "tick": tick}}``. A schedule
    seen for the first time fires from its next tick on. After downtime ``catch_up=False`` fires the
    latest missed tick only, ``catch_up=True`` every missed tick, oldest first. Invalid values raise
    ``ConfigError``; ``context`` is copied deeply once checked (a caller's dict, changed later, does
    not reach the ticks). The stored state (the last tick fired) belongs to the schedule's definition
    (:meth:`fingerprint`): a schedule whose workflow type, cron, time zone or ``catch_up`` changed
    starts over, as if seen for the first time.
    """

    id: str
    workflow_type: str
    cron: str
    context: Mapping[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    catch_up: bool = False

    def __post_init__(self) -> None:
        where = f"schedule {shown(self.id)}"
        if not isinstance(self.id, str) or not self.id.strip() or "@" in self.id or unstorable(self.id):
            raise ConfigError(f"schedule id must be a non-empty string without '@', got {shown(self.id)}")
        if too_long(f"{self.id}@{_LONGEST_TICK}") is not None:  # its ticks' business ids
            raise ConfigError(
                f"schedule id {self.id[:40]!r}...: a tick's business id (the id, '@' and the tick's "
                f"{len(_LONGEST_TICK)} characters) must be at most {MAX_ID_BYTES} bytes of UTF-8"
            )
        if not isinstance(self.workflow_type, str) or not self.workflow_type:
            raise ConfigError(
                f"{where}: workflow_type must be a non-empty string, got {shown(self.workflow_type)}"
            )
        if not isinstance(self.catch_up, bool):
            raise ConfigError(f"{where}: catch_up must be a bool, got {shown(self.catch_up)}")
        if not isinstance(self.context, Mapping):
            raise ConfigError(f"{where}: context must be a mapping, got {type(self.context).__name__}")
        # what every tick's instance gets: refused here as create_workflow would refuse it (a NUL, a lone
        # surrogate, NaN, too deep), else each tick's insert fails and the driver claims nothing else
        try:
            check_json_depth(self.context, f"{where}: context", error=ConfigError)
            dumps_context(dict(self.context), "context")
        except ParamInvalidError as exc:
            raise ConfigError(f"{where}: context is not JSON a repo can store ({exc})") from None
        if "schedule" in self.context:
            raise ConfigError(f"{where}: context must not have the key 'schedule' (asyncflow sets it)")
        # a copy of what was checked: the caller's dict, changed later, would change (or break) every tick
        object.__setattr__(self, "context", copy.deepcopy(dict(self.context)))
        self.zone()  # checks the time zone
        if not isinstance(self.cron, str) or len(self.cron.split()) != 5:
            raise ConfigError(
                f"{where}: cron must have 5 fields (minute hour day month weekday), got {shown(self.cron)}"
            )
        try:
            CronSim(self.cron, datetime.now(UTC).astimezone(self.zone()))
        except CronSimError as exc:
            raise ConfigError(f"{where}: invalid cron {self.cron!r} ({exc})") from None

    def zone(self) -> ZoneInfo:
        """The schedule's time zone (``ConfigError`` if unknown)."""
        try:
            if not isinstance(self.timezone, str) or not self.timezone:
                raise ValueError("empty")
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(
                f"schedule {shown(self.id)}: unknown time zone {shown(self.timezone)} ({exc})"
            ) from None

    def next_tick(self, after: datetime) -> datetime:
        """The first tick strictly after ``after`` (aware), in UTC."""
        return next(CronSim(self.cron, after.astimezone(self.zone()))).astimezone(UTC)

    def latest_tick(self, at: datetime) -> datetime:
        """The last tick at or before ``at`` (aware), in UTC."""
        # Ticks fall on whole minutes: the last tick at or before ``at`` is the last one strictly before
        # the next whole minute. Starting the reverse walk on a whole minute gives the same answer on
        # every cronsim version (2.6 treats a start with seconds as its own minute's start and would
        # skip a tick earlier in that minute). The minute is added in UTC: local arithmetic drops the
        # ``fold`` of a repeated hour (its second pass became its first).
        moment = at.astimezone(UTC)
        start = (moment.replace(second=0, microsecond=0) + timedelta(minutes=1)).astimezone(self.zone())
        guess = next(CronSim(self.cron, start, reverse=True)).astimezone(UTC)
        # The reverse walk reads local wall times and ignores ``fold``: in a repeated hour it may give
        # a tick of the other pass (an hour off, or after ``at``). The forward walk, which
        # ``next_tick`` and ``ticks_between`` use, decides from a few hours before the guess.
        latest = None
        for tick in self.ticks_between(min(guess, moment) - _DST_MARGIN, moment):
            latest = tick
        return guess if latest is None else latest

    def ticks_between(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """The ticks in ``(after, until]``, oldest first, in UTC."""
        for tick in CronSim(self.cron, after.astimezone(self.zone())):
            if tick > until:
                return
            yield tick.astimezone(UTC)

    def fingerprint(self) -> str:
        """What the stored state of this schedule belongs to: its workflow type, cron, time zone and
        ``catch_up`` (JSON). Not its context: new values for the next instances keep the ticks."""
        return json.dumps(
            [self.workflow_type, " ".join(self.cron.split()), self.timezone, self.catch_up],
            ensure_ascii=False,
            separators=(",", ":"),
        )

    def instance_context(self, tick: str) -> dict[str, Any]:
        """The workflow context of the instance of ``tick``."""
        return {**self.context, "schedule": {"id": self.id, "tick": tick}}
