"""OpenTelemetryObserver with the SDK's in-memory exporter (one process; see test_otel_processes.py)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import asyncflow as af
from asyncflow.errors import TaskFailedTerminate
from asyncflow.integrations.opentelemetry import OpenTelemetryObserver
from asyncflow.lock.local import LocalWorkflowLock
from asyncflow.store.memory import MemoryWorkflowRepo
from asyncflow.worker import NormalTaskWorker

from .engine_helpers import Calls, config, recording_worker, registry_with


def tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def node_spans(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return {
        s.attributes["asyncflow.task_type"]: s
        for s in exporter.get_finished_spans()
        if s.attributes and "asyncflow.task_type" in s.attributes
    }


async def test_node_spans_run_later_by_a_driver_join_the_trace_of_the_creating_request() -> None:
    provider, exporter = tracing()
    tracer = provider.get_tracer("app")

    async def worker_b(ctx: Any) -> None:
        with tracer.start_as_current_span("inside B"):
            pass

    registry = registry_with(
        config("lin", {"A": ["B"], "B": []}), Calls(), {"B": NormalTaskWorker(run=worker_b)}
    )
    svc = af.WorkflowService(
        MemoryWorkflowRepo(),
        LocalWorkflowLock(),
        registry,
        observers=[OpenTelemetryObserver(tracer_provider=provider)],
    )
    with tracer.start_as_current_span("POST /orders") as request:
        inst = await svc.create_workflow("lin", "order-1")
    await af.WorkflowDriver(svc).run_until_idle()  # no span current here
    assert (await svc.get_workflow_instance(inst.id)).status == "completed"
    spans = node_spans(exporter)
    assert set(spans) == {"A", "B"}
    request_ctx = request.get_span_context()
    for task_type, span in spans.items():
        assert span.context.trace_id == request_ctx.trace_id
        assert span.parent.span_id == request_ctx.span_id
        assert dict(span.attributes) == {
            "asyncflow.workflow_type": "lin",
            "asyncflow.instance_id": inst.id,
            "asyncflow.business_id": "order-1",
            "asyncflow.task_type": task_type,
            "asyncflow.fail_count": 0,
            "asyncflow.outcome": "completed",
        }
        assert span.status.status_code is StatusCode.UNSET
    (inner,) = [s for s in exporter.get_finished_spans() if s.name == "inside B"]
    assert inner.parent.span_id == spans["B"].context.span_id  # the worker's spans nest in the node's


async def test_failures_set_error_status_and_record_the_exception() -> None:
    provider, exporter = tracing()

    def boom(ctx: Any) -> None:
        raise RuntimeError("flaky backend")

    def fatal(ctx: Any) -> None:
        raise TaskFailedTerminate("bad order")

    calls = Calls()
    cfg = config("f", {"R": ["X"], "X": []})
    registry = registry_with(cfg, calls, {"R": recording_worker(calls, boom)})
    observer = OpenTelemetryObserver(tracer_provider=provider)
    svc = af.WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry, observers=[observer])
    inst = await svc.create_workflow("f", "b")  # no span current: nothing stored, a trace per attempt
    assert (await svc.repo.get_workflow_instance(inst.id)).trace_context is None  # type: ignore[union-attr]
    await svc.run_workflow(inst.id)
    retry = node_spans(exporter)["R"]
    assert retry.parent is None
    assert retry.attributes["asyncflow.outcome"] == "retry"
    assert retry.status.status_code is StatusCode.ERROR
    assert "RuntimeError: flaky backend" in (retry.status.description or "")
    (event,) = retry.events
    assert event.name == "exception" and event.attributes["exception.message"] == "flaky backend"

    exporter.clear()
    registry2 = registry_with(config("g", {"X": []}), calls, {"X": recording_worker(calls, fatal)})
    svc2 = af.WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry2, observers=[observer])
    await svc2.create_workflow("g", "b", run=True)
    failed = node_spans(exporter)["X"]
    assert failed.attributes["asyncflow.outcome"] == "failed"
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]


async def test_a_pass_run_in_another_traced_operation_links_to_it() -> None:
    provider, exporter = tracing()
    tracer = provider.get_tracer("app")
    registry = registry_with(config("one", {"A": []}), Calls())
    observer = OpenTelemetryObserver(tracer_provider=provider)
    svc = af.WorkflowService(MemoryWorkflowRepo(), LocalWorkflowLock(), registry, observers=[observer])
    with tracer.start_as_current_span("POST /start") as creating:
        inst = await svc.create_workflow("one", "b")
    with tracer.start_as_current_span("POST /run-now") as later:
        await svc.run_workflow(inst.id)
    span = node_spans(exporter)["A"]
    assert span.context.trace_id == creating.get_span_context().trace_id  # the stored trace wins
    assert [link.context.span_id for link in span.links] == [later.get_span_context().span_id]


async def test_a_skipped_node_gets_a_span_with_outcome_skipped_and_no_error(
    engine_repo: Any, local_lock: Any
) -> None:
    provider, exporter = tracing()
    calls = Calls()

    def check(ctx: Any) -> None:
        af.choose("ship")

    registry = registry_with(
        config("route", {"check": ["ship", "refund"], "ship": [], "refund": []}),
        calls,
        {"check": recording_worker(calls, check)},
    )
    svc = af.WorkflowService(
        engine_repo, local_lock, registry, observers=[OpenTelemetryObserver(tracer_provider=provider)]
    )
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("POST /route") as request:
        inst = await svc.create_workflow("route", "r-1")
    assert (await svc.run_workflow(inst.id)).status == "completed"
    spans = node_spans(exporter)
    assert set(spans) == {"check", "ship", "refund"}
    refund = spans["refund"]
    assert refund.attributes["asyncflow.outcome"] == "skipped"
    assert refund.status.status_code is StatusCode.UNSET and not refund.events
    assert refund.context.trace_id == request.get_span_context().trace_id  # in the instance's trace
    assert spans["ship"].attributes["asyncflow.outcome"] == "completed"
