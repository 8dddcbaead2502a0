"""Prometheus metrics of the runtime and the bus. One registry per service instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from torchrelay.shared.bus.port import Handled

HANDLER_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)


class RuntimeMetrics:
    """Bus and lifecycle metrics; also the bus observer. Labels are bounded sets (subjects,
    consumer names, outcomes), never ids."""

    def __init__(self, registry: CollectorRegistry, service: str, version: str) -> None:
        Info(
            "torchrelay_service", "The service and version of this process.", registry=registry
        ).info({"service": service, "version": version})
        self.ready = Gauge(
            "torchrelay_service_ready", "1 when the service is ready to work.", registry=registry
        )
        self._published = Counter(
            "torchrelay_bus_published_events_total",
            "Events this process published, by subject; duplicates were stored once.",
            ["subject", "duplicate"],
            registry=registry,
        )
        self._handled = Counter(
            "torchrelay_bus_handled_events_total",
            "Deliveries this process handled, by consumer and outcome (ack, retry, deadletter).",
            ["consumer", "outcome"],
            registry=registry,
        )
        self._duration = Histogram(
            "torchrelay_bus_handler_duration_seconds",
            "Time from delivery to ack/nak/term, by consumer.",
            ["consumer"],
            buckets=HANDLER_BUCKETS_S,
            registry=registry,
        )

    def published(self, subject: str, *, duplicate: bool) -> None:
        self._published.labels(subject, "true" if duplicate else "false").inc()

    def handled(self, result: Handled) -> None:
        self._handled.labels(result.subscription, result.outcome.label).inc()
        self._duration.labels(result.subscription).observe(result.duration_s)
