"""The NATS JetStream adapter of the bus port.

One stream over ``torchrelay.>`` (file storage, duplicate window: an event id is stored once);
one durable pull consumer per subscription, shared by every replica of the service. Outcomes
map to acks in one place, :func:`torchrelay.shared.bus.outcome.decide`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from pydantic import BaseModel, ConfigDict, Field

from torchrelay.shared.bus.dispatch import Dispatched, dead_letter_for, dispatch
from torchrelay.shared.bus.outcome import Action
from torchrelay.shared.bus.port import BusObserver, Handled, NullObserver, Subscription
from torchrelay.shared.events import ALL_SUBJECTS, AnyEvent

log = structlog.get_logger("torchrelay.bus")

_STREAM_CONFIG_CONFLICT = 10058
_BURST_FETCH_TIMEOUT_S = 0.05


class StreamSettings(BaseModel):
    """The JetStream stream that carries every torchrelay event."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(default="TORCHRELAY", pattern=r"^[A-Za-z0-9_-]+$")
    duplicate_window_s: float = Field(
        default=120.0, gt=0, description="Seconds an event id is remembered for deduplication."
    )
    max_age_s: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="Seconds events are kept; replay horizon."
    )
    replicas: int = Field(default=1, ge=1, le=5, description="Stream replicas in a NATS cluster.")
    publish_timeout_s: float = Field(default=5.0, gt=0)
    fetch_timeout_s: float = Field(
        default=1.0, gt=0, description="Longest idle pull; bounds how fast a stop is noticed."
    )


