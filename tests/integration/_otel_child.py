"""The driver process of test_otel_processes.py: drives the instances of a database with the
OpenTelemetry observer and prints the spans it exported (SDK in-memory exporter) as JSON lines."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.ext.asyncio import create_async_engine

import asyncflow as af
from asyncflow.integrations.opentelemetry import OpenTelemetryObserver

WORKFLOW = {"id": "traced", "nodes": [{"id": "A", "next_nodes": ["B"]}, {"id": "B"}]}


def build_registry() -> af.Registry:
    registry = af.Registry()
    registry.load_workflow_config(WORKFLOW)
    for node in ("A", "B"):
        registry.register_workflow_task("traced", node, af.NormalTaskWorker(run=lambda ctx: None))
    return registry


def engine(url: str, schema: str) -> Any:
    if not schema:
        return create_async_engine(url)
    return create_async_engine(url, connect_args={"server_settings": {"search_path": schema}})


def traced_service(url: str, schema: str) -> tuple[af.WorkflowService, TracerProvider, InMemorySpanExporter]:
    """A service on the database with the OpenTelemetry observer, exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    repo = af.SQLAlchemyWorkflowRepo(engine(url, schema))
    svc = af.WorkflowService(
        repo, af.LocalWorkflowLock(), build_registry(), observers=[OpenTelemetryObserver(provider)]
    )
    return svc, provider, exporter


async def drive(url: str, schema: str) -> list[dict[str, Any]]:
    svc, _, exporter = traced_service(url, schema)
    repo = svc.repo
    assert isinstance(repo, af.SQLAlchemyWorkflowRepo)
    try:
        await af.WorkflowDriver(svc, poll_interval=0.05).run_until_idle()
    finally:
        await repo.aclose()
        await repo.engine.dispose()
    return [
        {
            "name": span.name,
            "trace_id": span.context.trace_id,
            "parent_id": span.parent.span_id if span.parent else None,
            "attributes": dict(span.attributes or {}),
        }
        for span in exporter.get_finished_spans()
    ]


if __name__ == "__main__":
    for entry in asyncio.run(drive(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")):
        print(json.dumps(entry))
