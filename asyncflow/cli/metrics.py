"""``asyncflow worker --metrics-port [HOST:]PORT``: serve Prometheus metrics while the worker runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .backend import CLIError

if TYPE_CHECKING:
    from ..driver import WorkflowDriver

__all__ = ["metrics_address", "serve_metrics"]

logger = logging.getLogger("asyncflow.cli.worker")


def metrics_address(text: str) -> tuple[str, int]:
    """``PORT`` (every interface, as Prometheus exporters do) or ``HOST:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = "0.0.0.0"  # the exporter convention; give HOST:PORT to narrow it
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PORT or HOST:PORT, got {text!r}") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"expected a port between 1 and 65535, got {text!r}")
    return host.strip("[]") or "0.0.0.0", number


@contextlib.asynccontextmanager
async def serve_metrics(driver: WorkflowDriver, address: tuple[str, int] | None) -> AsyncIterator[None]:
    """With an address: count the service's work, expose the driver's gauges, serve them over HTTP."""
    if address is None:
        yield
        return
    try:
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

        from ..integrations.prometheus import DriverMetrics, PrometheusObserver
    except ImportError as error:
        raise CLIError(f"--metrics-port: {error}", 2) from error
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    driver.service.add_observer(PrometheusObserver(registry))
    metrics = DriverMetrics(driver, registry, interval=2.0)
    host, port = address
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as error:
        raise CLIError(f"--metrics-port: cannot listen on {host}:{port}: {error}", 1) from error
    logger.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)
    try:
        async with metrics:
            yield
    finally:
        await asyncio.to_thread(server.shutdown)  # waits for the serving loop's next poll (<= 0.5 s)
        server.server_close()
        thread.join(timeout=5)
