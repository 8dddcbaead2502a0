"""Dead letters: a bounded record of an event the bus gave up on, and where its original is.

A dead letter never carries the whole original: an original near NATS's max payload would make
its dead letter too large to publish, and the event would be lost with no trace. It names the
original instead (subject, stream sequence, ``Nats-Msg-Id``, size, sha256, type and id when it
decoded) and keeps a 1 KiB prefix of it; the original stays in the stream for the stream's
retention period, where ``torchrelay deadletters replay SEQ`` finds it.

Two paths write dead letters, with the same id for the same (consumer, stream sequence), so
the stream stores one even if both happen: the adapter, when a handler's outcome is to give
up (:func:`torchrelay.shared.bus.dispatch.dead_letter_for`), and JetStream's max-deliveries
advisory, when a handler's process died during the last allowed delivery
(:meth:`torchrelay.shared.bus.jetstream.JetStreamBus.consume_exhausted`).

Pure: no I/O here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from torchrelay.shared.errors import TorchrelayError
from torchrelay.shared.events import (
    DEADLETTER_SUBJECT,
    AnyEvent,
    DeadLettered,
    InvalidEvent,
    decode,
)
from torchrelay.shared.events.data import DeadLetteredData

PREFIX_MAX_BYTES = 1024
"""How much of the original a dead letter keeps."""
_TEXT_MAX_CHARS = 512  # NonEmpty's bound: reasons, subjects and ids are cut to it

# Dead-letter ids derive from (consumer, stream sequence): a dead letter re-published after a
# crash, or written by both the handler path and the advisory path, is deduplicated by the
# stream like any other event.
_DEADLETTER_NAMESPACE = uuid.UUID("5f0c5a8e-3c1e-4d7e-9a51-2b1f0e6d7c11")

EXHAUSTED_REASON = (
    "exhausted: the handler did not finish its last allowed delivery ({deliveries} deliveries)"
)


class ReplayRefused(TorchrelayError):
    """An original was not replayed; the message says why and what to do next."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message as the stream holds it."""

    sequence: int
    subject: str
    payload: bytes
    msg_id: str | None = None
    """The ``Nats-Msg-Id`` header, if it had one."""
    headers: dict[str, str] | None = None
    stored_at: datetime | None = None


def is_dead_letter_subject(subject: str) -> bool:
    """Nothing on the dead-letter subject is ever dead-lettered itself: that could loop."""
    return subject == DEADLETTER_SUBJECT


def dead_letter_id(consumer: str, sequence: int) -> str:
    """The dead letter's event id: the same whichever path, process or replica writes it."""
    return str(uuid.uuid5(_DEADLETTER_NAMESPACE, f"{consumer}:{sequence}"))


def payload_prefix(payload: bytes) -> tuple[str, Literal["utf-8", "base64"]]:
    """At most :data:`PREFIX_MAX_BYTES` of ``payload``: as text when it is UTF-8 that stays
    about that size in JSON, else as base64 (a control character escapes to 6 bytes)."""
    head = payload[:PREFIX_MAX_BYTES]
    encoded = base64.b64encode(head).decode()
    text = _utf8(head, cut=len(payload) > len(head))
    if text is not None and len(json.dumps(text, ensure_ascii=False).encode()) <= len(encoded):
        return text, "utf-8"
    return encoded, "base64"


def _utf8(head: bytes, *, cut: bool) -> str | None:
    # Cutting may have split a multi-byte character: then drop its first bytes (at most 3).
    for drop in range(4 if cut else 1):
        try:
            return head[: len(head) - drop].decode()
        except UnicodeDecodeError:
            continue
    return None


def build_dead_letter(
    original: StoredMessage,
    *,
    consumer: str,
    reason: str,
    deliveries: int,
    source: str,
    event: AnyEvent | None = None,
) -> DeadLettered:
    """The dead letter for ``original``, given up on by ``consumer``; ``event`` is the
    original decoded, if it decoded. A few KiB at most, whatever the original's size."""
    prefix, encoding = payload_prefix(original.payload)
    msg_id = original.msg_id or (event.id if event is not None else None)
    return DeadLettered(
        id=dead_letter_id(consumer, original.sequence),
        source=source,
        subject=consumer,
        pipelineid=event.pipelineid if event is not None else None,
        causationid=event.id if event is not None else None,
        data=DeadLetteredData(
            original_subject=original.subject[:_TEXT_MAX_CHARS],
            original_sequence=original.sequence,
            original_msg_id=msg_id[:_TEXT_MAX_CHARS] if msg_id else None,
            original_type=event.type if event is not None else None,
            original_id=event.id if event is not None else None,
            original_size_bytes=len(original.payload),
            original_sha256=hashlib.sha256(original.payload).hexdigest(),
            original_prefix=prefix,
            original_prefix_encoding=encoding,
            original_truncated=len(original.payload) > PREFIX_MAX_BYTES,
            consumer=consumer,
            reason=reason[:_TEXT_MAX_CHARS] or "no reason given",
            deliveries=max(deliveries, 1),
        ),
    )


def decode_quietly(original: StoredMessage) -> AnyEvent | None:
    """The original as an event, or None when it does not decode (a dead letter names it
    all the same)."""
    try:
        return decode(original.payload, subject=original.subject)
    except InvalidEvent:
        return None


class MaxDeliveriesAdvisory(BaseModel):
    """JetStream's ``io.nats.jetstream.advisory.v1.max_deliver``, on
    ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>``: a message reached the
    consumer's max deliveries without being acked or terminated. Only the fields we use; the
    server may add more."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    stream: str = Field(min_length=1)
    consumer: str = Field(min_length=1)
    stream_seq: int = Field(ge=1)
    deliveries: int = Field(ge=1)


def listing_row(sequence: int, letter: DeadLettered | None) -> dict[str, object]:
    """One dead letter as ``torchrelay deadletters`` shows it (None: a letter that does not
    decode, an older version)."""
    if letter is None:
        return {"sequence": sequence, "reason": "unreadable: not a v2 dead letter"}
    data = letter.data
    return {
        "sequence": sequence,
        "time": letter.time.isoformat(),
        "reason": data.reason,
        "consumer": data.consumer,
        "deliveries": data.deliveries,
        "original_subject": data.original_subject,
        "original_type": data.original_type,
        "original_id": data.original_id,
        "original_msg_id": data.original_msg_id,
        "original_sequence": data.original_sequence,
        "original_size_bytes": data.original_size_bytes,
        "original_sha256": data.original_sha256,
    }
