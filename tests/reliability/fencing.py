"""Counting stale writes: a repo wrapper that journals the passes' lease epochs and their steps.

A *stale write* is a step of a pass that applied although it was sent after a newer pass of its
instance had begun (that pass's leased read had returned a higher epoch). Times are ``time.time()``,
so journals of several processes on one host can be merged. ``fence=False`` sends the steps without
their epoch (the store then cannot refuse them): the check must find stale writes then, which shows
that it can fail.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

from asyncflow.records import Step, StepResult

Lease = tuple[int, int, float]  # instance, epoch, when the leased read returned
Write = tuple[int, int, float, bool, bool]  # instance, epoch, when sent, applied, refused as stale


class FenceJournal:
    """Wraps a repo (everything else passes through) and journals leased reads and fenced steps."""

    def __init__(self, inner: Any, *, fence: bool = True) -> None:
        self.inner = inner
        self.fence = fence
        self.leases: list[Lease] = []
        self.writes: list[Write] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def load_instance_state(self, instance_id: int, *, lease: bool = False) -> Any:
        state = await self.inner.load_instance_state(instance_id, lease=lease)
        if lease and state is not None:
            self.leases.append((instance_id, state[0].lease_epoch, time.time()))
        return state

    async def apply_step(self, step: Step) -> StepResult:
        sent = time.time()
        sent_step = step if self.fence else dataclasses.replace(step, lease_epoch=None)
        result: StepResult = await self.inner.apply_step(sent_step)
        if step.lease_epoch is not None:
            self.writes.append((step.instance_id, step.lease_epoch, sent, result.applied, result.stale))
        return result

    def dump(self) -> dict[str, Any]:
        return {"leases": self.leases, "writes": self.writes}


def stale_writes(leases: Iterable[Lease], writes: Iterable[Write]) -> list[Write]:
    """The applied writes sent after a newer pass of their instance had begun."""
    began: dict[int, list[tuple[float, int]]] = {}
    for instance_id, epoch, at in leases:
        began.setdefault(instance_id, []).append((at, epoch))
    stale = []
    for write in writes:
        instance_id, epoch, sent, applied, _ = write
        if applied and any(at < sent and newer > epoch for at, newer in began.get(instance_id, ())):
            stale.append(write)
    return stale


def refused_as_stale(writes: Iterable[Write]) -> int:
    """How many writes the store refused as stale (the fence at work)."""
    return sum(1 for write in writes if write[4])
