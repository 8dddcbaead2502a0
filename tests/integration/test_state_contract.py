"""The state port's contract: the same tests against the in-memory adapter and real NATS KV."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from pydantic import BaseModel, ConfigDict
from structlog.testing import capture_logs

from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.errors import AlreadyExists, LeaseLost, StaleRevision
from torchrelay.shared.state import (
    LEASE_BUCKET,
    CorruptState,
    InvalidKey,
    KvState,
    MemoryState,
    State,
)
from torchrelay.shared.testing import assert_eventually
from torchrelay.shared.testing.fixtures import wipe_jetstream

pytestmark = pytest.mark.timeout(60)
STORE_NOT_CREATED = 10049


class Run(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    status: str
    restarts: int = 0


class Note(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    text: str


@dataclass
class Harness:
    """One state adapter plus what the contract needs to reach under the port."""

    state: State
    kind: Literal["memory", "nats"]
    nc: NatsClient | None = None

    async def write_raw(self, bucket: str, key: str, data: bytes) -> None:
        """A foreign writer's bytes."""
        if isinstance(self.state, MemoryState):
            self.state.put_raw(bucket, key, data)
        else:
            assert self.nc is not None
            await self.nc.jetstream().publish(f"$KV.{bucket}.{key}", data)

    async def drop(self, bucket: str, key: str) -> None:
        """Delete ``key`` from under whoever holds it."""
        if isinstance(self.state, MemoryState):
            self.state.drop(bucket, key)
        else:
            assert self.nc is not None
            await (await self.nc.jetstream().key_value(bucket)).delete(key)


