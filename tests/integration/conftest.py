"""Buses and states for the contract suites: the same tests run against every adapter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from torchrelay.services.ingest.fill import fill_for
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.staging import Stager, StageRequest
from torchrelay.shared.bus.jetstream import JetStreamBus, StreamSettings
from torchrelay.shared.bus.memory import MemoryBus
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.events import AnyEvent, DeadLettered
from torchrelay.shared.state import KvState, MemoryState, State
from torchrelay.shared.testing.fixtures import wipe_jetstream

FAST_STREAM = StreamSettings(fetch_timeout_s=0.2)


@dataclass
class Harness:
    """One bus plus what the contract tests need around it."""

    bus: MemoryBus | JetStreamBus
    kind: str
    dead_letters: list[DeadLettered] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self, *subscriptions: Subscription) -> None:
        async def record(event: AnyEvent) -> None:
            assert isinstance(event, DeadLettered)
            self.dead_letters.append(event)

        all_subs = [*subscriptions, Subscription("test-deadletters", [DeadLettered], record)]
        await self.bus.provision(all_subs)
        for sub in all_subs:
            self._tasks.append(asyncio.create_task(self.bus.consume(sub, self._stop)))

    async def publish_raw(self, subject: str, payload: bytes) -> None:
        if isinstance(self.bus, MemoryBus):
            await self.bus.publish_raw(subject, payload)
        else:
            await self.bus.nc.jetstream().publish(subject, payload)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@pytest.fixture(params=["memory", "jetstream"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        bus: MemoryBus | JetStreamBus = MemoryBus()
    else:
        server: NatsServer = request.getfixturevalue("nats_server")
        await wipe_jetstream(server.url)
        bus = JetStreamBus(await nats.connect(server.url), FAST_STREAM)
        await bus.ensure_stream()
    h = Harness(bus, request.param)
    yield h
    await h.stop()
    if isinstance(bus, JetStreamBus):
        await bus.aclose()
    else:
        bus.close()


@pytest.fixture(scope="module")
def staged_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The digits, staged once per module onto a fresh storage root: (root, version)."""
    root = tmp_path_factory.mktemp("storage")
    result = asyncio.run(
        Stager(root, IngestOptions().limits()).stage(
            StageRequest("r", "digits", "sklearn:digits"),
            fill_for("sklearn:digits", IngestOptions()),
        )
    )
    return root, result.manifest.version


@pytest.fixture(params=["memory", "nats"])
async def any_state(request: pytest.FixtureRequest) -> AsyncIterator[State]:
    """Handlers' state, in memory (no NATS at all) and over JetStream KV: a handler test that
    takes it runs on both, so the in-memory state stands in for NATS only where it behaves
    the same."""
    if request.param == "memory":
        yield MemoryState()
        return
    server: NatsServer = request.getfixturevalue("nats_server")
    nc = await nats.connect(server.url)
    try:
        yield await KvState.open(nc.jetstream())
    finally:
        await nc.close()
