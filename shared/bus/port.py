"""The bus port: what a service needs from the message bus, whatever carries it.

Two adapters implement it with the same semantics: :mod:`.jetstream` (NATS JetStream, the real
one) and :mod:`.memory` (in-process, for fast unit tests of handlers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from torchrelay.shared.bus.outcome import Outcome
from torchrelay.shared.events import AnyEvent

Handler = Callable[[Any], Awaitable[None]]
"""An async function taking one decoded event. Its result decides the ack (see ``outcome``)."""

Publish = Callable[[AnyEvent], Awaitable[bool]]
"""What a service calls to publish (``EventBus.publish``)."""


@dataclass(frozen=True)
class Subscription:
    """A durable consumer shared by every replica of one service for one purpose.

    ``name`` becomes the durable consumer name, so two replicas of a service that declare the
    same subscription split its events between them (work-queue semantics).
    """

    name: str
    events: Sequence[type[AnyEvent]]
    handler: Handler
    max_deliver: int = 5
    ack_wait_s: float = 30.0
    backoff_s: Sequence[float] = (1.0, 5.0, 15.0, 30.0)
    max_in_flight: int = 64
    """Handlers running at once in one replica."""
    prefetch: int | None = None
    """Events one replica holds at once, running or queued; 4 x max_in_flight if unset.
    Fetching ahead pays for fast handlers; set it to max_in_flight for slow ones (a training
    launch, a large copy) so that replicas share the work instead of one hoarding it."""
    heartbeat_s: float | None = None
    """Seconds between in_progress signals for a running handler; ack_wait_s / 3 if unset."""

    def __post_init__(self) -> None:
        if not self.events:
            raise ValueError(f"subscription {self.name!r} names no event type")
        if self.max_deliver < 1 or self.max_in_flight < 1 or self.ack_wait_s <= 0:
            raise ValueError(
                f"subscription {self.name!r}: max_deliver, max_in_flight and ack_wait_s "
                "must be positive"
            )
        if self.prefetch is not None and self.prefetch < self.max_in_flight:
            raise ValueError(
                f"subscription {self.name!r}: prefetch ({self.prefetch}) must be at least "
                f"max_in_flight ({self.max_in_flight})"
            )

    @property
    def subjects(self) -> list[str]:
        return sorted({event.nats_subject for event in self.events})

    @property
    def window(self) -> int:
        """How many events a replica holds at once (prefetch, resolved)."""
        return self.prefetch if self.prefetch is not None else 4 * self.max_in_flight

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else self.ack_wait_s / 3


class Handled(NamedTuple):
    """What happened to one delivery; reported to the bus observer. (A tuple: it is made
    once per event on the hot path, where a frozen dataclass costs microseconds.)"""

    subscription: str
    subject: str
    event_type: str | None
    outcome: Outcome
    duration_s: float
    delivered: int


class BusObserver(Protocol):
    """Receives what the bus did, for metrics. Must not block or raise."""

    def published(self, subject: str, *, duplicate: bool) -> None: ...

    def handled(self, result: Handled) -> None: ...


class NullObserver:
    """Observes nothing; the default when no metrics are wanted."""

    def published(self, subject: str, *, duplicate: bool) -> None:
        return None

    def handled(self, result: Handled) -> None:
        return None


class EventBus(Protocol):
    """Publish events and consume them through durable, shared subscriptions."""

    async def publish(self, event: AnyEvent) -> bool:
        """Store an event once (its id is the dedup key). True if it was new, False if a
        duplicate within the dedup window."""
        ...

    async def provision(self, subscriptions: Sequence[Subscription]) -> None:
        """Create the stream and the durable consumers (idempotent)."""
        ...

    async def consume(self, subscription: Subscription, stop: asyncio.Event) -> None:
        """Handle events until ``stop`` is set, then let in-flight handlers finish; events
        fetched but not started are handed back for redelivery at once."""
        ...
