"""Wiring and lifecycle of the monitor service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from torchrelay.services.monitor.handlers import EventMetrics
from torchrelay.services.monitor.settings import MonitorSettings
from torchrelay.shared.bus import Subscription
from torchrelay.shared.events import EVENT_TYPES
from torchrelay.shared.runtime import Platform, Service, service_main

NAME = "monitor"


@asynccontextmanager
async def build(platform: Platform[MonitorSettings]) -> AsyncIterator[Service]:
    metrics = EventMetrics(platform.registry)
    yield Service(
        NAME,
        subscriptions=[
            Subscription("monitor-events", list(EVENT_TYPES.values()), metrics.on_event),
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(NAME, MonitorSettings, build, argv)
