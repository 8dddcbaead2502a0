"""Replica presence and exclusive sections, over a real JetStream KV bucket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient

from torchrelay.shared.errors import ConfigError, LeaseLost
from torchrelay.shared.state import LEASE_BUCKET, KvState, State
from torchrelay.shared.state.port import Lease, Leases
from torchrelay.shared.state.presence import Presence, exclusive, presence_key
from torchrelay.shared.testing import assert_eventually


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[NatsClient]:
    client: NatsClient = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
async def state(client: NatsClient) -> State:
    return await KvState.open(client.jetstream())


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


async def test_a_lease_lost_mid_section_interrupts_the_body(
    state: State, client: NatsClient
) -> None:
    reached: list[str] = []
    started = asyncio.Event()

    async def section() -> None:
        async with exclusive(state.leases, "serve.model.lost", "replica-a", ttl_s=1.5):
            reached.append("inside")
            started.set()
            await asyncio.sleep(30)
            reached.append("end")  # must never run: someone else may hold the lease now

    task = asyncio.create_task(section())
    await started.wait()
    # An operator (or a partition and another holder) takes the lease from under it.
    await (await client.jetstream().key_value(LEASE_BUCKET)).delete("serve.model.lost")
    with pytest.raises(LeaseLost, match=r"serve\.model\.lost held by replica-a"):
        await asyncio.wait_for(task, 5)
    assert reached == ["inside"]


async def test_a_lease_that_expired_unrenewed_interrupts_the_body(state: State) -> None:
    class Stalled:
        """Leases whose renewals hang, as over a link that stopped answering."""

        def __init__(self, leases: Leases) -> None:
            self.acquire, self.holder, self.release = leases.acquire, leases.holder, leases.release

        async def renew(self, lease: Lease) -> Lease:
            await asyncio.sleep(0.4)
            raise TimeoutError("no answer")

    with pytest.raises(LeaseLost, match=r"could not renew lease serve\.model\.stalled"):
        async with exclusive(Stalled(state.leases), "serve.model.stalled", "a", ttl_s=1.2):
            await asyncio.sleep(30)
    assert await state.leases.acquire("serve.model.stalled", "b", ttl_s=5), "expired meanwhile"


async def test_a_body_cancelled_from_outside_is_cancelled_not_lost(state: State) -> None:
    started = asyncio.Event()

    async def section() -> None:
        async with exclusive(state.leases, "serve.model.cancel", "replica-a", ttl_s=3):
            started.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(section())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await state.leases.holder("serve.model.cancel") is None, "released on the way out"