class JetStreamBus:
    """Publishes and consumes torchrelay events through NATS JetStream."""

    def __init__(
        self,
        nc: NatsClient,
        settings: StreamSettings | None = None,
        *,
        source: str = "/torchrelay",
        observer: BusObserver | None = None,
    ) -> None:
        self._nc = nc
        self.settings = settings or StreamSettings()
        self._js = nc.jetstream(timeout=self.settings.publish_timeout_s)
        self._source = source
        self._observer: BusObserver = observer or NullObserver()

    @property
    def nc(self) -> NatsClient:
        return self._nc

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """Drain the connection (flushing the acks and naks of finished handlers), then close.
        Idempotent; never raises."""
        if self._nc.is_closed:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self._nc.drain()
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            log.warning("nats.drain_failed", error=repr(exc))
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._nc.close()

    # --- provisioning -------------------------------------------------------------------------

    def _stream_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.settings.name,
            subjects=[ALL_SUBJECTS],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            duplicate_window=self.settings.duplicate_window_s,
            max_age=self.settings.max_age_s,
            num_replicas=self.settings.replicas,
        )

    async def ensure_stream(self) -> None:
        """Create the stream, or bring an existing one to this configuration."""
        config = self._stream_config()
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _STREAM_CONFIG_CONFLICT:
                raise
            await self._js.update_stream(config)

    async def provision(self, subscriptions: Sequence[Subscription]) -> None:
        await self.ensure_stream()
        for subscription in subscriptions:
            await self._js.add_consumer(self.settings.name, _consumer_config(subscription))

    async def stream_ready(self) -> bool:
        """True when connected and the stream exists; what /readyz asks."""
        if not self._nc.is_connected:
            return False
        try:
            await self._js.stream_info(self.settings.name)
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    # --- publishing ---------------------------------------------------------------------------

    async def publish(self, event: AnyEvent) -> bool:
        ack = await self._js.publish(
            event.nats_subject,
            event.to_json(),
            stream=self.settings.name,
            headers={"Nats-Msg-Id": event.id},
        )
        self._observer.published(event.nats_subject, duplicate=bool(ack.duplicate))
        return not ack.duplicate

    # --- consuming ----------------------------------------------------------------------------

    async def consume(self, subscription: Subscription, stop: asyncio.Event) -> None:
        psub = await self._js.pull_subscribe_bind(
            durable=subscription.name, stream=self.settings.name
        )
        consumer = _Consumer(self._handle_safely, subscription, psub, stop, self.settings)
        try:
            await consumer.run()
        finally:
            with contextlib.suppress(nats.errors.Error):
                await psub.unsubscribe()

    async def _handle_safely(
        self, subscription: Subscription, msg: Msg, in_progress: dict[str, tuple[Msg, float]]
    ) -> None:
        try:
            await self._handle(subscription, msg, in_progress)
        except (nats.errors.Error, OSError) as exc:
            # The ack could not be sent (connection lost): JetStream redelivers after ack_wait.
            log.warning("event.ack_failed", consumer=subscription.name, error=repr(exc))

    async def _handle(
        self, subscription: Subscription, msg: Msg, in_progress: dict[str, tuple[Msg, float]]
    ) -> None:
        started = time.perf_counter()
        delivery = _delivery(msg)
        delivered = delivery.delivered
        try:
            dispatched = await dispatch(subscription, msg.subject, msg.data, delivered)
        except asyncio.CancelledError:
            # Stopping before the grace period let it finish: redeliver now rather than after
            # ack_wait. Handlers are idempotent, so a rerun is safe.
            await msg.nak()
            raise
        finally:
            in_progress.pop(msg.reply, None)
        await self._apply(subscription, msg, delivery, dispatched)
        self._observer.handled(
            Handled(
                subscription=subscription.name,
                subject=msg.subject,
                event_type=dispatched.event.type if dispatched.event is not None else None,
                outcome=dispatched.outcome,
                duration_s=time.perf_counter() - started,
                delivered=delivered,
            )
        )

    async def _apply(
        self, subscription: Subscription, msg: Msg, delivery: _Delivery, dispatched: Dispatched
    ) -> None:
        outcome = dispatched.outcome
        if outcome.action is Action.ACK:
            await msg.ack()
            return
        if outcome.action is Action.NAK:
            await msg.nak(delay=outcome.delay_s)
            return
        dead_letter = dead_letter_for(
            subscription,
            subject=msg.subject,
            payload=msg.data,
            dispatched=dispatched,
            delivered=delivery.delivered,
            delivery_key=str(delivery.stream_sequence),
            source=self._source,
        )
        if dead_letter is not None:
            try:
                await self.publish(dead_letter)
            except (nats.errors.Error, TimeoutError) as exc:
                # The dead letter is not stored: keep the event rather than lose it.
                log.error("deadletter.publish_failed", error=repr(exc))  # noqa: TRY400
                await msg.nak(delay=subscription.backoff_s[-1] if subscription.backoff_s else 1)
                return
        await msg.term()


class _Delivery(NamedTuple):
    delivered: int
    stream_sequence: int
    pending: int


def _delivery(msg: Msg) -> _Delivery:
    """Delivery count, stream sequence and pending count from the JetStream ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``,
    or with ``<domain>.<account hash>`` after ``ACK`` (12+ tokens). Parsing just these three
    costs a fraction of ``msg.metadata``, which also builds a datetime, on the hot path.
    """
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:
        offset = 4
    elif len(tokens) >= 12:
        offset = 6
    else:
        metadata = msg.metadata  # let nats-py raise its own error for a non-JetStream reply
        return _Delivery(
            metadata.num_delivered, metadata.sequence.stream, metadata.num_pending or 0
        )
    return _Delivery(int(tokens[offset]), int(tokens[offset + 1]), int(tokens[offset + 4]))


def _consumer_config(subscription: Subscription) -> api.ConsumerConfig:
    subjects = subscription.subjects
    return api.ConsumerConfig(
        durable_name=subscription.name,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=subscription.ack_wait_s,
        max_deliver=subscription.max_deliver,
        deliver_policy=api.DeliverPolicy.ALL,
        filter_subject=subjects[0] if len(subjects) == 1 else None,
        filter_subjects=subjects if len(subjects) > 1 else None,
        max_ack_pending=max(1000, subscription.window * 4),
    )


