"""Running one delivery through a handler, the same way in every adapter.

Decode -> bind log context -> handler -> outcome.
The adapter turns the outcome into its own ack, nak or term; cancellation propagates.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import NamedTuple

import structlog

from torchrelay.shared.bus.outcome import Action, Outcome, decide
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.events import AnyEvent, DeadLettered, InvalidEvent, decode
from torchrelay.shared.events.data import DeadLetteredData

log = structlog.get_logger("torchrelay.bus")

# Dead-letter ids derive from (consumer, delivery key): a dead letter re-published after a
# crash is deduplicated by the stream like any other event.
_DEADLETTER_NAMESPACE = uuid.UUID("5f0c5a8e-3c1e-4d7e-9a51-2b1f0e6d7c11")


class Dispatched(NamedTuple):
    event: AnyEvent | None
    outcome: Outcome


async def dispatch(
    subscription: Subscription,
    subject: str,
    payload: bytes,
    delivered: int,
) -> Dispatched:
    """Decode ``payload`` and run the subscription's handler on it; never raises except
    CancelledError (the adapter then hands the event back)."""
    event: AnyEvent | None = None
    error: Exception | None = None
    try:
        event = decode(payload, subject=subject)
    except InvalidEvent as exc:
        error = exc
    if event is not None:
        # bind + reset by token: bound_contextvars() copies the whole context on every call,
        # too slow for the hot path. The consumer name is bound once by the adapter's worker.
        tokens = structlog.contextvars.bind_contextvars(
            event_id=event.id, event_type=event.type, pipeline_id=event.pipelineid
        )
        try:
            await subscription.handler(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the outcome table decides what errors mean
            error = exc
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
    outcome = decide(
        error,
        delivered=delivered,
        max_deliver=subscription.max_deliver,
        backoff_s=subscription.backoff_s,
    )
    if outcome.dead_letter_reason is not None:
        log.warning(
            "event.dead_lettered",
            consumer=subscription.name,
            subject=subject,
            event_id=event.id if event is not None else None,
            reason=outcome.dead_letter_reason,
        )
    elif outcome.action is Action.NAK:
        log.info(
            "event.retry",
            consumer=subscription.name,
            event_id=event.id if event is not None else None,
            delivery=delivered,
            delay_s=outcome.delay_s,
            error=repr(error),
        )
    return Dispatched(event, outcome)


def dead_letter_for(
    subscription: Subscription,
    *,
    subject: str,
    payload: bytes,
    dispatched: Dispatched,
    delivered: int,
    delivery_key: str,
    source: str,
) -> DeadLettered | None:
    """The dead-letter event for a terminated delivery, or None for a dead letter itself
    (never dead-letter a dead letter: that could loop)."""
    event, outcome = dispatched.event, dispatched.outcome
    if outcome.dead_letter_reason is None or isinstance(event, DeadLettered):
        return None
    try:
        text, encoding = payload.decode(), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(payload).decode(), "base64"
    return DeadLettered(
        id=str(uuid.uuid5(_DEADLETTER_NAMESPACE, f"{subscription.name}:{delivery_key}")),
        source=source,
        subject=subscription.name,
        pipelineid=event.pipelineid if event is not None else None,
        causationid=event.id if event is not None else None,
        data=DeadLetteredData(
            original_subject=subject,
            original_type=event.type if event is not None else None,
            original_id=event.id if event is not None else None,
            consumer=subscription.name,
            payload=text,
            payload_encoding=encoding,
            reason=outcome.dead_letter_reason[:512],
            deliveries=delivered,
        ),
    )
