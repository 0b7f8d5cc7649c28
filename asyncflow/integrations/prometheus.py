"""Prometheus metrics: node attempts, their durations, finished instances, and a driver's gauges.

::

    from asyncflow.integrations.prometheus import PrometheusObserver, DriverMetrics
    svc = af.WorkflowService(repo, lock, registry, observers=[PrometheusObserver()])
    driver = af.WorkflowDriver(svc)
    metrics = DriverMetrics(driver)          # gauges read at scrape time
    # in the app's lifespan: async with metrics: ...  (refreshes the due backlog every few seconds)

:class:`PrometheusObserver` counts what this process's passes did:
``asyncflow_node_attempts_total{workflow_type,task_type,outcome}`` (a node a branch skipped counts once
with ``outcome="skipped"``),
``asyncflow_node_duration_seconds{workflow_type,task_type}`` (histogram of the attempts that ran),
``asyncflow_instances_created_total{workflow_type}`` and
``asyncflow_instances_finished_total{workflow_type,status}``.
:class:`DriverMetrics` adds a driver's state: ``asyncflow_driver_passes_in_flight``,
``asyncflow_driver_due_backlog_seconds`` (how long the oldest due instance has waited; 0 when none
waits), ``asyncflow_driver_claim_seconds_total`` with ``asyncflow_driver_claims_total`` (their rate
ratio is the mean claim latency) and the other :class:`~asyncflow.DriverStats` counters.
``asyncflow worker --metrics-port N`` serves both. Needs the ``prometheus`` extra (``prometheus_client``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "asyncflow.integrations.prometheus needs prometheus_client: pip install 'asyncflow[prometheus]'"
    ) from exc

from ..errors import AsyncflowError

if TYPE_CHECKING:
    from ..driver import WorkflowDriver
    from ..records import WorkflowInstance
    from ..worker import NodeInfo

__all__ = ["DURATION_BUCKETS", "DriverMetrics", "PrometheusObserver"]

logger = logging.getLogger("asyncflow.integrations.prometheus")

#: seconds; node attempts range from sub-millisecond bookkeeping to long calls
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class PrometheusObserver:
    """A :class:`~asyncflow.WorkflowObserver` that counts node attempts and instance ends.

    ``registry`` defaults to ``prometheus_client.REGISTRY``; one observer per registry (a second
    registers the same names and ``prometheus_client`` refuses it).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.node_attempts = Counter(
            "asyncflow_node_attempts",
            "Node attempts (run and/or wait check) by outcome",
            ("workflow_type", "task_type", "outcome"),
            registry=registry,
        )
        self.node_duration = Histogram(
            "asyncflow_node_duration_seconds",
            "Duration of node attempts",
            ("workflow_type", "task_type"),
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self.instances_created = Counter(
            "asyncflow_instances_created", "Workflow instances created", ("workflow_type",), registry=registry
        )
        self.instances_finished = Counter(
            "asyncflow_instances_finished",
            "Workflow instances that ended, by final status",
            ("workflow_type", "status"),
            registry=registry,
        )
        self._attempts: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    def instance_created(self, instance: WorkflowInstance) -> None:
        self.instances_created.labels(instance.workflow_type).inc()

    def node_finished(
        self, node: NodeInfo, outcome: str, error: BaseException | None, duration: float
    ) -> None:
        key = (node.workflow_type, node.task_type)
        if outcome != "skipped":  # a skipped node never ran: counted, but no duration to observe
            histogram = self._durations.get(key)
            if histogram is None:
                histogram = self._durations[key] = self.node_duration.labels(*key)
            histogram.observe(duration)
        attempt_key = (*key, outcome)
        counter = self._attempts.get(attempt_key)
        if counter is None:
            counter = self._attempts[attempt_key] = self.node_attempts.labels(*attempt_key)
        counter.inc()

    def instance_finished(self, instance: WorkflowInstance) -> None:
        self.instances_finished.labels(instance.workflow_type, instance.status).inc()


class DriverMetrics(Collector):
    """A collector of ``driver``'s gauges and counters, read when Prometheus scrapes.

    The due backlog needs a database read: :meth:`refresh` does it, and ``async with`` (or
    :meth:`run`) calls it every ``interval`` seconds in the background.
    """

    def __init__(
        self, driver: WorkflowDriver, registry: CollectorRegistry | None = None, *, interval: float = 5.0
    ) -> None:
        self.driver = driver
        self.interval = interval
        self.due_backlog = 0.0  # seconds
        self._task: asyncio.Task[None] | None = None
        (REGISTRY if registry is None else registry).register(self)

    async def refresh(self) -> None:
        """Read how long the oldest due instance of the driver's workflow types has been waiting."""
        service = self.driver.service
        types = self.driver.config.workflow_types
        due = await service.repo.next_due_at(tuple(types) if types else None)
        now_ms = int(service.clock.time() * 1000)
        self.due_backlog = 0.0 if due is None else max(0.0, (now_ms - due) / 1000)

    async def run(self) -> None:
        """Refresh every ``interval`` seconds until cancelled (a failed read is logged and retried)."""
        while True:
            try:
                await self.refresh()
            except AsyncflowError as exc:
                logger.warning("could not read the due backlog: %s", exc)
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> DriverMetrics:
        self._task = asyncio.create_task(self.run(), name="asyncflow-driver-metrics")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait((task,))  # our own cancellation (if any) still propagates

    def collect(self) -> Iterator[Metric]:
        driver = self.driver
        yield GaugeMetricFamily(
            "asyncflow_driver_passes_in_flight", "Passes this driver runs right now", value=driver.in_flight
        )
        yield GaugeMetricFamily(
            "asyncflow_driver_due_backlog_seconds",
            "How long the oldest due instance has waited to be claimed (0: none waits)",
            value=self.due_backlog,
        )
        stats = driver.stats.as_dict()
        yield CounterMetricFamily(
            "asyncflow_driver_claim_seconds",
            "Time spent in claim queries",
            value=stats.pop("claim_seconds", 0.0),
        )
        for name, value in stats.items():
            yield CounterMetricFamily(f"asyncflow_driver_{name}", f"DriverStats.{name}", value=value)
