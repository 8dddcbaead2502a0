"""JetStream specifics: provisioning, work-queue replicas, in-progress heartbeats."""

from __future__ import annotations

import asyncio
import collections

import nats
import pytest
from nats.js.api import ConsumerConfig

from tests.factories import staged
from tests.integration.conftest import FAST_STREAM
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.events import AnyEvent, DatasetStaged
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(120)


async def open_bus(url: str) -> JetStreamBus:
    return JetStreamBus(await nats.connect(url), FAST_STREAM)


async def consumer_config(bus: JetStreamBus, name: str) -> ConsumerConfig:
    info = await bus.nc.jetstream().consumer_info(bus.settings.name, name)
    return info.config


async def test_provisioning_is_idempotent_and_applies_changes(nats_url: str) -> None:
    bus = await open_bus(nats_url)
    try:

        async def handle(_: AnyEvent) -> None:
            return None

        sub = Subscription("provisioned", [DatasetStaged], handle, ack_wait_s=10)
        await bus.provision([sub])
        await bus.provision([sub])
        assert (await consumer_config(bus, "provisioned")).ack_wait == 10
        await bus.provision([Subscription("provisioned", [DatasetStaged], handle, ack_wait_s=20)])
        assert (await consumer_config(bus, "provisioned")).ack_wait == 20
        stream = await bus.nc.jetstream().stream_info(bus.settings.name)
        assert stream.config.subjects == ["torchrelay.>"]
        assert stream.config.duplicate_window == FAST_STREAM.duplicate_window_s
        assert str(stream.config.storage).endswith("file")
        assert await bus.stream_ready()
        # Beside it, the max-deliveries advisories about its consumers, kept for the monitor.
        advisories = await bus.nc.jetstream().stream_info("TORCHRELAY_ADVISORIES")
        assert advisories.config.subjects == [
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.TORCHRELAY.>"
        ]
        assert advisories.config.max_age == FAST_STREAM.advisories_max_age_s
    finally:
        await bus.aclose()


@pytest.mark.slow
async def test_two_replicas_handle_each_of_1000_events_exactly_once(nats_url: str) -> None:
    replicas = [await open_bus(nats_url) for _ in range(2)]
    handled: collections.Counter[str] = collections.Counter()
    by_replica: collections.Counter[int] = collections.Counter()

    def handler_for(index: int) -> object:
        async def handle(event: AnyEvent) -> None:
            handled[event.id] += 1
            by_replica[index] += 1
            await asyncio.sleep(0.001)  # real work yields; lets the other replica pull too

        return handle

    stop = asyncio.Event()
    subs = [
        Subscription("replicated", [DatasetStaged], handler_for(i), max_in_flight=16)  # type: ignore[arg-type]
        for i in range(2)
    ]
    await replicas[0].provision(subs[:1])
    tasks = [
        asyncio.create_task(bus.consume(sub, stop)) for bus, sub in zip(replicas, subs, strict=True)
    ]
    events = [staged(version=f"v{i}") for i in range(1000)]
    for event in events:
        await replicas[0].publish(event)
    try:
        await assert_eventually(lambda: len(handled) == 1000, timeout_s=60)
        # Give redeliveries, if any were wrongly made, a moment to show up.
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for bus in replicas:
            await bus.aclose()
    assert set(handled) == {e.id for e in events}
    assert set(handled.values()) == {1}, "every event handled exactly once"
    assert by_replica[0] > 0
    assert by_replica[1] > 0, "both replicas took part"


async def test_a_long_handler_is_kept_alive_past_ack_wait(nats_url: str) -> None:
    bus = await open_bus(nats_url)
    deliveries: list[str] = []

    async def slow(event: AnyEvent) -> None:
        deliveries.append(event.id)
        await asyncio.sleep(3.0)  # three times the ack wait

    sub = Subscription("slow", [DatasetStaged], slow, ack_wait_s=1.0, max_deliver=5)
    await bus.provision([sub])
    stop = asyncio.Event()
    task = asyncio.create_task(bus.consume(sub, stop))
    try:
        event = staged()
        await bus.publish(event)
        await assert_eventually(lambda: deliveries == [event.id])
        await asyncio.sleep(4.0)
        assert deliveries == [event.id], "in_progress heartbeats prevented a redelivery"
        info = await bus.nc.jetstream().consumer_info(bus.settings.name, "slow")
        assert info.num_ack_pending == 0
        assert info.num_redelivered == 0
    finally:
        stop.set()
        await task
        await bus.aclose()
