"""Workers: the built-in classes, NormalTaskWorker (async and sync functions), wait-check detection and
current_node()."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import pytest

from asyncflow.context import JSONContext
from asyncflow.errors import InvalidStateError, TaskNotReady
from asyncflow.worker import (
    NOT_IMPLEMENTED,
    BaseTaskWorker,
    EmptyTaskWorker,
    EndNodeWorker,
    NodeInfo,
    NormalTaskWorker,
    RootNodeWorker,
    TaskWorker,
    current_node,
    direct_run_function,
    heartbeat,
    node_scope,
    worker_has_wait_check,
)

INFO = NodeInfo(instance_id=7, workflow_type="order", business_id="b-1", task_type="pay", fail_count=2)


class Custom:
    """A Protocol implementation that shares no code with asyncflow's classes."""

    async def run(self, ctx: JSONContext) -> None:
        ctx.set(["custom"], True)

    async def wait_check(self, ctx: JSONContext) -> None:
        return None


class RunOnly(BaseTaskWorker):
    async def run(self, ctx: JSONContext) -> None:
        ctx.set(["ran"], 1)


class Polling(BaseTaskWorker):
    async def run(self, ctx: JSONContext) -> None:
        return None

    async def wait_check(self, ctx: JSONContext) -> None:
        raise TaskNotReady("still waiting")


async def test_empty_worker_fails_both_with_go_text() -> None:
    worker = EmptyTaskWorker()
    with pytest.raises(NotImplementedError, match=f"^{NOT_IMPLEMENTED}$"):
        await worker.run(JSONContext())
    with pytest.raises(NotImplementedError, match=f"^{NOT_IMPLEMENTED}$"):
        await worker.wait_check(JSONContext())
    assert NOT_IMPLEMENTED == "Not implemented"


async def test_base_worker_wait_check_succeeds_and_run_is_not_implemented() -> None:
    worker = BaseTaskWorker()
    await worker.wait_check(JSONContext())  # succeeds
    with pytest.raises(NotImplementedError, match=NOT_IMPLEMENTED):
        await worker.run(JSONContext())


async def test_base_worker_subclass_overrides_run() -> None:
    ctx = JSONContext()
    await RunOnly().run(ctx)
    assert ctx.get("ran") == (1, True)


async def test_root_and_end_workers_are_no_ops() -> None:
    for worker in (RootNodeWorker(), EndNodeWorker()):
        ctx = JSONContext({"k": "v"})
        await worker.run(ctx)
        await worker.wait_check(ctx)
        assert ctx.to_map() == {"k": "v"}


@pytest.mark.parametrize(
    "worker",
    [EmptyTaskWorker(), BaseTaskWorker(), RootNodeWorker(), EndNodeWorker(), NormalTaskWorker(), Custom()],
    ids=lambda w: type(w).__name__,
)
def test_every_worker_satisfies_the_protocol(worker: object) -> None:
    assert isinstance(worker, TaskWorker)


def test_a_plain_function_is_not_a_worker() -> None:
    async def run(ctx: JSONContext) -> None:
        return None

    assert not isinstance(run, TaskWorker)


async def test_normal_worker_async_run_mutates_the_context() -> None:
    async def run(ctx: JSONContext) -> None:
        ctx.set(["out", "n"], 2**60)

    ctx = JSONContext()
    await NormalTaskWorker(run=run).run(ctx)
    assert ctx.get_int64("out", "n") == (2**60, True)


async def test_normal_worker_without_run_fails_every_time() -> None:
    worker = NormalTaskWorker()
    for _ in range(3):
        with pytest.raises(NotImplementedError, match=NOT_IMPLEMENTED):
            await worker.run(JSONContext())


async def test_normal_worker_without_wait_check_is_synchronous() -> None:
    worker = NormalTaskWorker(run=RunOnly().run)
    await worker.wait_check(JSONContext())  # succeeds
    assert worker.wait_check_function is None
    assert not worker_has_wait_check(worker)


async def test_normal_worker_wait_check_signal_propagates() -> None:
    async def check(ctx: JSONContext) -> None:
        raise TaskNotReady("approval pending")

    worker = NormalTaskWorker(run=RunOnly().run, wait_check=check)
    with pytest.raises(TaskNotReady, match="approval pending"):
        await worker.wait_check(JSONContext())
    assert worker_has_wait_check(worker)


async def test_sync_run_runs_in_a_thread_and_sees_current_node() -> None:
    seen: dict[str, object] = {}

    def run(ctx: JSONContext) -> None:
        seen["thread"] = threading.get_ident()
        seen["node"] = current_node()
        ctx.set(["sync"], "yes")

    ctx = JSONContext()
    with node_scope(INFO):
        await NormalTaskWorker(run=run).run(ctx)
    assert seen["thread"] != threading.get_ident()
    assert seen["node"] == INFO
    assert ctx.get_string("sync") == ("yes", True)


