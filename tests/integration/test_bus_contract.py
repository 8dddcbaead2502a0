"""Bus semantics every adapter shares (in-memory and NATS JetStream), per the outcome table."""

from __future__ import annotations

import collections
import json

import pytest

from tests.factories import ingest_requested, staged
from tests.integration.conftest import Harness
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.errors import PermanentError, TransientError
from torchrelay.shared.events import AnyEvent, DatasetStaged
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(60)


def subscription(handler: object, **options: object) -> Subscription:
    defaults: dict[str, object] = {
        "max_deliver": 3,
        "backoff_s": (0.05,),
        "ack_wait_s": 5.0,
    }
    return Subscription("contract", [DatasetStaged], handler, **{**defaults, **options})  # type: ignore[arg-type]


async def test_handled_events_are_acked_once_each(harness: Harness) -> None:
    seen: list[str] = []

    async def handle(event: AnyEvent) -> None:
        seen.append(event.id)

    await harness.start(subscription(handle))
    events = [staged(version=f"v{i}") for i in range(5)]
    for event in events:
        await harness.bus.publish(event)
    await assert_eventually(lambda: sorted(seen) == sorted(e.id for e in events))
    assert not harness.dead_letters


async def test_transient_failures_are_redelivered_until_they_succeed(harness: Harness) -> None:
    attempts: collections.Counter[str] = collections.Counter()

    async def flaky(event: AnyEvent) -> None:
        attempts[event.id] += 1
        if attempts[event.id] < 3:
            raise TransientError("storage not mounted yet", delay_s=0.05)

    await harness.start(subscription(flaky))
    event = staged()
    await harness.bus.publish(event)
    await assert_eventually(lambda: attempts[event.id] == 3)
    assert not harness.dead_letters


async def test_a_poison_event_is_dead_lettered_after_max_deliveries(harness: Harness) -> None:
    attempts: collections.Counter[str] = collections.Counter()

    async def always_fails(event: AnyEvent) -> None:
        attempts[event.id] += 1
        raise RuntimeError("model exploded")

    await harness.start(subscription(always_fails))
    event = staged(pipelineid="pipe-9")
    await harness.bus.publish(event)
    await assert_eventually(lambda: len(harness.dead_letters) == 1)
    letter = harness.dead_letters[0].data
    assert attempts[event.id] == 3
    assert letter.deliveries == 3
    assert "gave up after 3 deliveries" in letter.reason
    assert "RuntimeError: model exploded" in letter.reason
    assert letter.original_subject == "torchrelay.dataset.staged"
    assert letter.original_id == event.id
    assert json.loads(letter.payload)["id"] == event.id
    assert harness.dead_letters[0].pipelineid == "pipe-9"


async def test_a_permanent_error_is_dead_lettered_at_once(harness: Harness) -> None:
    attempts: collections.Counter[str] = collections.Counter()

    async def refuses(event: AnyEvent) -> None:
        attempts[event.id] += 1
        raise PermanentError("dataset path escapes the storage root")

    await harness.start(subscription(refuses))
    event = staged()
    await harness.bus.publish(event)
    await assert_eventually(lambda: len(harness.dead_letters) == 1)
    assert attempts[event.id] == 1
    assert harness.dead_letters[0].data.deliveries == 1
    assert "escapes the storage root" in harness.dead_letters[0].data.reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{definitely not json", "not JSON"),
        (b'{"type": "io.torchrelay.dataset.staged.v1", "source": "/x"}', "failed validation"),
        (b"\x00\xff binary", "not JSON"),
    ],
)
async def test_a_malformed_event_is_dead_lettered_at_once_without_reaching_the_handler(
    harness: Harness, payload: bytes, reason: str
) -> None:
    calls: list[AnyEvent] = []

    async def handle(event: AnyEvent) -> None:
        calls.append(event)

    await harness.start(subscription(handle))
    await harness.publish_raw("torchrelay.dataset.staged", payload)
    await assert_eventually(lambda: len(harness.dead_letters) == 1)
    letter = harness.dead_letters[0].data
    assert reason in letter.reason
    assert letter.deliveries == 1
    assert letter.original_type is None
    if letter.payload_encoding == "utf-8":
        assert letter.payload.encode() == payload
    assert not calls


async def test_publishing_the_same_event_twice_stores_it_once(harness: Harness) -> None:
    seen: list[str] = []

    async def handle(event: AnyEvent) -> None:
        seen.append(event.id)

    event = staged()
    assert await harness.bus.publish(event) is True
    assert await harness.bus.publish(event) is False
    marker = ingest_requested()
    await harness.start(
        subscription(handle),
        Subscription("contract-marker", [type(marker)], handle),
    )
    await harness.bus.publish(marker)
    # The marker was published after the duplicate: once it is handled, so is anything before.
    await assert_eventually(lambda: marker.id in seen)
    await assert_eventually(lambda: seen.count(event.id) == 1)
    assert seen.count(event.id) == 1