@pytest.fixture(params=["memory", "nats"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        yield Harness(MemoryState(), "memory")
        return
    server: NatsServer = request.getfixturevalue("nats_server")
    await wipe_jetstream(server.url)
    nc = await nats.connect(server.url)
    try:
        yield Harness(await _fresh_state(nc.jetstream()), "nats", nc)
    finally:
        await nc.close()


async def _fresh_state(js: JetStreamContext) -> KvState:
    """The buckets, created again right after the wipe deleted them. nats-server may still be
    removing a deleted stream's store then, and refuses its new one for a moment ('error
    creating store for stream', 10049): that is the server catching up, not the adapter."""
    for _ in range(50):
        try:
            # Short expiry markers: a TTL shorter than the marker's is stretched to it.
            return await KvState.open(js, marker_ttl_s=1.0)
        except nats.js.errors.ServerError as exc:
            if exc.err_code != STORE_NOT_CREATED:
                raise
            await asyncio.sleep(0.1)
    return await KvState.open(js, marker_ttl_s=1.0)


@pytest.fixture
def state(harness: Harness) -> State:
    return harness.state


# -- values, revisions, compare-and-set -----------------------------------------------------------


async def test_a_value_reads_back_with_revisions_that_grow_across_the_bucket(state: State) -> None:
    runs = state.store("runs", Run)
    assert await runs.get("r1") is None
    first = await runs.create("r1", Run(status="pending"))
    second = await runs.put("r2", Run(status="running"))
    third = await runs.put("r1", Run(status="running"))
    assert 0 < first < second < third
    stored = await runs.get("r1")
    assert stored is not None
    assert (stored.key, stored.value, stored.revision) == ("r1", Run(status="running"), third)


async def test_create_refuses_an_existing_key_but_not_a_deleted_one(state: State) -> None:
    runs = state.store("runs", Run)
    await runs.create("r1", Run(status="pending"))
    with pytest.raises(AlreadyExists, match="runs/r1"):
        await runs.create("r1", Run(status="other"))
    await runs.delete("r1")
    assert await runs.get("r1") is None
    await runs.create("r1", Run(status="again"))
    again = await runs.get("r1")
    assert again is not None
    assert again.value.status == "again"


async def test_compare_and_set_refuses_a_stale_write_and_a_stale_delete(state: State) -> None:
    runs = state.store("runs", Run)
    revision = await runs.create("r1", Run(status="pending"))
    newer = await runs.update("r1", Run(status="running"), revision=revision)
    with pytest.raises(StaleRevision, match="expected revision"):
        await runs.update("r1", Run(status="failed"), revision=revision)
    with pytest.raises(StaleRevision):
        await runs.delete("r1", revision=revision)
    current = await runs.get("r1")
    assert current is not None
    assert current.value.status == "running", "the stale writes changed nothing"
    await runs.delete("r1", revision=newer)
    assert await runs.get("r1") is None
    with pytest.raises(StaleRevision):
        await runs.update("r1", Run(status="zombie"), revision=newer)


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


async def test_mutate_creates_and_a_change_of_none_writes_nothing(state: State) -> None:
    runs = state.store("runs", Run)
    created = await runs.mutate("r1", lambda run: run or Run(status="new"))
    assert created is not None
    assert created.value.status == "new"
    unchanged = await runs.mutate("r1", lambda _: None)
    assert unchanged == created
    assert await runs.mutate("absent", lambda _: None) is None
    assert await runs.keys() == ["r1"]


async def test_keys_and_items_under_a_prefix(state: State) -> None:
    runs = state.store("runs", Run)
    assert await runs.keys("active") == []
    await runs.put("active.r2", Run(status="running"))
    await runs.put("active.r1", Run(status="running"))
    await runs.put("active.deep.r3", Run(status="running"))
    await runs.put("done.r0", Run(status="completed"))
    await runs.put("activeish", Run(status="other"))
    await runs.put("gone", Run(status="other"))
    await runs.delete("gone")
    assert await runs.keys("active") == ["active.deep.r3", "active.r1", "active.r2"]
    assert [item.key for item in await runs.items("done")] == ["done.r0"]
    assert await runs.keys() == ["active.deep.r3", "active.r1", "active.r2", "activeish", "done.r0"]
    assert [item.value.status for item in await runs.items()] == [
        "running",
        "running",
        "running",
        "other",
        "completed",
    ]


@pytest.mark.parametrize("key", ["", "a b", "a..b", ".a", "a.", "a*", ">", "ä", "a.>"])
async def test_a_key_nats_would_refuse_is_refused_before_any_write(state: State, key: str) -> None:
    runs = state.store("runs", Run)
    with pytest.raises(InvalidKey, match="key_part"):
        await runs.put(key, Run(status="x"))
    with pytest.raises(InvalidKey):
        await runs.get(key)
    with pytest.raises(InvalidKey):
        await runs.delete(key)
    with pytest.raises(InvalidKey):
        await state.leases.acquire(key, "me", ttl_s=5)
    if key:  # the empty prefix means every key
        with pytest.raises(InvalidKey):
            await runs.keys(key)
    assert await runs.keys() == []


async def test_two_models_share_a_bucket_under_their_own_prefixes(state: State) -> None:
    runs, notes = state.store("runs", Run), state.store("runs", Note)
    await runs.put("run.a", Run(status="running"))
    await notes.put("note.a", Note(text="hello"))
    note = await notes.get("note.a")
    assert note is not None
    assert note.value.text == "hello"
    assert [item.key for item in await runs.items("run")] == ["run.a"]
    with pytest.raises(CorruptState, match=r"runs/note\.a does not parse as Run"):
        await runs.get("note.a")


async def test_a_corrupt_value_is_reported_not_guessed(harness: Harness) -> None:
    await harness.write_raw("runs", "broken", b'{"status": 3')
    with pytest.raises(CorruptState, match="runs/broken"):
        await harness.state.store("runs", Run).get("broken")


def test_an_unknown_bucket_is_a_clear_error(state: State) -> None:
    with pytest.raises(KeyError, match="unknown bucket 'nope'"):
        state.store("nope", Run)
    with pytest.raises(KeyError):
        state.store(LEASE_BUCKET, Run)


# -- leases ---------------------------------------------------------------------------------------


async def test_a_lease_has_one_holder_until_it_expires(state: State) -> None:
    lease = await state.leases.acquire("restart-r1", "monitor-a", ttl_s=1.0)
    assert lease is not None
    assert await state.leases.holder("restart-r1") == "monitor-a"
    assert await state.leases.acquire("restart-r1", "monitor-b", ttl_s=1.0) is None

    async def b_takes_over() -> bool:
        return await state.leases.acquire("restart-r1", "monitor-b", ttl_s=5.0) is not None

    await assert_eventually(b_takes_over, timeout_s=5, interval_s=0.1)
    assert await state.leases.holder("restart-r1") == "monitor-b"
    with pytest.raises(LeaseLost, match="restart-r1 held by monitor-a"):
        await state.leases.renew(lease)


async def test_an_unrenewed_lease_is_gone_within_its_ttl(state: State) -> None:
    lease = await state.leases.acquire("restart-r3", "monitor-a", ttl_s=1.0)
    assert lease is not None

    async def gone() -> bool:
        return await state.leases.holder("restart-r3") is None

    await assert_eventually(gone, timeout_s=4, interval_s=0.1)
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
    assert await state.leases.holder("restart-r2") is None
    await state.leases.release(lease)  # twice: already gone is fine
    again = await state.leases.acquire("restart-r2", "monitor-b", ttl_s=1.0)
    assert again is not None
    await state.leases.release(lease)  # a stale release leaves the new holder alone
    assert await state.leases.holder("restart-r2") == "monitor-b"


async def test_a_lease_deleted_from_under_its_holder_is_lost(harness: Harness) -> None:
    leases = harness.state.leases
    lease = await leases.acquire("serve.model.m", "serve-a", ttl_s=10)
    assert lease is not None
    await harness.drop(LEASE_BUCKET, "serve.model.m")
    with pytest.raises(LeaseLost):
        await leases.renew(lease)


# -- retention -----------------------------------------------------------------------------------


async def test_a_value_written_with_a_ttl_is_gone_after_it_with_its_history(state: State) -> None:
    runs = state.store("runs", Run)
    await runs.put("kept", Run(status="running"))
    await runs.create("done.r1", Run(status="running"))  # an earlier revision, kept forever
    await runs.put("done.r1", Run(status="succeeded"), ttl_s=1)
    retained = await runs.get("done.r1")
    assert retained is not None
    assert retained.value.status == "succeeded"

    async def gone() -> bool:
        return (
            await runs.get("done.r1") is None
            and await runs.keys() == ["kept"]
            and [item.key for item in await runs.items()] == ["kept"]
        )

    await assert_eventually(gone, timeout_s=8, interval_s=0.1)
    await runs.create("done.r1", Run(status="again"))  # the name is free again
    assert await runs.keys("done") == ["done.r1"]


async def test_update_and_mutate_set_a_retention_when_asked(state: State) -> None:
    runs = state.store("runs", Run)
    revision = await runs.create("by-update", Run(status="running"))
    await runs.update("by-update", Run(status="failed"), revision=revision, ttl_s=1)

    def finished_retained_1s(run: Run) -> float | None:
        return 1.0 if run.status in ("succeeded", "failed") else None

    def to(status: str) -> Callable[[Run | None], Run]:
        return lambda _: Run(status=status)

    await runs.mutate("by-rule", to("running"), ttl_s=finished_retained_1s)

    async def update_expired() -> bool:
        return await runs.get("by-update") is None

    await assert_eventually(update_expired, timeout_s=8, interval_s=0.1)
    assert await runs.get("by-rule") is not None, "a running record has no retention"
    await runs.mutate("by-rule", to("succeeded"), ttl_s=finished_retained_1s)

    async def rule_expired() -> bool:
        return await runs.get("by-rule") is None

    await assert_eventually(rule_expired, timeout_s=8, interval_s=0.1)


@pytest.mark.parametrize("ttl_s", [0.0, 0.5, -1.0, float("inf")])
async def test_a_ttl_below_a_second_is_refused(state: State, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="ttl_s must be at least 1"):
        await state.store("runs", Run).put("r", Run(status="x"), ttl_s=ttl_s)
    with pytest.raises(ValueError, match="ttl_s must be at least 1"):
        await state.leases.acquire("l", "me", ttl_s=ttl_s)


# -- live views and watches ------------------------------------------------------------------------


def running(run: Run) -> bool:
    return run.status == "running"


async def test_a_live_view_follows_writes_deletes_and_expiries(harness: Harness) -> None:
    runs = harness.state.store("runs", Run)
    await runs.put("r1", Run(status="running"))
    await runs.put("r0", Run(status="succeeded"))
    async with runs.live(running) as view:
        assert [item.key for item in view.items()] == ["r1"], "the current values, filtered"
        sent = harness.nc.stats["out_msgs"] if harness.nc else 0
        assert view.values() == [Run(status="running")]
        assert view.get("r1") is not None
        assert "r0" not in view
        if harness.nc:
            assert harness.nc.stats["out_msgs"] == sent, "reading the view sent nothing"

        await runs.put("r2", Run(status="running"))
        await runs.put("r3", Run(status="running"), ttl_s=1)
        revision = await runs.put("r4", Run(status="running"))

        async def seen() -> bool:
            return [item.key for item in view.items()] == ["r1", "r2", "r3", "r4"]

        await assert_eventually(seen, timeout_s=5)
        item = view.get("r4")
        assert item is not None
        assert item.revision == revision
        await runs.put("r1", Run(status="succeeded"))  # stops matching
        await runs.delete("r2")

        async def left() -> bool:
            return [item.key for item in view.items()] == ["r4"]

        await assert_eventually(left, timeout_s=8, message=lambda: f"view: {view.items()}")
    assert len(view) == 1, "a stopped view keeps what it last held"


async def test_a_live_view_under_a_prefix_skips_what_it_cannot_read(harness: Harness) -> None:
    runs = harness.state.store("runs", Run)
    await runs.put("active.r1", Run(status="running"))
    await runs.put("other.r2", Run(status="running"))
    await harness.write_raw("runs", "active.broken", b"{not json")
    with capture_logs() as logs:
        async with runs.live(prefix="active", resync_s=0.3) as view:
            assert [item.key for item in view.items()] == ["active.r1"]

            async def resynced() -> bool:
                return view.resyncs >= 3

            await assert_eventually(resynced, timeout_s=5)
            assert [item.key for item in view.items()] == ["active.r1"], "a resync changes nothing"
    assert any(
        log["event"] == "state.live.unreadable" and log["key"] == "active.broken" for log in logs
    )


async def test_watching_a_key_gives_its_value_then_each_change(state: State) -> None:
    runs = state.store("runs", Run)
    await runs.put("other", Run(status="running"))
    async with runs.watch_key("r1") as updates:
        assert await anext(updates) is None, "absent at first"
        revision = await runs.create("r1", Run(status="pending"))
        await runs.put("other", Run(status="failed"))  # another key: not seen
        await runs.update("r1", Run(status="running"), revision=revision)
        await runs.delete("r1")
        seen = [await asyncio.wait_for(anext(updates), 5) for _ in range(3)]
    assert [item.value.status if item else None for item in seen] == ["pending", "running", None]
    await runs.put("r1", Run(status="succeeded"), ttl_s=1)
    async with runs.watch_key("r1") as updates:
        current = await anext(updates)
        assert current is not None
        assert current.value.status == "succeeded", "the current value first"
        assert await asyncio.wait_for(anext(updates), 8) is None, "then its expiry"
