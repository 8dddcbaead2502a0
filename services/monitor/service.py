"""Wiring and lifecycle of the monitor service."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from torchrelay.services.monitor.handlers import EventMetrics, Monitor
from torchrelay.services.monitor.settings import MonitorSettings
from torchrelay.shared.bus import Subscription
from torchrelay.shared.events import EVENT_TYPES
from torchrelay.shared.runtime import Platform, Service, service_main
from torchrelay.shared.runtime.metrics import reconciled_counter

NAME = "monitor"
EXHAUSTED_CONSUMER = "monitor-max-deliveries"


@asynccontextmanager
async def build(platform: Platform[MonitorSettings]) -> AsyncIterator[Service]:
    monitor = Monitor(
        metrics=EventMetrics(platform.registry),
        state=platform.state,
        publish=platform.bus.publish,
        options=platform.settings.monitor,
        source=platform.source,
        instance=platform.settings.instance,
        reconciled=reconciled_counter(platform.registry),
        retain_s=platform.settings.retention_s,
    )
    yield Service(
        NAME,
        subscriptions=[
            # A restart not due yet goes back to the bus with a delay (nak): no handler waits.
            Subscription("monitor-events", list(EVENT_TYPES.values()), monitor.on_event),
        ],
        background=[
            monitor.reconcile,
            # An event whose handler died on its last allowed delivery gets its dead letter
            # here: one consumer of JetStream's max-deliveries advisories, shared by replicas.
            functools.partial(platform.bus.consume_exhausted, durable=EXHAUSTED_CONSUMER),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(NAME, MonitorSettings, build, argv)
