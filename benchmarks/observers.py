"""The service observers a benchmark row runs with (``--observer``), to measure what observing costs.

* ``none``: no observer (the service skips every hook);
* ``noop``: one observer whose four hooks do nothing (the cost of the hook calls themselves);
* ``prometheus``: :class:`~asyncflow.integrations.prometheus.PrometheusObserver` on a private registry;
* ``otel``: :class:`~asyncflow.integrations.opentelemetry.OpenTelemetryObserver` on an SDK
  ``TracerProvider`` whose ``BatchSpanProcessor`` hands every span to an exporter that drops it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

__all__ = ["OBSERVERS", "make_observers", "observers_unavailable"]

OBSERVERS = ("none", "noop", "prometheus", "otel")
_NEEDS = {"prometheus": ("prometheus_client",), "otel": ("opentelemetry.sdk",)}


class NoopObserver:
    """Every hook, doing nothing."""

    def instance_created(self, instance: Any) -> None:
        pass

    def node_started(self, node: Any) -> None:
        pass

    def node_finished(self, node: Any, outcome: str, error: BaseException | None, duration: float) -> None:
        pass

    def instance_finished(self, instance: Any) -> None:
        pass


def observers_unavailable(name: str) -> str | None:
    """``None`` if observer ``name`` can run here, else why not."""
    for module in _NEEDS.get(name, ()):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{module} is not installed: pip install 'asyncflow[bench]'"
    return None


def make_observers(name: str) -> Sequence[Any]:
    """The observers of a run (a fresh set per run: each run is a process of its own)."""
    if name == "none":
        return ()
    if name == "noop":
        return (NoopObserver(),)
    if name == "prometheus":
        from prometheus_client import CollectorRegistry

        from asyncflow.integrations.prometheus import PrometheusObserver

        return (PrometheusObserver(CollectorRegistry()),)
    if name == "otel":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        from asyncflow.integrations.opentelemetry import OpenTelemetryObserver

        class DropExporter(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(DropExporter()))
        return (OpenTelemetryObserver(tracer_provider=provider),)
    raise ValueError(f"unknown observer {name!r} (choose from {', '.join(OBSERVERS)})")
