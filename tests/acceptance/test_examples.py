"""The example apps under ``examples/``: each creates, queries and completes an order workflow while
its WorkflowDriver runs beside it (FastAPI lifespan, aiohttp cleanup_ctx)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import subprocess
import sys
import time
import tomllib
from typing import Any

import httpx
from aiohttp.test_utils import TestClient, TestServer

import asyncflow as af
from asyncflow.driver import WorkflowDriver
from examples import aiohttp_app, fastapi_app

ROOT = pathlib.Path(__file__).resolve().parents[2]
ORDER = {"order_id": "o-1", "sku": "book", "amount": 42}
_POLLS = 1000  # bounded: the driver completes the order within a few passes


async def _until_completed(get: Any, instance_id: int) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for _ in range(_POLLS):
        body = await get(instance_id)
        if body["status"] in ("completed", "failed", "canceled"):
            return body
        await asyncio.sleep(0.01)
    return body


def _check_completed(body: dict[str, Any], instance_id: int) -> None:
    assert body["id"] == instance_id
    assert body["business_id"] == "o-1"
    assert body["status"] == "completed"
    assert body["context"] == {"sku": "book", "amount": 42}
    assert body["nodes"] == {
        af.ROOT_NODE: "completed",
        "reserve": "completed",
        "charge": "completed",
        "ship": "completed",
        af.END_NODE: "completed",
    }


def _no_driver_tasks() -> bool:
    return not [t for t in asyncio.all_tasks() if t.get_name().startswith("asyncflow-driver")]


async def test_fastapi_app_completes_an_order_with_the_driver_in_its_lifespan(tmp_path: Any) -> None:
    app = fastapi_app.create_app(f"sqlite+aiosqlite:///{tmp_path}/orders.db")
    driver: WorkflowDriver = app.state.driver
    async with app.router.lifespan_context(app):  # ASGITransport does not run lifespans itself
        assert driver.running
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            created = await client.post("/orders", json=ORDER)
            assert created.status_code == 201
            instance_id = created.json()["id"]
            assert created.json()["status"] == "init"

            async def get(i: int) -> dict[str, Any]:
                response = await client.get(f"/orders/{i}")
                assert response.status_code == 200
                return dict(response.json())

            _check_completed(await _until_completed(get, instance_id), instance_id)
            missing = await client.get(f"/orders/{instance_id + 1000}")
            assert missing.status_code == 404
            invalid = await client.post("/orders", json={"order_id": "x"})
            assert invalid.status_code == 422
    assert not driver.running
    assert driver.stats.completed == 1
    assert _no_driver_tasks()


async def test_aiohttp_app_completes_an_order_with_the_driver_in_cleanup_ctx(tmp_path: Any) -> None:
    app = aiohttp_app.create_app(f"sqlite+aiosqlite:///{tmp_path}/orders.db")
    async with TestClient(TestServer(app)) as client:
        created = await client.post("/orders", json=ORDER)
        assert created.status == 201
        instance_id = (await created.json())["id"]

        async def get(i: int) -> dict[str, Any]:
            response = await client.get(f"/orders/{i}")
            assert response.status == 200
            return dict(await response.json())

        _check_completed(await _until_completed(get, instance_id), instance_id)
        assert (await client.get(f"/orders/{instance_id + 1000}")).status == 404
        assert (await client.post("/orders", json={"order_id": "x"})).status == 400
    assert _no_driver_tasks()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve_and_order(command: list[str], port: int, tmp_path: pathlib.Path) -> dict[str, Any]:
    """Start the example app as the docs say, create an order over HTTP, wait for it to complete."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), ASYNCFLOW_EXAMPLE_DB=f"sqlite+aiosqlite:///{tmp_path}/o.db")
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(300):  # up to ~30 s to start
                try:
                    created = httpx.post(f"{base}/orders", json=ORDER, timeout=2)
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                    time.sleep(0.1)
            else:
                raise AssertionError("the app did not start")
            assert created.status_code == 201, created.text
            instance_id = created.json()["id"]
            body: dict[str, Any] = {}
            for _ in range(300):
                body = httpx.get(f"{base}/orders/{instance_id}", timeout=2).json()
                if body["status"] == "completed":
                    break
                time.sleep(0.05)
            return body
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_the_fastapi_extra_brings_an_asgi_server_and_the_documented_command_serves() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(r.startswith("uvicorn") for r in project["optional-dependencies"]["fastapi"])


def test_the_fastapi_example_runs_under_uvicorn(tmp_path: pathlib.Path) -> None:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "examples.fastapi_app:create_app",
        "--port",
        str(port),
    ]
    assert _serve_and_order(command, port, tmp_path)["status"] == "completed"


def test_the_aiohttp_example_takes_host_and_port(tmp_path: pathlib.Path) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "examples.aiohttp_app", "--host", "127.0.0.1", "--port", str(port)]
    assert _serve_and_order(command, port, tmp_path)["status"] == "completed"