async def test_sync_wait_check_runs_in_a_thread_and_raises_through() -> None:
    threads: list[int] = []

    def check(ctx: JSONContext) -> None:
        threads.append(threading.get_ident())
        raise TaskNotReady("not yet")

    worker = NormalTaskWorker(run=RunOnly().run, wait_check=check)
    with pytest.raises(TaskNotReady):
        await worker.wait_check(JSONContext())
    assert threads and threads[0] != threading.get_ident()


async def test_async_run_stays_on_the_loop_thread() -> None:
    threads: list[int] = []

    async def run(ctx: JSONContext) -> None:
        threads.append(threading.get_ident())

    await NormalTaskWorker(run=run).run(JSONContext())
    assert threads == [threading.get_ident()]


async def test_callable_object_with_async_call_is_awaited_on_the_loop() -> None:
    class Runner:
        def __init__(self) -> None:
            self.thread = 0

        async def __call__(self, ctx: JSONContext) -> None:
            self.thread = threading.get_ident()
            ctx.set(["obj"], 1)

    runner = Runner()
    ctx = JSONContext()
    await NormalTaskWorker(run=runner).run(ctx)
    assert runner.thread == threading.get_ident()
    assert ctx.get("obj") == (1, True)


async def test_sync_callable_returning_a_coroutine_is_awaited() -> None:
    async def real(ctx: JSONContext) -> None:
        ctx.set(["via"], "lambda")

    ctx = JSONContext()
    await NormalTaskWorker(run=lambda c: real(c)).run(ctx)
    assert ctx.get_string("via") == ("lambda", True)


async def test_sync_run_exception_propagates() -> None:
    def run(ctx: JSONContext) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await NormalTaskWorker(run=run).run(JSONContext())


async def test_cancelling_a_blocked_sync_run_raises_cancelled_at_once() -> None:
    started = threading.Event()
    release = threading.Event()

    def run(ctx: JSONContext) -> None:
        started.set()
        release.wait(60)

    task = asyncio.create_task(NormalTaskWorker(run=run).run(JSONContext()))
    try:
        await asyncio.to_thread(started.wait, 60)
        assert started.is_set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()


def test_normal_worker_rejects_non_callables() -> None:
    with pytest.raises(TypeError, match="run must be callable"):
        NormalTaskWorker(run=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="wait_check must be callable"):
        NormalTaskWorker(wait_check="x")  # type: ignore[arg-type]


class NormalWithOwnCheck(NormalTaskWorker):
    async def wait_check(self, ctx: JSONContext) -> None:
        raise TaskNotReady


@pytest.mark.parametrize(
    ("worker", "expected"),
    [
        (NormalTaskWorker(), False),
        (NormalTaskWorker(run=RunOnly().run), False),
        (NormalTaskWorker(run=RunOnly().run, wait_check=RunOnly().run), True),
        (NormalWithOwnCheck(run=RunOnly().run), True),
        (BaseTaskWorker(), False),
        (RunOnly(), False),
        (Polling(), True),
        (RootNodeWorker(), False),
        (EndNodeWorker(), False),
        (EmptyTaskWorker(), True),
        (Custom(), True),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, bool) else str(v),
)
def test_worker_has_wait_check(worker: TaskWorker, expected: bool) -> None:
    assert worker_has_wait_check(worker) is expected


async def _async_run(ctx: JSONContext) -> None:
    ctx.set(["ran"], "async")


class _AsyncCallable:
    async def __call__(self, ctx: JSONContext) -> None:
        ctx.set(["ran"], "callable")


class _OwnRun(NormalTaskWorker):
    async def run(self, ctx: JSONContext) -> None:
        ctx.set(["ran"], "own run")


def _replaced_on_the_instance() -> NormalTaskWorker:
    worker = NormalTaskWorker(run=_async_run)

    async def replaced(ctx: JSONContext) -> None:
        ctx.set(["ran"], "replaced")

    worker.run = replaced  # type: ignore[method-assign]
    return worker


def test_direct_run_function_only_for_a_plain_async_function_run_would_call() -> None:
    """What the engine awaits in place of ``worker.run(ctx)``: only where that is the same call."""
    assert direct_run_function(NormalTaskWorker(run=_async_run)) is _async_run
    for worker in (
        NormalTaskWorker(),  # fails "Not implemented"
        NormalTaskWorker(run=lambda ctx: None),  # a plain function: run in a thread
        NormalTaskWorker(run=_AsyncCallable()),  # not a function
        NormalTaskWorker(run=RunOnly().run),  # a bound method
        _OwnRun(run=_async_run),  # run() overridden
        _replaced_on_the_instance(),
        RunOnly(),
        Custom(),
        RootNodeWorker(),
    ):
        assert direct_run_function(worker) is None, worker


