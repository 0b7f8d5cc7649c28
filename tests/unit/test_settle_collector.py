"""``settle_collector()``: what ``asyncflow worker`` does to the collector once it is set up."""

from __future__ import annotations

import functools
import gc
import subprocess
import sys
from collections.abc import Iterator

import pytest

from asyncflow.cli.worker import GEN0_THRESHOLD, settle_collector


@functools.cache
def _frozen_at_start() -> int:
    """What a new interpreter has frozen before any code runs (0 on 3.11 and 3.13; 3.12.1 has some)."""
    out = subprocess.run(
        [sys.executable, "-c", "import gc; print(gc.get_freeze_count())"], capture_output=True
    )
    return int(out.stdout)


@pytest.fixture
def collector() -> Iterator[None]:
    """Put the test process's collector back as it was (thresholds, nothing frozen but what the
    interpreter froze itself)."""
    if gc.get_freeze_count() > _frozen_at_start():  # gc.unfreeze() would also thaw what someone froze
        pytest.skip("this process froze objects already: settle_collector() is not undone here")
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.usefixtures("collector")
def test_freezes_what_exists_and_raises_the_first_threshold() -> None:
    gc.set_threshold(700, 10, 10)
    kept = [object() for _ in range(10)], {"a": []}  # noqa: F841 - alive across the call
    settle_collector()
    assert gc.get_freeze_count() > 1_000  # this process's modules and test objects
    assert gc.get_threshold() == (GEN0_THRESHOLD, 10, 10)  # the older generations' as they were


@pytest.mark.usefixtures("collector")
@pytest.mark.parametrize("threshold", [(0, 10, 10), (50_000, 5, 5)], ids=["collector off", "higher already"])
def test_leaves_an_apps_own_choice(threshold: tuple[int, int, int]) -> None:
    gc.set_threshold(*threshold)
    settle_collector()
    assert gc.get_threshold() == threshold
