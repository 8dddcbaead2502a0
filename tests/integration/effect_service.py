"""A small real service for lifecycle tests: each event has one idempotent effect.

The handler counts its attempts, records the effect with a KV create keyed by the event id
(so a redelivery cannot do it twice), then holds for ``EFFECT_HOLD_S`` seconds, long enough
for a test to kill the process mid-event. ``EFFECT_MAX_DELIVER`` (10) bounds the deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import BaseModel

from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.errors import AlreadyExists
from torchrelay.shared.events import AnyEvent, DatasetStaged
from torchrelay.shared.runtime import Platform, Service, ServiceSettings, service_main
from torchrelay.shared.state import KvStore, open_bucket

EFFECTS_BUCKET = "test-effects"
ATTEMPTS_BUCKET = "test-attempts"


class Effect(BaseModel):
    instance: str


class Attempts(BaseModel):
    count: int


@asynccontextmanager
async def build(platform: Platform[ServiceSettings]) -> AsyncIterator[Service]:
    js = platform.bus.nc.jetstream()
    effects = KvStore(await open_bucket(js, EFFECTS_BUCKET), Effect, EFFECTS_BUCKET)
    counts = KvStore(await open_bucket(js, ATTEMPTS_BUCKET), Attempts, ATTEMPTS_BUCKET)
    hold_s = float(os.environ.get("EFFECT_HOLD_S", "0"))

    async def handle(event: AnyEvent) -> None:
        await counts.mutate(
            event.id, lambda a: Attempts(count=(a.count if a else 0) + 1), attempts=100
        )
        # AlreadyExists: an earlier delivery did it, and the effect happens once.
        with contextlib.suppress(AlreadyExists):
            await effects.create(event.id, Effect(instance=platform.settings.instance))
        await asyncio.sleep(hold_s)

    yield Service(
        "effects",
        subscriptions=[
            Subscription(
                "effects",
                [DatasetStaged],
                handle,
                ack_wait_s=float(os.environ.get("EFFECT_ACK_WAIT_S", "2")),
                max_in_flight=int(os.environ.get("EFFECT_MAX_IN_FLIGHT", "16")),
                max_deliver=int(os.environ.get("EFFECT_MAX_DELIVER", "10")),
            )
        ],
    )


async def attempts(bus: JetStreamBus, event_id: str) -> int:
    """How many times the effect service's handler started on this event (read by tests)."""
    store = KvStore(
        await open_bucket(bus.nc.jetstream(), ATTEMPTS_BUCKET), Attempts, ATTEMPTS_BUCKET
    )
    found = await store.get(event_id)
    return found.value.count if found is not None else 0


if __name__ == "__main__":
    raise SystemExit(service_main("effects", ServiceSettings, build))
