"""Live views and key watches over NATS when a watch's values reach the client late.

nats-server may answer a request made after a consumer started before that consumer's first
messages reach the client; ``late_deliveries`` makes that the rule. Entering a live view, or
reading a watched key's first update, must still give what was stored, and nothing else first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from pydantic import BaseModel, ConfigDict

from tests.integration.late_deliveries import late_deliveries
from torchrelay.shared.state import KvState
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(60)

# Long beside a request's round trip on one machine: an answer always overtakes the values.
LATE_S = 0.3


class Run(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    status: str


def running(run: Run) -> bool:
    return run.status == "running"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    """A connection that writes, straight to the server."""
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
async def late_nc(nats_url: str) -> AsyncIterator[NatsClient]:
    """A connection that watches, through a proxy that holds what consumers push."""
    async with late_deliveries(nats_url, delay_s=LATE_S) as url:
        client = await nats.connect(url)
        yield client
        await client.close()


async def consumers(nc: NatsClient, bucket: str) -> int:
    info = await nc.jetstream().stream_info(f"KV_{bucket}")
    return info.state.consumer_count


async def test_entering_a_live_view_gives_every_stored_value_though_they_come_late(
    nc: NatsClient, late_nc: NatsClient
) -> None:
    runs = (await KvState.open(nc.jetstream())).store("runs", Run)
    for i in range(40):
        await runs.put(f"r{i:02d}", Run(status="running" if i % 2 else "succeeded"))
    await runs.put("r01", Run(status="succeeded"))  # its last value is what counts
    await runs.delete("r03")
    watched = (await KvState.open(late_nc.jetstream())).store("runs", Run)
    async with watched.live(running) as view:
        assert [item.key for item in view.items()] == [f"r{i:02d}" for i in range(5, 40, 2)]
        revision = await runs.put("r40", Run(status="running"))
        await runs.put("r05", Run(status="failed"))

        async def followed() -> bool:
            item = view.get("r40")
            return item is not None and item.revision == revision and "r05" not in view

        await assert_eventually(followed, timeout_s=10, message=lambda: str(view.items()))
    assert await consumers(nc, "runs") == 0, "leaving the view removed its watch"


async def test_entering_a_live_view_of_an_empty_bucket_then_follows_its_first_write(
    nc: NatsClient, late_nc: NatsClient
) -> None:
    runs = (await KvState.open(nc.jetstream())).store("runs", Run)
    watched = (await KvState.open(late_nc.jetstream())).store("runs", Run)
    async with watched.live(running) as view:
        assert view.items() == []
        await runs.put("r1", Run(status="running"))

        async def followed() -> bool:
            return [item.key for item in view.items()] == ["r1"]

        await assert_eventually(followed, timeout_s=10, message=lambda: str(view.items()))


async def test_a_watched_key_gives_its_stored_value_first_though_it_comes_late(
    nc: NatsClient, late_nc: NatsClient
) -> None:
    runs = (await KvState.open(nc.jetstream())).store("runs", Run)
    await runs.put("r1", Run(status="pending"))
    revision = await runs.put("r1", Run(status="running"))
    watched = (await KvState.open(late_nc.jetstream())).store("runs", Run)
    async with watched.watch_key("r1") as updates:
        first = await anext(updates)
        assert first is not None, "the stored value, not 'absent'"
        assert (first.value, first.revision) == (Run(status="running"), revision)
        await runs.delete("r1")
        assert await anext(updates) is None, "then each change: here, gone"
    assert await consumers(nc, "runs") == 0, "leaving the watch removed it"


async def test_a_watch_that_loses_stored_values_on_the_way_fails_rather_than_guess(
    nats_url: str, nc: NatsClient
) -> None:
    runs = (await KvState.open(nc.jetstream())).store("runs", Run)
    for key in ("r1", "r2", "r3"):
        await runs.put(key, Run(status="running"))
    async with late_deliveries(nats_url, delay_s=LATE_S, lose=1) as url:
        lossy = await nats.connect(url)
        try:
            watched = (await KvState.open(lossy.jetstream())).store("runs", Run)
            view = watched.live(running)
            with pytest.raises(ConnectionError, match="restarted before the stored values came"):
                await view.start()
            assert len(view) == 0, "no partial view"
        finally:
            await lossy.close()
    assert await consumers(nc, "runs") == 0, "neither the consumer nor its replacement is left"


async def test_a_live_view_on_a_closed_connection_fails_at_start(nc: NatsClient) -> None:
    runs = (await KvState.open(nc.jetstream())).store("runs", Run)
    await runs.put("r1", Run(status="running"))
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        async with runs.live(running):
            pytest.fail("entered a view with no connection")
