"""An aiohttp app that runs the order workflow with a WorkflowDriver beside it (``cleanup_ctx``).

    POST /orders {"order_id": "o-1", "sku": "book", "amount": 42}  → 201 {"id": ..., "status": "init"}
    GET  /orders/{id}                                                → status and node statuses

Run it with ``python -m examples.aiohttp_app --host 127.0.0.1 --port 8080`` (those are the defaults;
``pip install -e ".[aiohttp]"`` first). The database is the URL in ``ASYNCFLOW_EXAMPLE_DB``
(default: ``sqlite+aiosqlite:///asyncflow_example.db``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

import asyncflow as af
from asyncflow.integrations.aiohttp import driver_cleanup_ctx

from ._orders import WORKFLOW_TYPE, build_registry, describe

DEFAULT_DB = "sqlite+aiosqlite:///asyncflow_example.db"


def create_app(database_url: str | None = None) -> web.Application:
    """The app, on ``database_url`` (else ``$ASYNCFLOW_EXAMPLE_DB``, else a local SQLite file)."""
    repo = af.SQLAlchemyWorkflowRepo(database_url or os.environ.get("ASYNCFLOW_EXAMPLE_DB", DEFAULT_DB))
    service = af.WorkflowService(repo, af.LocalWorkflowLock(), registry=build_registry())
    driver = af.WorkflowDriver(service, concurrency=16, poll_interval=0.5)

    async def storage(app: web.Application) -> AsyncIterator[None]:
        await repo.create_schema()
        yield
        await repo.aclose()

    async def create_order(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            context = {"sku": str(body["sku"]), "amount": int(body["amount"])}
            business_id = str(body["order_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"expected order_id, sku and amount: {exc}") from exc
        instance = await service.create_workflow(WORKFLOW_TYPE, business_id, context=context)
        return web.json_response({"id": instance.id, "status": instance.status}, status=201)

    async def get_order(request: web.Request) -> web.Response:
        try:
            instance_id = int(request.match_info["instance_id"])
        except ValueError as exc:
            raise web.HTTPNotFound(text="instance ids are integers") from exc
        found = await describe(service, instance_id)
        if found is None:
            raise web.HTTPNotFound(text=f"no order workflow {instance_id}")
        return web.json_response(found)

    app = web.Application()
    app.cleanup_ctx.append(storage)  # starts first, stops last
    app.cleanup_ctx.append(driver_cleanup_ctx(driver))
    app.router.add_post("/orders", create_order)
    app.router.add_get("/orders/{instance_id}", get_order)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m examples.aiohttp_app [--host HOST] [--port PORT]``: serve the app."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.aiohttp_app", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    args = parser.parse_args(argv)
    web.run_app(create_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
