"""What only the NATS adapter of the state port does: buckets, their upgrade, server filtering.

Behaviour both adapters share is in ``test_state_contract.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import api
from pydantic import BaseModel, ConfigDict

from torchrelay.shared.state import BUCKETS, DEFAULT_MARKER_TTL_S, KvState
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


async def test_buckets_are_created_once_and_reopened(nc: NatsClient) -> None:
    first = await KvState.open(nc.jetstream())
    await first.store("runs", Run).put("r1", Run(status="running"))
    second = await KvState.open(nc.jetstream())
    stored = await second.store("runs", Run).get("r1")
    assert stored is not None
    assert stored.value.status == "running"
    infos = {info.config.name: info.config for info in await nc.jetstream().streams_info()}
    assert {f"KV_{b}" for b in BUCKETS} <= set(infos)
    runs = infos["KV_runs"]
    assert (runs.allow_msg_ttl, runs.subject_delete_marker_ttl) == (True, DEFAULT_MARKER_TTL_S)
    leases = infos["KV_leases"]
    assert leases.allow_msg_ttl
    assert not leases.subject_delete_marker_ttl, "a lease's TTL is exact: no marker stretches it"


async def test_a_bucket_made_before_retention_is_upgraded_in_place(nc: NatsClient) -> None:
    js = nc.jetstream()
    # What an older torchrelay (or another client) created: no per-message TTLs, no markers.
    await js.add_stream(
        api.StreamConfig(
            name="KV_runs",
            subjects=["$KV.runs.>"],
            allow_rollup_hdrs=True,
            deny_delete=True,
            allow_direct=True,
            max_msgs_per_subject=5,
            discard=api.DiscardPolicy.NEW,
        )
    )
    await (await js.key_value("runs")).put("old", b'{"status": "running"}')
    state = await KvState.open(js, marker_ttl_s=1.0)
    config = (await js.stream_info("KV_runs")).config
    assert (config.allow_msg_ttl, config.subject_delete_marker_ttl) == (True, 1.0)
    runs = state.store("runs", Run)
    old = await runs.get("old")
    assert old is not None, "the upgrade kept the data"
    await runs.put("old", Run(status="succeeded"), ttl_s=1)

    async def gone() -> bool:
        return await runs.get("old") is None

    await assert_eventually(gone, timeout_s=8, interval_s=0.1)
