"""``Schedule``'s tick arithmetic, independent of how the installed cronsim version walks backwards."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import asyncflow as af


@pytest.mark.parametrize(
    ("at", "latest"),
    [
        ((0, 10, 0), (0, 10, 0)),  # on a tick: that tick
        ((0, 10, 0, 1), (0, 10, 0)),  # a microsecond after
        ((0, 10, 31), (0, 10, 0)),  # seconds after (cronsim 2.6's reverse walk skipped this one)
        ((0, 19, 59, 999999), (0, 10, 0)),  # just before the next
        ((0, 9, 59), (0, 0, 0)),
    ],
)
def test_the_latest_tick_is_the_last_one_at_or_before_the_moment(
    at: tuple[int, ...], latest: tuple[int, ...]
) -> None:
    every10 = af.Schedule(id="ten", workflow_type="report", cron="*/10 * * * *")
    moment = datetime(2026, 1, 1, *at, tzinfo=UTC)
    assert every10.latest_tick(moment) == datetime(2026, 1, 1, *latest, tzinfo=UTC)


def test_the_latest_tick_in_a_time_zone_with_a_half_hour_offset() -> None:
    daily = af.Schedule(id="d", workflow_type="report", cron="0 9 * * *", timezone="Asia/Kolkata")
    # 09:00 in Kolkata is 03:30 UTC
    assert daily.latest_tick(datetime(2026, 1, 2, 3, 30, 45, tzinfo=UTC)) == datetime(
        2026, 1, 2, 3, 30, tzinfo=UTC
    )
    assert daily.latest_tick(datetime(2026, 1, 2, 3, 29, 59, tzinfo=UTC)) == datetime(
        2026, 1, 1, 3, 30, tzinfo=UTC
    )


def test_next_tick_is_strictly_after() -> None:
    every10 = af.Schedule(id="ten", workflow_type="report", cron="*/10 * * * *")
    assert every10.next_tick(datetime(2026, 1, 1, 0, 10, tzinfo=UTC)) == datetime(
        2026, 1, 1, 0, 20, tzinfo=UTC
    )
    assert every10.next_tick(datetime(2026, 1, 1, 0, 3, 5, tzinfo=UTC)) == datetime(
        2026, 1, 1, 0, 10, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("cron", "zone", "night"),
    [
        ("*/30 * * * *", "Europe/Paris", datetime(2024, 10, 26, 22, 0, tzinfo=UTC)),  # 03:00 -> 02:00
        ("0 * * * *", "Europe/Paris", datetime(2024, 10, 26, 22, 0, tzinfo=UTC)),
        ("* * * * *", "America/New_York", datetime(2024, 11, 3, 4, 0, tzinfo=UTC)),  # 02:00 -> 01:00
        ("59 1 * * *", "America/New_York", datetime(2024, 11, 3, 4, 0, tzinfo=UTC)),
        ("*/30 * * * *", "Europe/Paris", datetime(2024, 3, 30, 22, 0, tzinfo=UTC)),  # 02:00 -> 03:00
        ("30 2 * * *", "Europe/Paris", datetime(2024, 3, 30, 22, 0, tzinfo=UTC)),
    ],
)
def test_the_latest_tick_across_a_daylight_saving_change_is_the_last_forward_tick(
    cron: str, zone: str, night: datetime
) -> None:
    # catch_up=False fires latest_tick(now): at every minute of the night it must be the last tick
    # the forward walk (next_tick, ticks_between, catch_up=True) gives at or before that moment. In
    # a repeated hour it went back to the hour's first pass (a tick of the second pass was never
    # fired) or ahead of the moment (a tick fired up to half an hour early).
    schedule = af.Schedule(id="s", workflow_type="report", cron=cron, timezone=zone)
    ticks = list(schedule.ticks_between(night - timedelta(days=1), night + timedelta(hours=8)))
    for minute in range(0, 6 * 60):
        moment = night + timedelta(minutes=minute, seconds=10)
        expected = max(tick for tick in ticks if tick <= moment)
        assert schedule.latest_tick(moment) == expected, moment
