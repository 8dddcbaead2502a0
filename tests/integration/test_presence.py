"""Replica presence and exclusive sections, over a real JetStream KV bucket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient

from torchrelay.shared.errors import ConfigError, LeaseLost
from torchrelay.shared.state import State
from torchrelay.shared.state.presence import Presence, exclusive, presence_key
from torchrelay.shared.testing import assert_eventually


@pytest.fixture
async def state(nats_url: str) -> AsyncIterator[State]:
    client: NatsClient = await nats.connect(nats_url)
    yield await State.open(client.jetstream())
    await client.close()


async def test_a_live_replica_is_seen_and_a_withdrawn_one_is_not(state: State) -> None:
    a = Presence(state.leases, "train", "train-a", ttl_s=2)
    b = Presence(state.leases, "train", "train-b", ttl_s=2)
    await a.announce()
    await b.announce()
    assert await b.alive("train-a")
    assert not await b.alive("train-never-started")
    await a.withdraw()
    assert not await b.alive("train-a")
    await b.withdraw()


async def test_a_replica_that_stops_renewing_is_gone_within_its_ttl(state: State) -> None:
    crashed = Presence(state.leases, "serve", "serve-crashed", ttl_s=1)
    await crashed.announce()  # and never renewed, as if SIGKILLed
    observer = Presence(state.leases, "serve", "serve-observer", ttl_s=1)

    async def gone() -> bool:
        return not await observer.alive("serve-crashed")

    await assert_eventually(gone, timeout_s=5, interval_s=0.1)


async def test_a_kept_presence_outlives_its_ttl_until_stopped(state: State) -> None:
    kept = Presence(state.leases, "monitor", "monitor-kept", ttl_s=1)
    await kept.announce()
    stop = asyncio.Event()
    keeper = asyncio.create_task(kept.keep(stop))
    await asyncio.sleep(2.5)
    assert await Presence(state.leases, "monitor", "x").alive("monitor-kept")
    stop.set()
    await asyncio.wait_for(keeper, 2)
    await kept.withdraw()


async def test_two_replicas_with_one_name_are_refused(state: State) -> None:
    first = Presence(state.leases, "ingest", "ingest-same", ttl_s=5)
    await first.announce()
    with pytest.raises(ConfigError, match="TORCHRELAY_INSTANCE"):
        await Presence(state.leases, "ingest", "ingest-same", ttl_s=5).announce()
    await first.withdraw()


async def test_a_replica_whose_presence_was_taken_stops_keeping_it(state: State) -> None:
    fenced = Presence(state.leases, "train", "train-fenced", ttl_s=1)
    await fenced.announce()
    # Its lease lapses (a long pause, a partition) and the name is taken meanwhile.
    await asyncio.sleep(1.5)
    assert await state.leases.acquire(presence_key("train", "train-fenced"), "other", 10)
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(fenced.keep(asyncio.Event()), 5)


async def test_exclusive_sections_of_one_name_never_overlap(state: State) -> None:
    inside: list[str] = []
    overlaps = []

    async def section(holder: str) -> None:
        async with exclusive(state.leases, "serve.model.digits", holder, ttl_s=3, poll_s=0.05):
            inside.append(holder)
            if len(inside) > 1:
                overlaps.append(list(inside))
            await asyncio.sleep(0.2)
            inside.remove(holder)

    await asyncio.gather(*(section(f"replica-{n}") for n in range(4)))
    assert overlaps == []
    assert await state.leases.holder("serve.model.digits") is None, "released at the end"
