"""Bus semantics every adapter shares (in-memory and NATS JetStream), per the outcome table."""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json

import pytest

from tests.factories import ingest_requested, staged
from tests.integration.conftest import Harness
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.errors import PermanentError, TransientError
from torchrelay.shared.events import (
    DEADLETTER_SUBJECT,
    AnyEvent,
    DatasetStaged,
    DeadLettered,
    TrainRequested,
)
from torchrelay.shared.events.data import (
    DatasetRef,
    DeadLetteredData,
    TrainJobSpec,
    TrainRequestedData,
)
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
    assert letter.original_msg_id == event.id
    assert letter.original_type == "io.torchrelay.dataset.staged.v1"
    assert harness.dead_letters[0].pipelineid == "pipe-9"
    original = await harness.bus.message_at(letter.original_sequence)
    assert original is not None
    assert json.loads(original.payload)["id"] == event.id
    # A small original is kept whole.
    assert not letter.original_truncated
    assert prefix_bytes(letter) == original.payload


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
    assert letter.original_id is None
    assert letter.original_msg_id is None, "published without a Nats-Msg-Id"
    assert letter.original_size_bytes == len(payload)
    assert letter.original_sha256 == hashlib.sha256(payload).hexdigest()
    assert not letter.original_truncated
    assert prefix_bytes(letter) == payload
    original = await harness.bus.message_at(letter.original_sequence)
    assert original is not None
    assert original.payload == payload
    assert not calls


def prefix_bytes(letter: DeadLetteredData) -> bytes:
    if letter.original_prefix_encoding == "utf-8":
        return letter.original_prefix.encode()
    return base64.b64decode(letter.original_prefix)


def train_request_of_about(size: int) -> TrainRequested:
    """A valid event of about ``size`` bytes, full of quotes: JSON-escaped into a dead letter
    that embeds it, it grows by half."""
    tokens = ["a"] * (size // 4)  # '"a",' per token
    return TrainRequested(
        source="/tests",
        pipelineid="pipe-big",
        data=TrainRequestedData(
            spec=TrainJobSpec(
                entrypoint="tests.integration.trainers:noop",
                model_name="big",
                dataset=DatasetRef(name="digits", version="v1"),
                hyperparameters={"tokens": tokens},
            )
        ),
    )


async def test_a_1_mib_event_that_fails_permanently_leaves_a_small_dead_letter_naming_it(
    harness: Harness,
) -> None:
    async def refuses(event: AnyEvent) -> None:
        raise PermanentError("this model does not take a million tokens")

    await harness.start(Subscription("contract", [TrainRequested], refuses))
    event = train_request_of_about(1_000_000)
    payload = event.to_json()
    assert 990_000 < len(payload) < 1024 * 1024 - 1024, "near NATS's default max payload"
    await harness.bus.publish(event)

    await assert_eventually(lambda: len(harness.dead_letters) == 1, timeout_s=20)
    letter = harness.dead_letters[0]
    assert len(letter.to_json()) < 4096
    data = letter.data
    assert data.consumer == "contract"
    assert "a million tokens" in data.reason
    assert (data.original_type, data.original_id, data.original_msg_id) == (
        event.type,
        event.id,
        event.id,
    )
    assert data.original_size_bytes == len(payload)
    assert data.original_sha256 == hashlib.sha256(payload).hexdigest()
    assert data.original_truncated
    assert payload.startswith(prefix_bytes(data)[:1021])
    assert len(prefix_bytes(data)) == 1024
    assert letter.pipelineid == "pipe-big"
    # The original stays in the stream, where the dead letter's sequence points.
    original = await harness.bus.message_at(data.original_sequence)
    assert original is not None
    assert original.subject == "torchrelay.train.requested"
    assert original.payload == payload


async def test_nothing_on_the_dead_letter_subject_is_dead_lettered(harness: Harness) -> None:
    async def refuses(event: AnyEvent) -> None:
        raise PermanentError("refused")

    await harness.start(subscription(refuses))
    # Junk on the dead-letter subject fails to decode in the harness's dead-letter consumer.
    await harness.publish_raw(DEADLETTER_SUBJECT, b"not a dead letter")
    marker = staged()
    await harness.bus.publish(marker)
    await assert_eventually(lambda: len(harness.dead_letters) >= 1)
    await asyncio.sleep(0.5)  # room for a dead letter of the junk, were one wrongly made
    assert [d.data.original_id for d in harness.dead_letters] == [marker.id]
    assert all(isinstance(d, DeadLettered) for d in harness.dead_letters)


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
