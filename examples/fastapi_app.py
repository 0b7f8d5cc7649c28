"""A FastAPI app that runs the order workflow with a WorkflowDriver in its lifespan.

    POST /orders {"order_id": "o-1", "sku": "book", "amount": 42}  → 201 {"id": ..., "status": "init"}
    GET  /orders/{id}                                                → status and node statuses

Run it with ``uvicorn --factory examples.fastapi_app:create_app --host 127.0.0.1 --port 8000`` from
the checkout (``pip install -e ".[fastapi]"`` brings FastAPI and uvicorn). The database is the URL in
``ASYNCFLOW_EXAMPLE_DB`` (default: ``sqlite+aiosqlite:///asyncflow_example.db``; a
``postgresql+asyncpg://`` URL works the same).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import asyncflow as af
from asyncflow.integrations.fastapi import workflow_lifespan

from ._orders import WORKFLOW_TYPE, build_registry, describe

DEFAULT_DB = "sqlite+aiosqlite:///asyncflow_example.db"


class OrderIn(BaseModel):
    order_id: str
    sku: str
    amount: int


def create_app(database_url: str | None = None) -> FastAPI:
    """The app, on ``database_url`` (else ``$ASYNCFLOW_EXAMPLE_DB``, else a local SQLite file)."""
    repo = af.SQLAlchemyWorkflowRepo(database_url or os.environ.get("ASYNCFLOW_EXAMPLE_DB", DEFAULT_DB))
    service = af.WorkflowService(repo, af.LocalWorkflowLock(), registry=build_registry())
    driver = af.WorkflowDriver(service, concurrency=16, poll_interval=0.5)

    @asynccontextmanager
    async def storage(app: FastAPI) -> AsyncIterator[None]:
        await repo.create_schema()  # before the driver starts ...
        try:
            yield
        finally:
            await repo.aclose()  # ... and closed after it stopped

    app = FastAPI(title="asyncflow orders", lifespan=workflow_lifespan(driver, lifespan=storage))
    app.state.driver = driver

    @app.post("/orders", status_code=201)
    async def create_order(order: OrderIn) -> dict[str, object]:
        context = {"sku": order.sku, "amount": order.amount}
        instance = await service.create_workflow(WORKFLOW_TYPE, order.order_id, context=context)
        return {"id": instance.id, "status": instance.status}  # the driver runs it from here

    @app.get("/orders/{instance_id}")
    async def get_order(instance_id: int) -> dict[str, object]:
        found = await describe(service, instance_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no order workflow {instance_id}")
        return found

    return app
