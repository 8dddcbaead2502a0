"""Running one delivery through a handler, the same way in every adapter.

Decode -> bind log context -> handler -> outcome.
The adapter turns the outcome into its own ack, nak or term; cancellation propagates.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

import structlog

from torchrelay.shared.bus.deadletters import (
    StoredMessage,
    build_dead_letter,
    is_dead_letter_subject,
)
from torchrelay.shared.bus.outcome import Action, Outcome, decide
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.events import AnyEvent, DeadLettered, InvalidEvent, decode

log = structlog.get_logger("torchrelay.bus")


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
    if outcome.dead_letter_reason is not None and is_dead_letter_subject(subject):
        log.error(
            "deadletter.dropped",
            consumer=subscription.name,
            event_id=event.id if event is not None else None,
            reason=outcome.dead_letter_reason,
        )
    elif outcome.dead_letter_reason is not None:
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
    original: StoredMessage,
    dispatched: Dispatched,
    delivered: int,
    source: str,
) -> DeadLettered | None:
    """The dead-letter event for a terminated delivery of ``original``, or None for anything
    on the dead-letter subject (never dead-letter a dead letter: that could loop)."""
    event, outcome = dispatched.event, dispatched.outcome
    if outcome.dead_letter_reason is None or is_dead_letter_subject(original.subject):
        return None
    return build_dead_letter(
        original,
        consumer=subscription.name,
        reason=outcome.dead_letter_reason,
        deliveries=delivered,
        source=source,
        event=event,
    )
