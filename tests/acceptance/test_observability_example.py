"""``examples/observability_app.py``: an order created through the app is traced from its request to its
last node (driven in the app's lifespan), and ``/metrics`` counts it."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("prometheus_client")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from examples import observability_app

ORDER = {"order_id": "o-1", "sku": "book", "amount": 42}


async def test_an_order_is_one_trace_and_shows_in_the_metrics(tmp_path: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = CollectorRegistry()
    app = observability_app.create_app(
        f"sqlite+aiosqlite:///{tmp_path}/orders.db", tracer_provider=provider, metrics=metrics
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            created = await client.post("/orders", json=ORDER)
            assert created.status_code == 201
            instance_id = created.json()["id"]
            for _ in range(1000):  # bounded: the driver completes it within a few passes
                if (await client.get(f"/orders/{instance_id}")).json()["status"] == "completed":
                    break
                await asyncio.sleep(0.01)
            scraped = (await client.get("/metrics/")).text
    spans = exporter.get_finished_spans()
    (request,) = [s for s in spans if s.name == "POST /orders"]
    nodes = [s for s in spans if s.attributes and "asyncflow.task_type" in s.attributes]
    assert sorted(s.attributes["asyncflow.task_type"] for s in nodes) == ["charge", "reserve", "ship"]
    assert {s.context.trace_id for s in nodes} == {request.context.trace_id}
    assert {s.parent.span_id for s in nodes} == {request.context.span_id}
    completed = 'asyncflow_instances_finished_total{status="completed",workflow_type="order"} 1.0'
    assert completed in scraped
    assert "asyncflow_driver_passes_in_flight" in scraped
