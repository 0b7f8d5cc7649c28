"""OpenTelemetry traces: one span per node attempt, in the trace of the request that created the instance.

::

    from asyncflow.integrations.opentelemetry import OpenTelemetryObserver
    svc = af.WorkflowService(repo, lock, registry, observers=[OpenTelemetryObserver()])

``create_workflow`` stores the W3C ``traceparent`` of the span current at that moment with the
instance; every later attempt of its nodes, run by any process, gets a span whose parent is that span,
so a whole workflow shows up under the request that started it. (An attempt run inside another traced
operation, e.g. ``run_workflow`` in a later request, links to that operation's span.) Instances
created with no span current start a new trace per node attempt.

The node span is current while the worker runs, so spans the worker makes (HTTP clients, database
drivers) are its children. Attributes: ``asyncflow.workflow_type``, ``asyncflow.instance_id``,
``asyncflow.business_id``, ``asyncflow.task_type``, ``asyncflow.fail_count`` and
``asyncflow.outcome``; status ``ERROR`` on ``failed`` and ``retry``; the worker's exception is recorded
as a span event on every failed outcome. A node a branch skipped (it never runs) gets one zero-length
span with ``asyncflow.outcome`` ``skipped`` and status unset. Needs the ``otel`` extra
(``opentelemetry-api``; install the SDK and an exporter in the application).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "asyncflow.integrations.opentelemetry needs opentelemetry-api: pip install 'asyncflow[otel]'"
    ) from exc

if TYPE_CHECKING:
    from ..worker import NodeInfo

__all__ = ["OpenTelemetryObserver"]

_ERROR_OUTCOMES = ("failed", "retry")
_QUIET_OUTCOMES = ("completed", "pending", "not_ready", "skipped")  # their error is routine: no event
_PROPAGATOR = TraceContextTextMapPropagator()


class OpenTelemetryObserver:
    """A :class:`~asyncflow.WorkflowObserver` that traces node attempts (see the module docstring).

    ``tracer_provider`` defaults to the global one (``opentelemetry.trace.set_tracer_provider``).
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        from .. import __version__

        self._tracer = trace.get_tracer("asyncflow", __version__, tracer_provider=tracer_provider)
        self._open: dict[int, tuple[NodeInfo, trace.Span, object]] = {}

    def trace_context(self) -> str | None:
        """The ``traceparent`` of the current span, stored with a new instance (``None``: no span)."""
        if not trace.get_current_span().get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get("traceparent")

    def node_started(self, node: NodeInfo) -> None:
        current = trace.get_current_span().get_span_context()
        parent = None
        links = []
        if node.trace_context:
            parent = _PROPAGATOR.extract({"traceparent": node.trace_context})
            stored = trace.get_current_span(parent).get_span_context()
            if current.is_valid and current.trace_id != stored.trace_id:
                links.append(trace.Link(current))
        span = self._tracer.start_span(
            f"asyncflow {node.workflow_type}/{node.task_type}",
            context=parent,
            kind=trace.SpanKind.INTERNAL,
            links=links,
            attributes={
                "asyncflow.workflow_type": node.workflow_type,
                "asyncflow.instance_id": node.instance_id,
                "asyncflow.business_id": node.business_id,
                "asyncflow.task_type": node.task_type,
                "asyncflow.fail_count": node.fail_count,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        self._open[id(node)] = (node, span, token)

    def node_finished(
        self, node: NodeInfo, outcome: str, error: BaseException | None, duration: float
    ) -> None:
        entry = self._open.pop(id(node), None)
        if entry is None:
            return
        _, span, token = entry
        try:
            span.set_attribute("asyncflow.outcome", outcome)
            if error is not None and outcome not in _QUIET_OUTCOMES:
                span.record_exception(error)
            if outcome in _ERROR_OUTCOMES:
                description = f"{type(error).__name__}: {error}" if error is not None else outcome
                span.set_status(trace.Status(trace.StatusCode.ERROR, description))
        finally:
            span.end()
            otel_context.detach(token)  # type: ignore[arg-type]
