"""Bus benchmark: torchrelay's hop against the raw nats-py floor, on one nats-server.

    python bench/bus.py [--events 20000] [--samples 2000] [--auth]

Latency: one event at a time, from "publish" to "the consumer has it" (raw: the fetched
message; torchrelay: the handler is running), publish ack included in both; both consumers
keep a pull request waiting, as a long-running consumer does.
Throughput: ``--events`` events are stored first, then 1 or 2 replica processes are told to go
and the clock stops when the consumer has nothing pending and nothing unacked.
The raw floor uses nats-py the fastest way for each case (a waiting fetch(1) for latency,
fetch(64) batches acked in line for throughput); torchrelay runs JetStreamBus.consume with the
runtime's metrics observer, exactly as a service does.
With ``--auth`` the server runs with the users and subject permissions `torchrelay up`
generates: torchrelay connects as the ingest service (its own inbox prefix, every publish and
JetStream call checked against its permissions), the raw floor as admin (no checks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js import api
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchrelay.shared.bus import principals
from torchrelay.shared.bus.jetstream import JetStreamBus, StreamSettings
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.events import AnyEvent, DatasetStaged
from torchrelay.shared.events.data import DatasetStagedData
from torchrelay.shared.runtime.logging import configure_logging
from torchrelay.shared.runtime.metrics import RuntimeMetrics
from torchrelay.shared.runtime.settings import LogSettings

STREAM = StreamSettings()
PASSWORDS = {user: secrets.token_urlsafe(16) for user in principals.USERS}
Login = dict[str, str]


def login(user: str | None) -> Login:
    """nats.connect options for ``user`` (None: no authorization on the server)."""
    if user is None:
        return {}
    return {
        "user": user,
        "password": PASSWORDS[user],
        "inbox_prefix": principals.inbox_prefix(user),
    }


SUBJECT = DatasetStaged.nats_subject
GO_SUBJECT = "bench.go"


def make_event(i: int) -> DatasetStaged:
    return DatasetStaged(
        source="/torchrelay/ingest",
        pipelineid=f"bench-{i % 16}",
        data=DatasetStagedData(
            name="digits",
            version=f"v{i}",
            path=f"datasets/digits/v{i}",
            format="npz",
            files=1,
            size_bytes=1797 * 64 * 8,
            manifest_sha256="ab" * 32,
        ),
    )


async def reset(url: str, admin: Login) -> None:
    nc = await nats.connect(url, **admin)
    js = nc.jetstream()
    for info in await js.streams_info():
        if info.config.name:
            await js.delete_stream(info.config.name)
    await JetStreamBus(nc, STREAM).ensure_stream()
    await nc.close()


async def add_consumer(url: str, name: str, admin: Login) -> None:
    nc = await nats.connect(url, **admin)
    await nc.jetstream().add_consumer(
        STREAM.name,
        api.ConsumerConfig(
            durable_name=name,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=30,
            max_deliver=5,
            filter_subject=SUBJECT,
            max_ack_pending=1000,
        ),
    )
    await nc.close()


# --- latency --------------------------------------------------------------------------------


async def latency_raw(url: str, samples: int, raw: Login) -> list[float]:
    await reset(url, raw)
    await add_consumer(url, "raw", raw)
    nc = await nats.connect(url, **raw)
    js = nc.jetstream()
    psub = await js.pull_subscribe_bind(durable="raw", stream=STREAM.name)
    arrived: asyncio.Queue[float] = asyncio.Queue()
    done = asyncio.Event()

    async def consume() -> None:
        # A waiting pull, as any long-running consumer keeps one.
        while not done.is_set():
            try:
                messages = await psub.fetch(1, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in messages:
                arrived.put_nowait(time.perf_counter())
                await msg.ack()

    consumer = asyncio.create_task(consume())
    results: list[float] = []
    for i in range(samples):
        event = make_event(i)
        started = time.perf_counter()
        await js.publish(SUBJECT, event.to_json(), headers={"Nats-Msg-Id": event.id})
        results.append(await arrived.get() - started)
    done.set()
    await consumer
    await nc.close()
    return results


async def latency_torchrelay(url: str, samples: int, raw: Login, hop: Login) -> list[float]:
    await reset(url, raw)
    nc = await nats.connect(url, **hop)
    bus = JetStreamBus(nc, STREAM, observer=RuntimeMetrics(CollectorRegistry(), "bench", "0"))
    arrived: asyncio.Queue[float] = asyncio.Queue()

    async def handle(_: AnyEvent) -> None:
        arrived.put_nowait(time.perf_counter())

    sub = Subscription("hop", [DatasetStaged], handle)
    await bus.provision([sub])
    stop = asyncio.Event()
    task = asyncio.create_task(bus.consume(sub, stop))
    results: list[float] = []
    for i in range(samples):
        started = time.perf_counter()
        await bus.publish(make_event(i))
        results.append(await arrived.get() - started)
    stop.set()
    await task
    await bus.aclose()
    return results


# --- throughput ---------------------------------------------------------------------------------


def replica_main(
    kind: str, url: str, ready: multiprocessing.Queue, logins: tuple[Login, Login]
) -> None:  # type: ignore[type-arg]
    asyncio.run(_replica(kind, url, ready, logins))


async def _replica(
    kind: str, url: str, ready: multiprocessing.Queue, logins: tuple[Login, Login]
) -> None:  # type: ignore[type-arg]
    """One consumer process; ``logins``: (the consumer's own, the bench's control channel)."""
    configure_logging(LogSettings())
    you, control = logins
    nc = await nats.connect(url, **you)
    # The go/done signal travels on a subject no service user may read: its own connection.
    control_nc = await nats.connect(url, **control)
    go = asyncio.Event()
    done = asyncio.Event()

    async def on_control(msg: object) -> None:
        data = getattr(msg, "data", b"")
        (go if data == b"go" else done).set()

    await control_nc.subscribe(GO_SUBJECT, cb=on_control)
    await control_nc.flush()
    if kind == "raw":
        psub = await nc.jetstream().pull_subscribe_bind(durable="throughput", stream=STREAM.name)
        ready.put(1)
        await go.wait()
        while not done.is_set():
            try:
                messages = await psub.fetch(64, timeout=0.2)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in messages:
                await msg.ack()
        await nc.flush()
        await nc.close()
        await control_nc.close()
        return
    bus = JetStreamBus(nc, STREAM, observer=RuntimeMetrics(CollectorRegistry(), "bench", "0"))

    async def handle(_: AnyEvent) -> None:
        return None

    sub = Subscription("throughput", [DatasetStaged], handle)
    ready.put(1)
    await go.wait()
    consuming = asyncio.create_task(bus.consume(sub, done))
    await done.wait()
    await consuming
    await bus.aclose()
    await control_nc.close()


async def throughput(
    kind: str, url: str, events: int, replicas: int, *, raw: Login, hop: Login
) -> float:
    await reset(url, raw)
    nc = await nats.connect(url, **raw)
    bus = JetStreamBus(nc, STREAM)
    if kind == "raw":
        await add_consumer(url, "throughput", raw)
    else:
        await bus.provision(
            [Subscription("throughput", [DatasetStaged], _noop)]  # same config a service uses
        )
    publishes = [make_event(i) for i in range(events)]
    js = nc.jetstream()
    for start in range(0, events, 500):
        await asyncio.gather(
            *(
                js.publish(SUBJECT, e.to_json(), headers={"Nats-Msg-Id": e.id})
                for e in publishes[start : start + 500]
            )
        )
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    processes = [
        context.Process(
            target=replica_main, args=(kind, url, ready, (raw if kind == "raw" else hop, raw))
        )
        for _ in range(replicas)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        await asyncio.to_thread(ready.get, timeout=60)
    await asyncio.sleep(0.2)
    started = time.perf_counter()
    await nc.publish(GO_SUBJECT, b"go")
    while True:
        info = await js.consumer_info(STREAM.name, "throughput")
        if info.num_pending == 0 and info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    await nc.publish(GO_SUBJECT, b"done")
    await nc.flush()
    for process in processes:
        await asyncio.to_thread(process.join, 30)
    await nc.close()
    return events / elapsed


async def _noop(_: AnyEvent) -> None:
    return None


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if q < 100 else max(values)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--auth", action="store_true", help="users and permissions as `torchrelay up` runs them"
    )
    args = parser.parse_args()
    configure_logging(LogSettings(level="warning"))
    authorization = principals.server_authorization(PASSWORDS) if args.auth else None
    raw, hop = (login("admin"), login("ingest")) if args.auth else ({}, {})
    folder = Path(tempfile.mkdtemp(prefix="bench-nats-"))
    with NatsServer(folder, authorization=authorization) as server:
        # Interleave the two sides so drift on a noisy machine hits both alike.
        raw_lat, hop_lat = [], []
        for _ in range(2):
            raw_lat += await latency_raw(server.url, args.samples // 2, raw)
            hop_lat += await latency_torchrelay(server.url, args.samples // 2, raw, hop)
        rates: dict[str, dict[int, float]] = {"raw": {}, "torchrelay": {}}
        for replicas in (1, 2):
            for kind in ("raw", "torchrelay"):
                rates[kind][replicas] = await throughput(
                    kind, server.url, args.events, replicas, raw=raw, hop=hop
                )
    figures = {
        "latency_ms": {
            "raw": {"p50": pct(raw_lat, 50) * 1e3, "p99": pct(raw_lat, 99) * 1e3},
            "torchrelay": {"p50": pct(hop_lat, 50) * 1e3, "p99": pct(hop_lat, 99) * 1e3},
        },
        "events_per_s": rates,
        "authorization": args.auth,
    }
    figures["ratios"] = {
        "p50_latency_hop_over_raw": figures["latency_ms"]["torchrelay"]["p50"]
        / figures["latency_ms"]["raw"]["p50"],
        "throughput_1_replica_hop_over_raw": rates["torchrelay"][1] / rates["raw"][1],
        "throughput_2_replicas_hop_over_raw": rates["torchrelay"][2] / rates["raw"][2],
    }
    lat = figures["latency_ms"]
    for q in ("p50", "p99"):
        print(f"latency {q} (ms)  raw {lat['raw'][q]:.3f}  torchrelay {lat['torchrelay'][q]:.3f}")
    for replicas in (1, 2):
        print(
            f"events/s {replicas} repl. raw {rates['raw'][replicas]:8.0f}  "
            f"torchrelay {rates['torchrelay'][replicas]:8.0f}"
        )
    ratios = figures["ratios"]
    print(
        f"ratios: p50 hop/raw {ratios['p50_latency_hop_over_raw']:.2f} (target <= 1.5); "
        f"throughput hop/raw 1 replica {ratios['throughput_1_replica_hop_over_raw']:.2f}, "
        f"2 replicas {ratios['throughput_2_replicas_hop_over_raw']:.2f} (target >= 0.70)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
