"""``IdleRelease``: a repo's kept connections go back once it has stayed idle for the delay."""

from __future__ import annotations

import asyncio
import logging

import pytest

from asyncflow.store._lanes import IdleRelease

DELAY = 0.2  # long enough that a stalled event loop does not reorder the checks


class Owner:
    def __init__(self, *, fail: bool = False, release_takes: float = 0.0) -> None:
        self.busy = False
        self.released = 0
        self.finished = 0
        self.fail = fail
        self.release_takes = release_takes
        self.idle = IdleRelease(lambda: not self.busy, self.release, DELAY)

    async def release(self) -> None:
        self.released += 1
        await asyncio.sleep(self.release_takes)
        if self.fail:
            raise RuntimeError("pool refused")
        self.finished += 1


async def test_an_idle_owner_is_released_once_after_the_delay() -> None:
    owner = Owner()
    owner.idle.arm()
    owner.idle.arm()  # idle again: one timer
    await asyncio.sleep(DELAY / 2)
    assert owner.released == 0
    await asyncio.sleep(DELAY * 2)
    assert owner.released == owner.finished == 1
    await asyncio.sleep(DELAY * 2)
    assert owner.released == 1  # not re-armed by itself


async def test_a_busy_owner_is_not_released_and_the_next_idle_moment_rearms() -> None:
    owner = Owner()
    owner.idle.arm()
    owner.busy = True
    await asyncio.sleep(DELAY * 2)
    assert owner.released == 0
    owner.busy = False
    owner.idle.arm()
    await asyncio.sleep(DELAY * 2)
    assert owner.released == 1


async def test_the_release_waits_for_the_delay_after_the_last_idle_moment() -> None:
    owner = Owner()
    owner.idle.arm()
    await asyncio.sleep(DELAY * 0.8)
    owner.idle.arm()  # busy and idle again in between: the delay starts over
    await asyncio.sleep(DELAY * 0.6)
    assert owner.released == 0
    await asyncio.sleep(DELAY * 1.5)
    assert owner.released == 1


async def test_aclose_cancels_the_timer() -> None:
    owner = Owner()
    owner.idle.arm()
    await owner.idle.aclose()
    await asyncio.sleep(DELAY * 2)
    assert owner.released == 0


async def test_aclose_waits_for_a_release_in_progress() -> None:
    owner = Owner(release_takes=DELAY * 2)
    owner.idle.arm()
    await asyncio.sleep(DELAY * 1.5)
    assert owner.released == 1 and owner.finished == 0
    await owner.idle.aclose()
    assert owner.finished == 1


async def test_a_failed_release_is_logged_and_the_owner_can_be_released_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = Owner(fail=True)
    with caplog.at_level(logging.WARNING, logger="asyncflow.store._lanes"):
        owner.idle.arm()
        await asyncio.sleep(DELAY * 2)
    assert owner.released == 1
    assert any("idle connections" in record.getMessage() for record in caplog.records)
    owner.fail = False
    owner.idle.arm()
    await asyncio.sleep(DELAY * 2)
    assert owner.released == 2 and owner.finished == 1