async def test_a_direct_run_function_does_what_run_does() -> None:
    worker = NormalTaskWorker(run=_async_run)
    via_run, direct = JSONContext(), JSONContext()
    await worker.run(via_run)
    function = direct_run_function(worker)
    assert function is not None
    await function(direct)
    assert via_run == direct == JSONContext({"ran": "async"})


def test_current_node_outside_a_worker_raises_lookup_error() -> None:
    with pytest.raises(LookupError, match=r"only available inside a worker's run\(\) or wait_check\(\)"):
        current_node()


def test_node_scope_sets_and_resets() -> None:
    other = dataclasses.replace(INFO, task_type="ship")
    with node_scope(INFO) as info:
        assert info is INFO
        assert current_node() is INFO
        with node_scope(other):
            assert current_node() is other
        assert current_node() is INFO
    with pytest.raises(LookupError):
        current_node()


def test_node_scope_resets_on_exception() -> None:
    with pytest.raises(RuntimeError), node_scope(INFO):
        raise RuntimeError("worker bug")
    with pytest.raises(LookupError):
        current_node()


async def test_current_node_is_per_task() -> None:
    seen: list[NodeInfo | None] = []

    async def probe() -> None:
        try:
            seen.append(current_node())
        except LookupError:
            seen.append(None)

    outside = asyncio.create_task(probe())
    with node_scope(INFO):
        inside = asyncio.create_task(probe())
        await inside
    await outside
    assert seen.count(INFO) == 1 and seen.count(None) == 1


def test_node_info_is_frozen() -> None:
    assert INFO.fail_count == 2 and INFO.business_id == "b-1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        INFO.fail_count = 3  # type: ignore[misc]


async def test_start_child_workflow_only_inside_a_run_scope() -> None:
    from asyncflow.errors import InvalidStateError, LockFailedError, ParamInvalidError
    from asyncflow.worker import WorkerCall, call_scope, start_child_workflow

    started: list[tuple[object, str, str, str, object]] = []
    parent = object()

    async def start(instance: object, task_type: str, workflow_type: str, key: str, context: Any) -> Any:
        started.append((instance, task_type, workflow_type, key, context))
        return key

    with pytest.raises(InvalidStateError, match="only available inside a worker's run"):
        await start_child_workflow("child", "k")
    run = WorkerCall("fan", instance=parent, next_nodes=(), start=start)
    with call_scope(run):
        assert await start_child_workflow("child", "a", context={"n": 1}) == "a"
        await start_child_workflow("child", "b")
        await start_child_workflow("child", "a")  # the same key again: recorded once
        for bad in (("", "x"), ("child", ""), ("child", 3)):
            with pytest.raises(ParamInvalidError):
                await start_child_workflow(*bad)
        # a wait_check inside this run(): no children from there
        with call_scope(WorkerCall("fan", instance=parent, start=start)), pytest.raises(InvalidStateError):
            await start_child_workflow("child", "c")
    assert run.keys == ["a", "b"]
    assert started == [
        (parent, "fan", "child", "a", {"n": 1}),
        (parent, "fan", "child", "b", None),
        (parent, "fan", "child", "a", None),
    ]
    with call_scope(WorkerCall("fan", instance=parent, next_nodes=())), pytest.raises(LockFailedError):
        await start_child_workflow("child", "d")  # a run() in a pass without a service


async def test_a_worker_call_builds_its_node_info_once_when_asked() -> None:
    from asyncflow.worker import WorkerCall, call_scope, choose

    @dataclasses.dataclass(frozen=True)
    class Record:
        id: int = 7
        workflow_type: str = "order"
        business_id: str = "b-1"
        trace_context: str | None = "00-trace"

    call = WorkerCall("pay", instance=Record(), fail_count=2)
    with call_scope(call):
        info = current_node()
        assert info == dataclasses.replace(INFO, trace_context="00-trace")
        assert current_node() is info
        with pytest.raises(LookupError, match="choose"):  # a wait_check: no choice to make
            choose()
        with pytest.raises(InvalidStateError, match="heartbeat"):  # no target: not a pass's call
            await heartbeat(1)
    with pytest.raises(LookupError):
        current_node()


def test_a_scope_replaces_the_whole_call() -> None:
    from asyncflow.worker import choice_scope, choose

    with choice_scope("check", ("a", "b")) as outer:
        with pytest.raises(LookupError, match="no node information"):
            current_node()  # a choice_scope's call carries no node
        with node_scope(INFO):
            assert current_node() is INFO
            with pytest.raises(LookupError):  # the node_scope's call has no choice to make
                choose("a")
        choose("b")
    assert outer.chosen == ("b",)
