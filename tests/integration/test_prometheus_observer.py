"""PrometheusObserver and DriverMetrics: what they count, read from a private CollectorRegistry."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest

import asyncflow as af
from asyncflow.integrations.prometheus import DriverMetrics, PrometheusObserver
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.store.memory import MemoryWorkflowRepo

from .engine_helpers import Calls, config, recording_worker, registry_with


async def test_attempts_durations_and_instance_ends_are_counted() -> None:
    calls = Calls()
    failures = iter([RuntimeError("once")])

    def flaky(ctx: Any) -> None:
        error = next(failures, None)
        if error is not None:
            raise error

    registry = registry_with(
        config("lin", {"A": ["B"], "B": []}), calls, {"A": recording_worker(calls, flaky)}
    )
    metrics = CollectorRegistry()
    svc = af.WorkflowService(
        MemoryWorkflowRepo(),
        LocalWorkflowLock(),
        registry,
        observers=[PrometheusObserver(metrics)],
        retry=af.RetryPolicy(initial_interval=0.01, max_interval=0.01),
    )
    inst = await svc.create_workflow("lin", "b")
    await svc.run_workflow(inst.id)  # A fails once: retry
    await svc.run_workflow(inst.id)  # A then B complete
    sample = metrics.get_sample_value
    attempts = "asyncflow_node_attempts_total"
    assert sample(attempts, {"workflow_type": "lin", "task_type": "A", "outcome": "retry"}) == 1
    assert sample(attempts, {"workflow_type": "lin", "task_type": "A", "outcome": "completed"}) == 1
    assert sample(attempts, {"workflow_type": "lin", "task_type": "B", "outcome": "completed"}) == 1
    assert sample("asyncflow_node_duration_seconds_count", {"workflow_type": "lin", "task_type": "A"}) == 2
    assert sample("asyncflow_instances_created_total", {"workflow_type": "lin"}) == 1
    assert sample("asyncflow_instances_finished_total", {"workflow_type": "lin", "status": "completed"}) == 1
    await svc.cancel_workflow_instance((await svc.create_workflow("lin", "c")).id)
    assert sample("asyncflow_instances_finished_total", {"workflow_type": "lin", "status": "canceled"}) == 1


async def test_driver_metrics_show_in_flight_backlog_and_claims() -> None:
    clock = af.FakeClock(start=1_000_000.0)
    registry = registry_with(config("one", {"A": []}), Calls())
    svc = af.WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry, clock=clock)
    metrics_registry = CollectorRegistry()
    driver = af.WorkflowDriver(svc)
    metrics = DriverMetrics(driver, metrics_registry)
    for n in range(3):
        await svc.create_workflow("one", f"b-{n}")
    clock.advance(42.5)
    await metrics.refresh()
    sample = metrics_registry.get_sample_value
    assert sample("asyncflow_driver_due_backlog_seconds") == pytest.approx(42.5)
    assert sample("asyncflow_driver_passes_in_flight") == 0
    await driver.run_until_idle()
    await metrics.refresh()
    assert sample("asyncflow_driver_due_backlog_seconds") == 0
    assert sample("asyncflow_driver_passes_total") == 3
    assert sample("asyncflow_driver_completed_total") == 3
    assert sample("asyncflow_driver_claims_total") >= 1
    assert sample("asyncflow_driver_claim_seconds_total") > 0
    text = generate_latest(metrics_registry).decode()
    assert "# TYPE asyncflow_driver_passes_in_flight gauge" in text


async def test_a_skipped_node_is_counted_with_outcome_skipped_without_a_duration(
    engine_repo: Any, local_lock: Any
) -> None:
    calls = Calls()

    def check(ctx: Any) -> None:
        af.choose("refund")

    registry = registry_with(
        config("route", {"check": ["ship", "refund"], "ship": ["mail"], "refund": [], "mail": []}),
        calls,
        {"check": recording_worker(calls, check)},
    )
    metrics = CollectorRegistry()
    svc = af.WorkflowService(engine_repo, local_lock, registry, observers=[PrometheusObserver(metrics)])
    for n in range(2):
        assert (await svc.create_workflow("route", f"r-{n}", run=True)).status == "completed"
    sample = metrics.get_sample_value
    attempts = "asyncflow_node_attempts_total"
    for task_type in ("ship", "mail"):  # not chosen, and skipped after it
        assert sample(attempts, {"workflow_type": "route", "task_type": task_type, "outcome": "skipped"}) == 2
        assert (
            sample(attempts, {"workflow_type": "route", "task_type": task_type, "outcome": "completed"})
            is None
        )
        assert (
            sample(
                "asyncflow_node_duration_seconds_count", {"workflow_type": "route", "task_type": task_type}
            )
            is None
        )
    assert sample(attempts, {"workflow_type": "route", "task_type": "refund", "outcome": "completed"}) == 2
    assert (
        sample("asyncflow_node_duration_seconds_count", {"workflow_type": "route", "task_type": "refund"})
        == 2
    )
    assert (
        sample("asyncflow_instances_finished_total", {"workflow_type": "route", "status": "completed"}) == 2
    )
    assert 'outcome="skipped"' in generate_latest(metrics).decode()
