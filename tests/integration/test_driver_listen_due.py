"""The driver gets wake-ups through the repo's optional ``listen_due(callback)`` capability (the
``ListensDue`` Protocol), whatever the repo is: it never looks for an engine inside it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from asyncflow.driver import WorkflowDriver
from asyncflow.engine.service import WorkflowService
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.store.protocol import ListensDue

from .test_driver import LINEAR, Runs, eventually, registry_for


class Wakeups:
    """A listener the test fires by hand."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.listening = False

    async def run(self) -> None:
        self.listening = True
        try:
            await asyncio.Event().wait()  # until the driver cancels it
        finally:
            self.listening = False


class WakingRepo(MemoryWorkflowRepo):
    """The in-memory repo with wake-ups (as PostgreSQL's LISTEN/NOTIFY gives the SQL repo)."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Wakeups] = []

    def listen_due(self, callback: Callable[[], None]) -> Wakeups:
        self.listeners.append(Wakeups(callback))
        return self.listeners[-1]


async def test_the_driver_listens_through_the_repos_listen_due() -> None:
    runs = Runs()
    repo = WakingRepo()
    assert isinstance(repo, ListensDue) and not isinstance(MemoryWorkflowRepo(), ListensDue)
    registry = registry_for("lin", LINEAR, runs)
    service = WorkflowService(repo, LocalWorkflowLock(), registry)
    other = WorkflowService(repo, LocalWorkflowLock(), registry)  # its creates do not hint the driver
    driver = WorkflowDriver(service, concurrency=4, poll_interval=3600.0)
    async with driver:
        await eventually(lambda: driver.listening)
        [listener] = repo.listeners
        await other.create_workflow("lin", "a")
        await asyncio.sleep(0.05)
        assert driver.stats.completed == 0  # nothing woke it: the next poll is an hour away
        listener.callback()  # a wake-up from the database
        await eventually(lambda: driver.stats.completed == 1)
    assert driver.stats.notifications == 1 and runs.of("C") == 1
    assert not listener.listening  # stopped with the driver


async def test_run_until_idle_and_listen_false_ask_for_no_wakeups() -> None:
    repo = WakingRepo()
    service = WorkflowService(repo, LocalWorkflowLock(), registry_for("lin", LINEAR, Runs()))
    await WorkflowDriver(service).run_until_idle()
    async with WorkflowDriver(service, listen=False, poll_interval=0.01) as driver:
        await asyncio.sleep(0.05)
        assert not driver.listening
    assert repo.listeners == []
