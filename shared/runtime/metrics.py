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
        self._handled_children: dict[tuple[str, str], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}

    def published(self, subject: str, *, duplicate: bool) -> None:
        self._published.labels(subject, "true" if duplicate else "false").inc()

    def handled(self, result: Handled) -> None:
        # Children are cached: labels() costs more than the increment on the hot path.
        key = (result.subscription, result.outcome.label)
        counter = self._handled_children.get(key)
        if counter is None:
            counter = self._handled_children[key] = self._handled.labels(*key)
        counter.inc()
        histogram = self._duration_children.get(result.subscription)
        if histogram is None:
            histogram = self._duration.labels(result.subscription)
            self._duration_children[result.subscription] = histogram
        histogram.observe(result.duration_s)


def reconciled_counter(registry: CollectorRegistry) -> Counter:
    """``torchrelay_reconciled_total{kind}``: work a service's reconciliation found in a state
    no event would move, and moved on through the normal events. Anything above zero is stuck
    work that was rescued: worth a look at what left it there."""
    return Counter(
        "torchrelay_reconciled_total",
        "Runs and pipelines found in a state no event would move, and moved on, by kind.",
        ["kind"],
        registry=registry,
    )
