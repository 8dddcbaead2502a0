"""The NATS JetStream adapter of the bus port.

One stream over ``torchrelay.>`` (file storage, duplicate window: an event id is stored once);
one durable pull consumer per subscription, shared by every replica of the service. Outcomes
map to acks in one place, :func:`torchrelay.shared.bus.outcome.decide`.

Beside it, a small stream ``<stream>_ADVISORIES`` keeps JetStream's max-deliveries advisories
for the main stream, so that an event whose handler died on its last allowed delivery still
becomes a dead letter (:meth:`JetStreamBus.consume_exhausted`). Dead letters are read and
their originals replayed from here too (:meth:`JetStreamBus.dead_letters`,
:meth:`JetStreamBus.replay`).
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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from torchrelay.shared.bus.deadletters import (
    EXHAUSTED_REASON,
    MaxDeliveriesAdvisory,
    ReplayRefused,
    StoredMessage,
    build_dead_letter,
    decode_quietly,
    is_dead_letter_subject,
)
from torchrelay.shared.bus.dispatch import Dispatched, dead_letter_for, dispatch
from torchrelay.shared.bus.outcome import Action
from torchrelay.shared.bus.port import BusObserver, Handled, NullObserver, Subscription
from torchrelay.shared.events import ALL_SUBJECTS, DEADLETTER_SUBJECT, AnyEvent, DeadLettered

log = structlog.get_logger("torchrelay.bus")

_STREAM_CONFIG_CONFLICT = 10058
_NO_MESSAGE_FOUND = 10037
_BURST_FETCH_TIMEOUT_S = 0.05
_MSG_ID = "Nats-Msg-Id"


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
    advisories_max_age_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="Seconds a max-deliveries advisory waits in <name>_ADVISORIES for the "
        "monitor to turn it into a dead letter; a monitor down longer loses it.",
    )

    @property
    def advisories_stream(self) -> str:
        """The stream of max-deliveries advisories about this stream's consumers."""
        return f"{self.name}_ADVISORIES"

    @property
    def advisories_subject(self) -> str:
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.name}.>"


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

    def _advisories_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.settings.advisories_stream,
            subjects=[self.settings.advisories_subject],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            max_age=self.settings.advisories_max_age_s,
            num_replicas=self.settings.replicas,
        )

    async def ensure_stream(self) -> None:
        """Create the stream and its advisories stream, or bring existing ones to this
        configuration."""
        for config in (self._stream_config(), self._advisories_config()):
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
            original=StoredMessage(
                delivery.stream_sequence,
                msg.subject,
                msg.data,
                msg.headers.get(_MSG_ID) if msg.headers else None,
            ),
            dispatched=dispatched,
            delivered=delivery.delivered,
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

    # --- dead letters -------------------------------------------------------------------------

    async def message_at(self, sequence: int) -> StoredMessage | None:
        """The message the stream stores at ``sequence`` (JetStream STREAM.MSG.GET), or None
        when it holds none there (any more: retention removes the oldest)."""
        if sequence < 1:
            return None
        try:
            raw = await self._js.get_msg(self.settings.name, seq=sequence)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code != _NO_MESSAGE_FOUND:
                raise  # the stream itself is missing: not an answer about one message
            return None
        return _stored(raw, sequence)

    async def dead_letters(self) -> list[tuple[int, DeadLettered | None]]:
        """Every dead letter the stream holds, oldest first, with its stream sequence; None
        for one that does not decode (an older version). One request per dead letter: there
        should be few, and reading them leaves no consumer behind."""
        found: list[tuple[int, DeadLettered | None]] = []
        sequence = 1
        while True:
            try:
                raw = await self._js.get_msg(
                    self.settings.name, seq=sequence, subject=DEADLETTER_SUBJECT, next=True
                )
            except nats.js.errors.NotFoundError as exc:
                if exc.err_code != _NO_MESSAGE_FOUND:
                    raise
                return found
            stored = _stored(raw, sequence)
            letter = decode_quietly(stored)
            found.append((stored.sequence, letter if isinstance(letter, DeadLettered) else None))
            sequence = stored.sequence + 1

    async def republish(self, original: StoredMessage) -> Republished:
        """Publish a stored message again on its subject, with its payload and its
        ``Nats-Msg-Id``: JetStream deduplicates the copy while that id is within the stream's
        duplicate window (then ``duplicate`` is True and nothing new is stored)."""
        headers = {
            name: value
            for name, value in (original.headers or {}).items()
            if name == _MSG_ID or not name.startswith("Nats-")  # server-side controls stay
        }
        ack = await self._js.publish(
            original.subject, original.payload, stream=self.settings.name, headers=headers or None
        )
        return Republished(ack.seq, bool(ack.duplicate))

    async def replay(self, sequence: int) -> Republished:
        """Republish the original stored at ``sequence`` (a dead letter's
        ``original_sequence``) for its consumers to handle again, once its cause is fixed.

        Raises :class:`ReplayRefused` when the stream no longer holds it, when ``sequence`` is
        a dead letter itself, or when JetStream deduplicated the copy (its id is still within
        the duplicate window).
        """
        original = await self.message_at(sequence)
        config = (await self._js.stream_info(self.settings.name)).config
        if original is None:
            raise ReplayRefused(
                f"stream {self.settings.name} holds no message at sequence {sequence}: it keeps "
                f"messages for {config.max_age or 0:g}s and this one is gone (or never was); "
                "there is nothing to replay"
            )
        if is_dead_letter_subject(original.subject):
            letter = decode_quietly(original)
            hint = (
                f"; its original is at sequence {letter.data.original_sequence}: "
                f"torchrelay deadletters replay {letter.data.original_sequence}"
                if isinstance(letter, DeadLettered)
                else ""
            )
            raise ReplayRefused(f"sequence {sequence} is a dead letter, not an original{hint}")
        copy = await self.republish(original)
        if copy.duplicate:
            raise ReplayRefused(
                f"not replayed: JetStream deduplicated the copy of sequence {sequence}, its "
                f"Nats-Msg-Id {original.msg_id} is still within the stream's "
                f"{config.duplicate_window or 0:g}s duplicate window; replay it again once "
                "the window has passed"
            )
        log.info(
            "deadletter.replayed",
            subject=original.subject,
            msg_id=original.msg_id,
            original_sequence=sequence,
            sequence=copy.sequence,
        )
        return copy

    async def consume_exhausted(self, stop: asyncio.Event, *, durable: str) -> None:
        """Turn max-deliveries advisories into dead letters until ``stop`` is set.

        When a handler's process dies (or hangs) during an event's last allowed delivery, no
        outcome runs and no dead letter is written; JetStream gives up on the event and
        publishes an advisory, which ``<stream>_ADVISORIES`` keeps. JetStream notices the
        exhausted event when its consumer is next pulled from: as soon as another replica of
        that service, or the restarted one, pulls. ``durable`` is one pull consumer shared by
        every replica running this loop, so each advisory is handled once; the dead letter's
        id is the one the handler path would have used, so the stream stores one even if
        both happen. An advisory is acked only once its dead letter is stored.
        """
        stream = self.settings.advisories_stream
        await self._js.add_consumer(
            stream,
            api.ConsumerConfig(
                durable_name=durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=30.0,
                max_deliver=-1,  # an advisory waits for its dead letter however long NATS is away
                deliver_policy=api.DeliverPolicy.ALL,
            ),
        )
        psub = await self._js.pull_subscribe_bind(durable=durable, stream=stream)
        structlog.contextvars.bind_contextvars(consumer=durable)
        try:
            while not stop.is_set():
                try:
                    messages = await psub.fetch(batch=1, timeout=self.settings.fetch_timeout_s)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                except nats.errors.Error as exc:
                    # Connection trouble: the client reconnects on its own; try again soon.
                    log.warning("advisory.fetch_failed", error=repr(exc))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await stop.wait()
                    continue
                for msg in messages:
                    await self._dead_letter_exhausted(msg)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await psub.unsubscribe()

    async def _dead_letter_exhausted(self, msg: Msg) -> None:
        try:
            advisory = MaxDeliveriesAdvisory.model_validate_json(msg.data)
        except ValidationError as exc:
            log.error("advisory.unreadable", error=str(exc)[:512], subject=msg.subject)  # noqa: TRY400
            await _settle(msg.term())
            return
        about = {
            "exhausted_consumer": advisory.consumer,
            "stream_sequence": advisory.stream_seq,
            "deliveries": advisory.deliveries,
        }
        if advisory.stream != self.settings.name:
            log.warning("advisory.other_stream", stream=advisory.stream, **about)
            await _settle(msg.ack())
            return
        try:
            original = await self.message_at(advisory.stream_seq)
            if original is None:
                # Retention (or a purge) removed it before we got here: only a log can say so.
                log.error("deadletter.original_gone", **about)
                await _settle(msg.ack())
                return
            if is_dead_letter_subject(original.subject):
                log.warning("deadletter.not_dead_lettered", subject=original.subject, **about)
                await _settle(msg.ack())
                return
            event = decode_quietly(original)
            letter = build_dead_letter(
                original,
                consumer=advisory.consumer,
                reason=EXHAUSTED_REASON.format(deliveries=advisory.deliveries),
                deliveries=advisory.deliveries,
                source=self._source,
                event=event,
            )
            stored = await self.publish(letter)
        except (nats.errors.Error, TimeoutError) as exc:
            # Not stored: keep the advisory and try again.
            log.error("deadletter.publish_failed", error=repr(exc), **about)  # noqa: TRY400
            await _settle(msg.nak(delay=5.0))
            return
        log.warning(
            "event.dead_lettered",
            subject=original.subject,
            event_id=event.id if event is not None else None,
            reason=letter.data.reason,
            duplicate=not stored,
            **about,
        )
        await _settle(msg.ack())


class Republished(NamedTuple):
    sequence: int
    """Where the copy is stored; for a duplicate, where the message with its id is."""
    duplicate: bool


def _stored(raw: api.RawStreamMsg, sequence: int) -> StoredMessage:
    headers = dict(raw.headers or {})
    return StoredMessage(
        sequence=raw.seq or sequence,
        subject=raw.subject or "",
        payload=raw.data or b"",
        msg_id=headers.get(_MSG_ID),
        headers=headers or None,
        stored_at=raw.time,
    )


async def _settle(action: Awaitable[None]) -> None:
    """Ack, nak or term an advisory; if that fails (connection lost), JetStream redelivers it
    after ack_wait and the dead letter's id makes a second one a duplicate."""
    try:
        await action
    except (nats.errors.Error, OSError) as exc:
        log.warning("advisory.ack_failed", error=repr(exc))


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
