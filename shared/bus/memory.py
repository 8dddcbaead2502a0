"""An in-process bus with the JetStream adapter's semantics, for fast unit tests of handlers.

Same outcome table (through :func:`dispatch`), same dedup by event id, work-queue delivery per
subscription name, redelivery with the nak delay, stream sequences (from 1, in publishing order),
bounded dead letters published on the bus that name their original by that sequence. It keeps
no state across processes and is never used by a running service.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from torchrelay.shared.bus.deadletters import StoredMessage
from torchrelay.shared.bus.dispatch import dead_letter_for, dispatch
from torchrelay.shared.bus.outcome import Action
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.events import AnyEvent


@dataclass(frozen=True, slots=True)
class _Delivery:
    sequence: int
    subject: str
    payload: bytes
    msg_id: str | None
    delivered: int

    def stored(self) -> StoredMessage:
        headers = {"Nats-Msg-Id": self.msg_id} if self.msg_id else None
        return StoredMessage(self.sequence, self.subject, self.payload, self.msg_id, headers)


class MemoryBus:
    """The bus port in memory. ``published`` lists every stored event, in order."""

    def __init__(self, *, source: str = "/torchrelay/test") -> None:
        self._source = source
        self._seen_ids: set[str] = set()
        self._sequence = itertools.count(1)
        self._queues: dict[str, asyncio.Queue[_Delivery]] = {}
        self._subjects: dict[str, frozenset[str]] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._stored: list[_Delivery] = []  # the stream: every stored delivery, in order
        self._busy = 0
        self.published: list[AnyEvent] = []

    async def publish(self, event: AnyEvent) -> bool:
        if event.id in self._seen_ids:
            return False
        self._seen_ids.add(event.id)
        self.published.append(event)
        self._fan_out(event.nats_subject, event.to_json(), event.id)
        return True

    async def publish_raw(self, subject: str, payload: bytes, msg_id: str | None = None) -> int:
        """Put bytes on a subject as a foreign publisher would (malformed ones included), with
        an optional Nats-Msg-Id (deduplicated like an event id). Returns the stream sequence,
        or 0 for a duplicate."""
        if msg_id is not None:
            if msg_id in self._seen_ids:
                return 0
            self._seen_ids.add(msg_id)
        return self._fan_out(subject, payload, msg_id)

    async def message_at(self, sequence: int) -> StoredMessage | None:
        """The message stored at ``sequence``, as :meth:`JetStreamBus.message_at`."""
        if 1 <= sequence <= len(self._stored):
            return self._stored[sequence - 1].stored()
        return None

    def _fan_out(self, subject: str, payload: bytes, msg_id: str | None) -> int:
        delivery = _Delivery(next(self._sequence), subject, payload, msg_id, 1)
        self._stored.append(delivery)
        for name, subjects in self._subjects.items():
            if subject in subjects:
                self._queues[name].put_nowait(delivery)
        return delivery.sequence

    async def provision(self, subscriptions: Sequence[Subscription]) -> None:
        for subscription in subscriptions:
            if subscription.name in self._queues:
                continue
            self._queues[subscription.name] = asyncio.Queue()
            self._subjects[subscription.name] = frozenset(subscription.subjects)
            # DeliverPolicy.ALL: a new consumer sees what was stored before it.
            for delivery in self._stored:
                if delivery.subject in self._subjects[subscription.name]:
                    self._queues[subscription.name].put_nowait(delivery)

    async def consume(self, subscription: Subscription, stop: asyncio.Event) -> None:
        await self.provision([subscription])
        with structlog.contextvars.bound_contextvars(consumer=subscription.name):
            await self._consume(subscription, self._queues[subscription.name], stop)

    async def _consume(
        self, subscription: Subscription, queue: asyncio.Queue[_Delivery], stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(0.05):
                    delivery = await queue.get()
            except TimeoutError:
                continue
            self._busy += 1
            try:
                dispatched = await dispatch(
                    subscription, delivery.subject, delivery.payload, delivery.delivered
                )
            except asyncio.CancelledError:
                queue.put_nowait(delivery)
                raise
            finally:
                self._busy -= 1
            outcome = dispatched.outcome
            if outcome.action is Action.NAK:
                self._redeliver(queue, delivery, outcome.delay_s)
            elif outcome.action is Action.TERM:
                dead_letter = dead_letter_for(
                    subscription,
                    original=delivery.stored(),
                    dispatched=dispatched,
                    delivered=delivery.delivered,
                    source=self._source,
                )
                if dead_letter is not None:
                    await self.publish(dead_letter)

    def _redeliver(
        self, queue: asyncio.Queue[_Delivery], delivery: _Delivery, delay: float
    ) -> None:
        again = _Delivery(
            delivery.sequence,
            delivery.subject,
            delivery.payload,
            delivery.msg_id,
            delivery.delivered + 1,
        )
        handle = asyncio.get_running_loop().call_later(delay, queue.put_nowait, again)
        self._timers.add(handle)

    def close(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()

    def _settled(self, name: str) -> bool:
        now = asyncio.get_running_loop().time()
        self._timers = {h for h in self._timers if not h.cancelled() and h.when() > now}
        return self._queues[name].empty() and not self._timers and not self._busy

    async def run_until_idle(self, subscription: Subscription, *, poll_s: float = 0.01) -> None:
        """Consume until the queue is empty, no handler runs and no redelivery is pending."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.consume(subscription, stop))
        await asyncio.sleep(0)
        while not self._settled(subscription.name):  # noqa: ASYNC110 - polls three conditions
            await asyncio.sleep(poll_s)
        stop.set()
        await task
