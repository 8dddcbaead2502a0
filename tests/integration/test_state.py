"""Typed KV state: compare-and-set, concurrent updates, leases that expire."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from pydantic import BaseModel, ConfigDict

from torchrelay.shared.errors import AlreadyExists, LeaseLost, StaleRevision
from torchrelay.shared.state import BUCKETS, CorruptState, State
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(60)


class Run(BaseModel):
    model_config = ConfigDict(frozen=True)
    status: str
    restarts: int = 0


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
async def state(nc: NatsClient) -> State:
    return await State.open(nc.jetstream())


async def test_buckets_are_created_once_and_reopened(nc: NatsClient) -> None:
    first = await State.open(nc.jetstream())
    await first.store("runs", Run).put("r1", Run(status="running"))
    second = await State.open(nc.jetstream())
    stored = await second.store("runs", Run).get("r1")
    assert stored is not None
    assert stored.value.status == "running"
    names = {info.config.name for info in await nc.jetstream().streams_info()}
    assert {f"KV_{b}" for b in BUCKETS} <= names


async def test_compare_and_set_refuses_a_stale_write(state: State) -> None:
    runs = state.store("runs", Run)
    revision = await runs.create("r1", Run(status="pending"))
    await runs.update("r1", Run(status="running"), revision=revision)
    with pytest.raises(StaleRevision, match="expected revision"):
        await runs.update("r1", Run(status="failed"), revision=revision)
    current = await runs.get("r1")
    assert current is not None
    assert current.value.status == "running", "the stale write changed nothing"


async def test_create_refuses_an_existing_key(state: State) -> None:
    runs = state.store("runs", Run)
    await runs.create("r1", Run(status="pending"))
    with pytest.raises(AlreadyExists):
        await runs.create("r1", Run(status="pending"))


async def test_concurrent_mutations_all_land(state: State) -> None:
    runs = state.store("runs", Run)
    await runs.create("r1", Run(status="running"))

    def bump(run: Run | None) -> Run:
        assert run is not None
        return run.model_copy(update={"restarts": run.restarts + 1})

    await asyncio.gather(*(runs.mutate("r1", bump, attempts=50) for _ in range(10)))
    final = await runs.get("r1")
    assert final is not None
    assert final.value.restarts == 10


async def test_a_corrupt_value_is_reported_not_guessed(state: State, nc: NatsClient) -> None:
    kv = await nc.jetstream().key_value("runs")
    await kv.put("broken", b'{"status": 3')
    with pytest.raises(CorruptState, match="runs/broken"):
        await state.store("runs", Run).get("broken")


async def test_a_lease_has_one_holder_until_it_expires(state: State) -> None:
    lease = await state.leases.acquire("restart-r1", "monitor-a", ttl_s=1.0)
    assert lease is not None
    assert await state.leases.acquire("restart-r1", "monitor-b", ttl_s=1.0) is None

    async def b_takes_over() -> bool:
        return await state.leases.acquire("restart-r1", "monitor-b", ttl_s=5.0) is not None

    await assert_eventually(b_takes_over, timeout_s=5, interval_s=0.1)
    with pytest.raises(LeaseLost):
        await state.leases.renew(lease)


async def test_a_renewed_lease_outlives_its_ttl_and_release_frees_it(state: State) -> None:
    lease = await state.leases.acquire("restart-r2", "monitor-a", ttl_s=1.0)
    assert lease is not None
    for _ in range(4):
        await asyncio.sleep(0.4)
        lease = await state.leases.renew(lease)
    assert await state.leases.acquire("restart-r2", "monitor-b", ttl_s=1.0) is None
    await state.leases.release(lease)
    assert await state.leases.acquire("restart-r2", "monitor-b", ttl_s=1.0) is not None


async def test_keys_under_a_prefix_are_filtered_by_the_server(state: State) -> None:
    runs = state.store("runs", Run)
    assert await runs.keys("active") == []
    await runs.put("active.r1", Run(status="running"))
    await runs.put("active.r2", Run(status="running"))
    await runs.put("done.r0", Run(status="completed"))
    await runs.put("activeish", Run(status="other"))
    assert await runs.keys("active") == ["active.r1", "active.r2"]
    assert [item.key for item in await runs.items("done")] == ["done.r0"]
    assert len(await runs.keys()) == 4
