"""DriverConfig validation, config merging and the driver's wait helpers (no services)."""

from __future__ import annotations

import asyncio

import pytest

from asyncflow._driver_config import DriverConfig, DriverStats, bounded, merge_config, wait_for_wake
from asyncflow.clock import FakeClock, SystemClock
from asyncflow.errors import ParamInvalidError


def test_defaults() -> None:
    config = DriverConfig()
    assert (config.concurrency, config.poll_interval, config.workflow_types) == (64, 1.0, None)
    assert (config.batch_size, config.claim_lease, config.listen) == (None, None, True)
    assert (config.stop_grace, config.stop_deadline) == (10.0, 5.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"concurrency": 0},
        {"concurrency": True},
        {"concurrency": 2.0},
        {"batch_size": 0},
        {"poll_interval": 0},
        {"poll_interval": float("nan")},
        {"poll_interval": "1"},
        {"claim_lease": -1},
        {"stop_deadline": -0.1},
        {"stop_grace": float("inf")},
        {"error_backoff_jitter": 1.0},
        {"error_backoff_max": -1},
        {"listen": 1},
        {"workflow_types": "abc"},
        {"workflow_types": ["ok", ""]},
        {"workflow_types": [1]},
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, object]) -> None:
    with pytest.raises(ParamInvalidError, match=next(iter(kwargs))):
        DriverConfig(**kwargs)  # type: ignore[arg-type]


def test_workflow_types_become_a_tuple_and_the_config_is_frozen() -> None:
    config = DriverConfig(workflow_types=["a", "b"])
    assert config.workflow_types == ("a", "b")
    with pytest.raises(AttributeError):
        config.concurrency = 3  # type: ignore[misc]


def test_merge_config() -> None:
    assert merge_config(None, {"concurrency": 8}).concurrency == 8
    base = DriverConfig(concurrency=3, poll_interval=0.5, listen=False)
    # the driver's keyword defaults do not override a given config; anything else does
    merged = merge_config(
        base, {"concurrency": 64, "poll_interval": 1.0, "workflow_types": None, "batch_size": 2}
    )
    assert (merged.concurrency, merged.poll_interval, merged.listen, merged.batch_size) == (3, 0.5, False, 2)
    assert merge_config(base, {"concurrency": 5}).concurrency == 5
    with pytest.raises(ParamInvalidError, match="bogus"):
        merge_config(None, {"bogus": 1})
    with pytest.raises(ParamInvalidError, match="DriverConfig"):
        merge_config({"concurrency": 1}, {})  # type: ignore[arg-type]


def test_stats_as_dict() -> None:
    stats = DriverStats(passes=2, completed=1)
    assert stats.as_dict()["passes"] == 2 and stats.as_dict()["completed"] == 1
    assert set(stats.as_dict()) >= {"passes", "completed", "failed", "errors", "lock_skips"}


async def test_wait_for_wake_with_a_fake_clock_moves_fake_time() -> None:
    clock, event = FakeClock(), asyncio.Event()
    start = clock.time()
    assert await wait_for_wake(event, clock, 5.0) is False
    assert clock.time() == start + 5.0
    event.set()
    assert await wait_for_wake(event, clock, 5.0) is True
    assert clock.time() == start + 5.0  # already set: no sleep
    assert await wait_for_wake(asyncio.Event(), clock, 0) is False


async def test_wait_for_wake_with_the_system_clock() -> None:
    event = asyncio.Event()
    assert await wait_for_wake(event, SystemClock(), 0.001) is False
    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_for_wake(event, SystemClock(), None) is True


async def test_bounded() -> None:
    async def ok() -> int:
        return 1

    async def fails() -> None:
        raise RuntimeError("boom")

    async def hangs() -> None:
        await asyncio.Event().wait()

    assert await bounded(ok(), 1.0) is None
    assert await bounded(fails(), 1.0) == "RuntimeError: boom"
    assert await bounded(hangs(), 0.01) == "timed out"
