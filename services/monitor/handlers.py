"""Glue: decoded events -> metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from torchrelay.services.monitor.domain import source_label, type_label
from torchrelay.shared.events import EVENT_TYPES, AnyEvent, DeadLettered


class EventMetrics:
    """Counts every event on the bus by type and producing service, and dead letters."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._known = frozenset(EVENT_TYPES)
        self._events = Counter(
            "torchrelay_events_total",
            "Events seen on the bus, by type and producing service.",
            ["type", "source"],
            registry=registry,
        )
        self._dead = Counter(
            "torchrelay_dead_letters_total",
            "Events given up on, by the consumer that gave up and the original type.",
            ["consumer", "original_type"],
            registry=registry,
        )

    async def on_event(self, event: AnyEvent) -> None:
        self._events.labels(event.type, source_label(event.source)).inc()
        if isinstance(event, DeadLettered):
            self._dead.labels(
                event.data.consumer, type_label(event.data.original_type, self._known)
            ).inc()
