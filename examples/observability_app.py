"""The order app of ``fastapi_app.py`` with OpenTelemetry traces and Prometheus metrics wired in.

    POST /orders {"order_id": "o-1", "sku": "book", "amount": 42}  → 201 {"id": ..., "status": "init"}
    GET  /orders/{id}                                                → status and node statuses
    GET  /metrics                                                    → Prometheus text format

Every request runs in a span; the span of ``POST /orders`` is stored with the new instance, so the spans
of its nodes, run later by the driver (here or in an ``asyncflow worker`` process), join its trace.
Run it with ``uvicorn --factory examples.observability_app:create_app`` after configuring an SDK
(``opentelemetry-sdk`` and an exporter; see ``docs/observability.md``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request, Response
from opentelemetry import trace
from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app
from pydantic import BaseModel

import asyncflow as af
from asyncflow.integrations.fastapi import workflow_lifespan
from asyncflow.integrations.opentelemetry import OpenTelemetryObserver
from asyncflow.integrations.prometheus import DriverMetrics, PrometheusObserver

from ._orders import WORKFLOW_TYPE, build_registry, describe

DEFAULT_DB = "sqlite+aiosqlite:///asyncflow_example.db"


class OrderIn(BaseModel):
    order_id: str
    sku: str
    amount: int


def create_app(
    database_url: str | None = None,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    metrics: CollectorRegistry | None = None,
) -> FastAPI:
    """The app; ``tracer_provider`` and ``metrics`` default to the global provider and registry."""
    metrics = REGISTRY if metrics is None else metrics
    repo = af.SQLAlchemyWorkflowRepo(database_url or os.environ.get("ASYNCFLOW_EXAMPLE_DB", DEFAULT_DB))
    observers = [OpenTelemetryObserver(tracer_provider), PrometheusObserver(metrics)]
    service = af.WorkflowService(repo, af.LocalWorkflowLock(), registry=build_registry(), observers=observers)
    driver = af.WorkflowDriver(service, concurrency=16, poll_interval=0.5)
    driver_metrics = DriverMetrics(driver, metrics)
    tracer = trace.get_tracer("orders-app", tracer_provider=tracer_provider)

    @asynccontextmanager
    async def resources(app: FastAPI) -> AsyncIterator[None]:
        await repo.create_schema()
        try:
            async with driver_metrics:  # refreshes the due-backlog gauge
                yield
        finally:
            await service.aclose()  # async observer calls still running
            await repo.aclose()

    app = FastAPI(title="asyncflow orders", lifespan=workflow_lifespan(driver, lifespan=resources))
    app.state.driver = driver
    app.mount("/metrics", make_asgi_app(registry=metrics))

    # a span per request (opentelemetry-instrumentation-fastapi does the same, with more attributes)
    @app.middleware("http")
    async def traced(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        with tracer.start_as_current_span(f"{request.method} {request.url.path}", kind=trace.SpanKind.SERVER):
            return await call_next(request)

    @app.post("/orders", status_code=201)
    async def create_order(order: OrderIn) -> dict[str, object]:
        context = {"sku": order.sku, "amount": order.amount}
        instance = await service.create_workflow(WORKFLOW_TYPE, order.order_id, context=context)
        return {"id": instance.id, "status": instance.status}

    @app.get("/orders/{instance_id}")
    async def get_order(instance_id: int) -> dict[str, object]:
        found = await describe(service, instance_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no order workflow {instance_id}")
        return found

    return app
