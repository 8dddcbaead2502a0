"""Watching what services publish: a durable consumer that records events for assertions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import nats

from tests.integration.conftest import FAST_STREAM
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.events import AnyEvent
from torchrelay.shared.testing import assert_eventually


class Watcher:
    def __init__(self) -> None:
        self.events: list[AnyEvent] = []

    async def record(self, event: AnyEvent) -> None:
        self.events.append(event)

    def of(self, kind: type[AnyEvent], **match: Any) -> list[AnyEvent]:
        """Recorded events of ``kind`` whose data fields equal ``match``."""
        return [
            e
            for e in self.events
            if isinstance(e, kind) and all(getattr(e.data, k) == v for k, v in match.items())
        ]

    async def one(self, kind: type[AnyEvent], *, timeout_s: float = 20, **match: Any) -> Any:
        """The one recorded event of ``kind`` matching ``match``, once it has arrived."""

        async def arrived() -> bool:
            return bool(self.of(kind, **match))

        await assert_eventually(arrived, timeout_s=timeout_s, message=f"no {kind.__name__}")
        (event,) = self.of(kind, **match)
        return event


@contextlib.asynccontextmanager
async def watching(
    nats_url: str, name: str, kinds: Sequence[type[AnyEvent]]
) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    bus = JetStreamBus(await nats.connect(nats_url), FAST_STREAM)
    watcher = Watcher()
    subscription = Subscription(name, kinds, watcher.record)
    await bus.provision([subscription])
    stop = asyncio.Event()
    task = asyncio.create_task(bus.consume(subscription, stop))
    try:
        yield bus, watcher
    finally:
        stop.set()
        await task
        await bus.aclose()
