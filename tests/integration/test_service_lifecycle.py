"""Services as real processes: endpoints, crashes mid-event, SIGTERM during a burst."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import nats
import pytest

from tests.factories import ingest_requested, staged
from tests.integration.conftest import FAST_STREAM
from tests.integration.effect_service import EFFECTS_BUCKET, attempts
from tests.integration.processes import ServiceProcess
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.state.kv import KvBucket
from torchrelay.shared.testing import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

EFFECT_SERVICE = ["-m", "tests.integration.effect_service"]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[JetStreamBus]:
    bus = JetStreamBus(await nats.connect(nats_url), FAST_STREAM)
    await bus.ensure_stream()
    yield bus
    await bus.aclose()


def start(
    processes: list[ServiceProcess],
    argv: list[str],
    nats_url: str,
    log: Path,
    **env: str,
) -> ServiceProcess:
    process = ServiceProcess(
        [*argv, "--nats-url", nats_url, "--http-port", "0"],
        log,
        env={"TORCHRELAY_SHUTDOWN_GRACE_S": "5", "TORCHRELAY_SHUTDOWN_DEADLINE_S": "10", **env},
    )
    processes.append(process)
    return process


async def kv_keys(bus: JetStreamBus, bucket: str) -> list[str]:
    """Keys holding a value, listed the way the state layer lists them (not nats-py's
    watch-based ``keys()``, which can answer empty before the values reach it)."""
    kv = await bus.nc.jetstream().key_value(bucket)
    return await KvBucket(kv, bucket).keys(">")


async def test_monitor_serves_health_readiness_and_metrics_behind_a_token(
    nats_url: str, bus: JetStreamBus, processes: list[ServiceProcess], tmp_path: Path
) -> None:
    monitor = start(
        processes,
        ["-m", "torchrelay", "service", "monitor"],
        nats_url,
        tmp_path / "monitor.log",
        TORCHRELAY_HTTP_BEARER_TOKEN="s3cret",
    )
    port = await monitor.wait_ready()
    base = f"http://127.0.0.1:{port}"
    await bus.publish(staged(source="/torchrelay/ingest"))
    await bus.publish(ingest_requested(source="/some/other/system"))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{base}/readyz") as response:
            assert response.status == 200
        async with http.get(f"{base}/metrics") as response:
            assert response.status == 401
            assert "bearer token" in (await response.json())["error"]
        auth = {"Authorization": "Bearer s3cret"}

        async def counted() -> bool:
            async with http.get(f"{base}/metrics", headers=auth) as response:
                text = await response.text()
            staged_line = 'source="ingest",type="io.torchrelay.dataset.staged.v1"} 1.0'
            external_line = (
                'source="external",type="io.torchrelay.dataset.ingest.requested.v1"} 1.0'
            )
            return f"torchrelay_events_total{{{staged_line}" in text and external_line in text

        await assert_eventually(counted)
    monitor.signal(signal.SIGTERM)
    assert monitor.wait(15) == 0
    assert monitor.logged("service.stopped")


async def test_readiness_fails_while_nats_is_down(
    tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    server = NatsServer(tmp_path / "nats").start()
    try:
        monitor = start(
            processes, ["-m", "torchrelay", "service", "monitor"], server.url, tmp_path / "m.log"
        )
        port = await monitor.wait_ready()
        url = f"http://127.0.0.1:{port}/readyz"
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                async with http.get(url) as response:
                    return response.status == 200

            assert await ready()
            server.stop()

            async def not_ready() -> bool:
                return not await ready()

            await assert_eventually(not_ready, timeout_s=15)
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200, "alive though not ready: no restart storm"
    finally:
        server.stop()


async def test_an_event_whose_handler_dies_mid_way_is_redelivered_and_its_effect_happens_once(
    nats_url: str, bus: JetStreamBus, processes: list[ServiceProcess], tmp_path: Path
) -> None:
    first = start(processes, EFFECT_SERVICE, nats_url, tmp_path / "first.log", EFFECT_HOLD_S="60")
    await first.wait_ready()
    event = staged()
    await bus.publish(event)

    async def effect_done() -> bool:
        return event.id in await kv_keys(bus, EFFECTS_BUCKET)

    await assert_eventually(effect_done, timeout_s=15)
    first.signal(signal.SIGKILL)  # dies mid-handler, before its ack
    first.wait(10)

    second = start(processes, EFFECT_SERVICE, nats_url, tmp_path / "second.log")
    await second.wait_ready()

    async def redelivered() -> bool:
        return await attempts(bus, event.id) == 2

    await assert_eventually(redelivered, timeout_s=20)

    async def acked() -> bool:
        info = await bus.nc.jetstream().consumer_info(bus.settings.name, "effects")
        return info.num_ack_pending == 0 and info.num_pending == 0

    await assert_eventually(acked, timeout_s=15)
    assert await kv_keys(bus, EFFECTS_BUCKET) == [event.id]
    subject = f"$KV.{EFFECTS_BUCKET}.{event.id}"
    info = await bus.nc.jetstream().stream_info(f"KV_{EFFECTS_BUCKET}", subjects_filter=subject)
    assert info.state.subjects == {subject: 1}, "the effect was written once, by the first delivery"


async def test_sigterm_during_a_burst_loses_no_event(
    nats_url: str, bus: JetStreamBus, processes: list[ServiceProcess], tmp_path: Path
) -> None:
    total = 300
    first = start(processes, EFFECT_SERVICE, nats_url, tmp_path / "first.log", EFFECT_HOLD_S="0.02")
    await first.wait_ready()
    events = [staged(version=f"v{i}") for i in range(total)]

    async def burst() -> None:
        for event in events:
            await bus.publish(event)

    publishing = asyncio.create_task(burst())

    async def some_done() -> bool:
        return len(await kv_keys(bus, EFFECTS_BUCKET)) >= 30

    await assert_eventually(some_done, timeout_s=30)
    first.signal(signal.SIGTERM)
    code, seconds = await asyncio.to_thread(first.elapsed_wait, 20)
    assert code == 0, first.log_path.read_text()[-2000:]
    assert seconds < 10, "shutdown stayed within its deadline"
    await publishing
    done_by_first = len(await kv_keys(bus, EFFECTS_BUCKET))
    assert done_by_first < total, "the stop really happened mid-burst"

    second = start(processes, EFFECT_SERVICE, nats_url, tmp_path / "second.log")
    await second.wait_ready()

    async def all_done() -> bool:
        return len(await kv_keys(bus, EFFECTS_BUCKET)) == total

    await assert_eventually(all_done, timeout_s=60)
    assert set(await kv_keys(bus, EFFECTS_BUCKET)) == {e.id for e in events}


async def test_a_handler_outliving_the_grace_period_is_handed_back_at_once(
    nats_url: str, bus: JetStreamBus, processes: list[ServiceProcess], tmp_path: Path
) -> None:
    # ack_wait is 30 s: a redelivery within seconds proves the stop nak'd the event.
    slow = {"EFFECT_HOLD_S": "60", "EFFECT_ACK_WAIT_S": "30", "TORCHRELAY_SHUTDOWN_GRACE_S": "1"}
    first = start(processes, EFFECT_SERVICE, nats_url, tmp_path / "first.log", **slow)
    await first.wait_ready()
    event = staged()
    await bus.publish(event)

    async def started() -> bool:
        return await attempts(bus, event.id) == 1

    await assert_eventually(started, timeout_s=15)
    first.signal(signal.SIGTERM)
    code, seconds = await asyncio.to_thread(first.elapsed_wait, 20)
    assert code == 0
    assert seconds < 5, "the handler was cancelled after the 1 s grace, not awaited for 60 s"
    assert first.logged("service.grace_expired")

    second = start(
        processes, EFFECT_SERVICE, nats_url, tmp_path / "second.log", EFFECT_ACK_WAIT_S="30"
    )
    await second.wait_ready()

    async def redelivered() -> bool:
        return await attempts(bus, event.id) == 2

    await assert_eventually(redelivered, timeout_s=10)