async def _keep_alive(started: dict[str, tuple[Msg, float]], interval_s: float) -> None:
    """Tell JetStream that handlers running longer than ``interval_s`` are still working, so
    ack_wait never redelivers them. One ticker per consumer, not a task per message."""
    while True:
        await asyncio.sleep(interval_s / 2)
        horizon = time.monotonic() - interval_s
        for reply, (msg, since) in list(started.items()):
            if since <= horizon:
                started[reply] = (msg, time.monotonic())
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()


class _Consumer:
    """Leader/follower workers over one pull subscription.

    ``max_in_flight`` workers; an idle worker with nothing queued becomes the fetcher (one at a
    time, under a lock), keeps the first message of what it fetched and queues the rest for the
    others. The event that woke the fetcher is handled at once, with no hand-off to another task,
    and a worker with queued events drains them without a context switch.

    nats-py's fetch(n > 1) long-polls until n messages or the timeout, so a lone event would
    wait out the whole timeout: the fetcher long-polls for one message while idle and, when the
    last delivery says more are pending, takes up to that many at once (served without waiting)
    with a short timeout in case another replica took them first.
    """

    def __init__(
        self,
        handle: Callable[[Subscription, Msg, dict[str, tuple[Msg, float]]], Awaitable[None]],
        subscription: Subscription,
        psub: JetStreamContext.PullSubscription,
        stop: asyncio.Event,
        settings: StreamSettings,
    ) -> None:
        self._handle = handle
        self._settings = settings
        self._subscription = subscription
        self._psub = psub
        self._stop = stop
        self._queue: collections.deque[Msg] = collections.deque()
        self._fetching = asyncio.Lock()
        self._busy = 0
        self._pending = 0
        self.started: dict[str, tuple[Msg, float]] = {}

    async def run(self) -> None:
        workers = [
            asyncio.create_task(self._work(), name=f"handler:{self._subscription.name}:{i}")
            for i in range(self._subscription.max_in_flight)
        ]
        heartbeat = asyncio.create_task(
            _keep_alive(self.started, self._subscription.heartbeat_interval_s),
            name="in-progress",
        )
        try:
            # Workers return once stop is set and their current event is done; the runtime
            # bounds this with its grace period and cancels us after it.
            await asyncio.gather(*workers)
        finally:
            heartbeat.cancel()
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, heartbeat, return_exceptions=True)
            # Fetched but never started: hand back at once so another replica takes them.
            while self._queue:
                msg = self._queue.popleft()
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak()

    async def _work(self) -> None:
        # A worker task has its own context: bind the consumer for every log line it makes.
        structlog.contextvars.bind_contextvars(consumer=self._subscription.name)
        while not self._stop.is_set():
            msg = self._queue.popleft() if self._queue else await self._fetch()
            if msg is None:
                continue
            self._busy += 1
            try:
                await self._handle(self._subscription, msg, self.started)
            finally:
                self._busy -= 1

    async def _fetch(self) -> Msg | None:
        async with self._fetching:
            if self._queue:  # another worker fetched while this one waited for the lock
                return self._queue.popleft()
            if self._stop.is_set():
                return None
            # This worker is idle, so there is room for at least one.
            room = self._subscription.window - len(self._queue) - self._busy
            batch = min(room, self._pending) if self._pending > 0 else 1
            timeout = (
                _BURST_FETCH_TIMEOUT_S if self._pending > 0 else self._settings.fetch_timeout_s
            )
            try:
                messages = await self._psub.fetch(batch=batch, timeout=timeout)
            except (nats.errors.TimeoutError, TimeoutError):
                self._pending = 0
                return None
            if not messages:
                return None
            self._pending = _delivery(messages[-1]).pending
            now = time.monotonic()
            for msg in messages:
                self.started[msg.reply] = (msg, now)
            if self._stop.is_set():
                self._queue.extend(messages)  # handed back by run()
                return None
            self._queue.extend(messages[1:])
            return messages[0]
