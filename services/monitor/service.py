"""Wiring and lifecycle of the monitor service."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from torchrelay.services.monitor.handlers import EventMetrics, Monitor
from torchrelay.services.monitor.pruner import Pruner
from torchrelay.services.monitor.settings import MonitorSettings
from torchrelay.shared.bus import Subscription
from torchrelay.shared.events import EVENT_TYPES, PruneRequested
from torchrelay.shared.runtime import Platform, Service, service_main
from torchrelay.shared.runtime.metrics import reconciled_counter
from torchrelay.shared.storage import Layout

NAME = "monitor"
EXHAUSTED_CONSUMER = "monitor-max-deliveries"
PRUNE_CONSUMER = "monitor-prune"


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
    pruner = Pruner(
        state=platform.state,
        layout=Layout(platform.settings.storage_root),
        publish=platform.bus.publish,
        source=platform.source,
    )
    yield Service(
        NAME,
        subscriptions=[
            # A restart not due yet goes back to the bus with a delay (nak): no handler waits.
            Subscription("monitor-events", list(EVENT_TYPES.values()), monitor.on_event),
            # Its own consumer: a prune (disk work) never holds up metrics and recovery, and
            # a replica takes one prune at a time.
            Subscription(
                PRUNE_CONSUMER,
                [PruneRequested],
                pruner.on_request,
                max_in_flight=1,
                prefetch=1,
            ),
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
