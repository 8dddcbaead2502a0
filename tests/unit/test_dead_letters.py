"""Dead letters: bounded whatever the original, and naming the original exactly."""

from __future__ import annotations

import base64
import hashlib
import json
import os

from tests.factories import staged
from torchrelay.services.monitor.domain import dead_letter_category
from torchrelay.shared.bus.deadletters import (
    EXHAUSTED_REASON,
    PREFIX_MAX_BYTES,
    MaxDeliveriesAdvisory,
    StoredMessage,
    build_dead_letter,
    dead_letter_id,
    listing_row,
)
from torchrelay.shared.bus.dispatch import Dispatched, dead_letter_for
from torchrelay.shared.bus.outcome import Action, Outcome
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.events import (
    DEADLETTER_SUBJECT,
    AnyEvent,
    DatasetStaged,
    DeadLettered,
    decode,
)

BOUND_BYTES = 4096


def letter_for(
    payload: bytes,
    *,
    sequence: int = 42,
    subject: str = "torchrelay.dataset.staged",
    msg_id: str | None = None,
    reason: str = "PermanentError: refused",
) -> DeadLettered:
    return build_dead_letter(
        StoredMessage(sequence, subject, payload, msg_id),
        consumer="ingest-requests",
        reason=reason,
        deliveries=1,
        source="/tests",
    )


def test_the_dead_letter_of_a_large_binary_payload_stays_bounded() -> None:
    payload = os.urandom(5 * 1024 * 1024)
    letter = letter_for(payload)
    wire = letter.to_json()
    assert len(wire) < BOUND_BYTES
    data = letter.data
    assert data.original_size_bytes == len(payload)
    assert data.original_sha256 == hashlib.sha256(payload).hexdigest()
    assert data.original_sequence == 42
    assert data.original_truncated
    assert data.original_prefix_encoding == "base64"
    assert base64.b64decode(data.original_prefix) == payload[:PREFIX_MAX_BYTES]
    # It is a valid event on the wire, decodable like any other.
    assert decode(wire).data == data


def test_text_that_json_would_inflate_is_kept_as_base64() -> None:
    # Valid UTF-8, but each control character escapes to six bytes in JSON.
    payload = b"\x01" * (2 * 1024 * 1024)
    letter = letter_for(payload)
    assert len(letter.to_json()) < BOUND_BYTES
    assert letter.data.original_prefix_encoding == "base64"


def test_a_text_prefix_never_splits_a_character() -> None:
    payload = ("é" * 1000).encode()  # two bytes each: 1024 bytes would cut nothing, 1023 would
    payload = b"x" + payload
    data = letter_for(payload).data
    assert data.original_prefix_encoding == "utf-8"
    prefix = data.original_prefix.encode()
    assert payload.startswith(prefix)
    assert PREFIX_MAX_BYTES - 3 <= len(prefix) <= PREFIX_MAX_BYTES
    assert data.original_truncated


def test_a_small_original_is_kept_whole_as_text() -> None:
    event = staged()
    payload = event.to_json()
    data = letter_for(payload, msg_id=event.id).data
    assert (data.original_prefix_encoding, data.original_truncated) == ("utf-8", False)
    assert data.original_prefix.encode() == payload
    assert data.original_msg_id == event.id


def test_unbounded_inputs_are_cut_to_their_limits() -> None:
    letter = letter_for(
        b"{}", reason="E: " + "x" * 10_000, subject="torchrelay." + "s" * 2000, msg_id="m" * 900
    )
    data = letter.data
    assert data.original_msg_id is not None
    assert len(data.reason) == len(data.original_subject) == len(data.original_msg_id) == 512
    assert len(letter.to_json()) < BOUND_BYTES


def test_the_id_derives_from_consumer_and_stream_sequence() -> None:
    first = letter_for(b"a", sequence=7)
    again = letter_for(b"a", sequence=7, reason="another reason")
    other = letter_for(b"a", sequence=8)
    assert first.id == again.id == dead_letter_id("ingest-requests", 7)
    assert other.id != first.id


def test_the_handler_path_names_the_decoded_original() -> None:
    async def handler(_: AnyEvent) -> None:
        return None

    sub = Subscription("train-requests", [DatasetStaged], handler)
    event = staged(pipelineid="p-1")
    original = StoredMessage(9, event.nats_subject, event.to_json(), event.id)
    gave_up = Dispatched(event, Outcome(Action.TERM, dead_letter_reason="PermanentError: no"))
    letter = dead_letter_for(sub, original=original, dispatched=gave_up, delivered=2, source="/t")
    assert letter is not None
    assert letter.id == dead_letter_id("train-requests", 9)
    assert (letter.pipelineid, letter.causationid) == ("p-1", event.id)
    assert (letter.data.original_type, letter.data.original_id) == (event.type, event.id)
    assert letter.data.deliveries == 2


def test_nothing_on_the_dead_letter_subject_gets_a_dead_letter() -> None:
    async def handler(_: AnyEvent) -> None:
        return None

    sub = Subscription("dead-letters", [DatasetStaged], handler)
    undecodable = StoredMessage(3, DEADLETTER_SUBJECT, b"junk")
    gave_up = Dispatched(None, Outcome(Action.TERM, dead_letter_reason="payload is not JSON"))
    assert (
        dead_letter_for(sub, original=undecodable, dispatched=gave_up, delivered=1, source="/t")
        is None
    )


def test_the_max_deliveries_advisory_as_nats_server_sends_it() -> None:
    # Captured from nats-server 2.15.1.
    wire = (
        b'{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"TLUOR5girl1I9OcFb864k7",'
        b'"timestamp":"2026-12-02T02:37:15.922252359Z","stream":"S","consumer":"c1",'
        b'"stream_seq":1,"deliveries":2}'
    )
    advisory = MaxDeliveriesAdvisory.model_validate_json(wire)
    assert (advisory.stream, advisory.consumer, advisory.stream_seq, advisory.deliveries) == (
        "S",
        "c1",
        1,
        2,
    )


def test_an_exhausted_dead_letter_is_labelled_exhausted() -> None:
    reason = EXHAUSTED_REASON.format(deliveries=3)
    assert "3 deliveries" in reason
    assert dead_letter_category(reason) == "exhausted"


def test_the_listing_shows_unreadable_letters_too() -> None:
    row = listing_row(11, letter_for(b"{}", sequence=5))
    assert (row["sequence"], row["original_sequence"], row["original_size_bytes"]) == (11, 5, 2)
    json.dumps(row)
    assert str(listing_row(12, None)["reason"]).startswith("unreadable")
