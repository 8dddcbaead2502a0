"""The state port over NATS JetStream KV buckets: compare-and-set on the revision, leases,
per-message TTLs for retention, watches for live views.

Buckets (``pipelines``, ``datasets``, ``runs``, ``models``, ``deployments``, ``monitor``) hold
status and lineage as pydantic models. Every update names the revision it read; a write based
on a stale read raises :class:`StaleRevision` instead of overwriting someone else's change.

Writes go through JetStream publishes with KV's own headers rather than nats-py's
``KeyValue.put/update``, which can neither set a TTL on an update nor roll a key's history up.
Needs nats-server 2.11 or later (per-message TTLs, subject delete markers).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue

from torchrelay.shared.errors import AlreadyExists, LeaseLost, StaleRevision
from torchrelay.shared.state.keys import check_key, check_ttl
from torchrelay.shared.state.port import BUCKETS, LEASE_BUCKET, Lease, M
from torchrelay.shared.state.typed import TypedStore
from torchrelay.shared.state.views import Entry

# How long the server keeps the marker it writes when a TTL removes a key's last value. A
# watcher sees expiries through these markers; one reconnecting within this time still sees
# them (live views also resync). A value written with a shorter TTL lives this long instead:
# the server never removes a value before its marker could be placed.
DEFAULT_MARKER_TTL_S = 300.0
# A watch's consumer: the server's heartbeat while idle (the client restarts a consumer that
# missed two), and how long the server keeps one whose subscriber went away without a word.
_WATCH_HEARTBEAT_S = 5.0
_WATCH_INACTIVE_S = 300.0
# JSStreamWrongLastSequenceErrF and its constant variant: a compare-and-set lost.
_WRONG_LAST = (10071, 10164)


def _ttl_header(ttl_s: float) -> str:
    # nats-py sends str(int(ttl)), truncating 1.5 s to 1 s; a Go duration keeps milliseconds.
    return f"{math.ceil(ttl_s * 1000)}ms"


async def open_bucket(
    js: JetStreamContext,
    bucket: str,
    *,
    history: int = 5,
    replicas: int = 1,
    marker_ttl_s: float | None = None,
) -> KeyValue:
    """Open a KV bucket, creating it on first use (idempotent across replicas).

    The bucket allows per-message TTLs; with ``marker_ttl_s`` the server also marks a key a TTL
    removed, so watchers see the expiry. A bucket created before either existed is upgraded in
    place (a stream config update; the data stays).
    """
    try:
        info = await js.stream_info(f"KV_{bucket}")
    except nats.js.errors.NotFoundError:
        config = api.KeyValueConfig(
            bucket=bucket,
            history=history,
            replicas=replicas,
            storage=api.StorageType.FILE,
            limit_marker_ttl=marker_ttl_s,
        )
        try:
            return await js.create_key_value(config)
        except nats.js.errors.BadRequestError:
            # Another replica created it between our lookup and create.
            return await js.key_value(bucket)
    stream = info.config
    wanted_markers = marker_ttl_s or stream.subject_delete_marker_ttl
    if not stream.allow_msg_ttl or stream.subject_delete_marker_ttl != wanted_markers:
        stream.allow_msg_ttl = True
        stream.subject_delete_marker_ttl = wanted_markers
        await js.update_stream(stream)
    return await js.key_value(bucket)


def _live(msg: api.RawStreamMsg) -> bool:
    """Whether a stored message is a value, not a delete, purge or server marker."""
    headers = msg.headers or {}
    deleted = headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers
    return bool(msg.data) and not deleted


class _Changes:
    """An ordered consumer's messages as :class:`Entry` items, with None once every value that
    was stored when the consumer was created has come (deletes and markers carry no data).

    ``initial`` is the consumer's pending count in the server's answer to its creation: the
    consumer had no subscriber yet, so it had delivered nothing and the count is exactly the
    number of last-per-key messages it delivers first (consumer sequences 1 to ``initial``).
    nats-py's own KV watch reads that count with a later consumer-info request instead; the
    server may have taken every value off the count while none had reached the client yet,
    and the watch then reports the end of the stored values before the values themselves.
    """

    def __init__(
        self,
        sub: JetStreamContext.PushSubscription,
        consumer: str,
        initial: int,
        prefix: str,
        name: str,
    ) -> None:
        self._sub = sub
        self._consumer = consumer
        self._initial = initial
        self._prefix = prefix  # of the subjects, before the key
        self._name = name
        self._told_end = False

    def __aiter__(self) -> _Changes:
        return self

    async def __anext__(self) -> Entry | None:
        if self._initial == 0 and not self._told_end:
            self._told_end = True
            return None
        try:
            msg = await self._sub.next_msg(timeout=None)
        except nats.errors.ConnectionClosedError:
            raise StopAsyncIteration from None
        meta = msg.metadata
        if self._initial:
            if meta.consumer != self._consumer:
                # The client replaced the consumer (a gap, missed heartbeats) before the
                # stored values were in: which of them came is no longer known.
                raise ConnectionError(
                    f"the watch of {self._name} restarted before the stored values came; "
                    "open it again"
                )
            if meta.sequence.consumer >= self._initial:
                self._initial = 0
        headers = msg.headers or {}
        gone = (
            headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers or not msg.data
        )
        key = msg.subject[len(self._prefix) :]
        return Entry(key, None if gone else msg.data, meta.sequence.stream)


class KvBucket:
    """A bucket's byte-level operations, shared by typed stores and leases."""

    def __init__(self, kv: KeyValue, bucket: str) -> None:
        self.kv = kv
        self.bucket = bucket
        self._js: JetStreamContext = kv._js  # nats-py's KeyValue keeps no public handle
        self._stream = f"KV_{bucket}"

    def _subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    async def last(self, key: str) -> api.RawStreamMsg | None:
        """The key's last message, markers included; None when the subject holds nothing."""
        try:
            msg: api.RawStreamMsg = await self._js.get_msg(
                self._stream, subject=self._subject(key), direct=self.kv._direct
            )
        except nats.js.errors.NotFoundError:
            return None
        return msg

    async def read(self, key: str) -> Entry | None:
        msg = await self.last(key)
        if msg is None or not _live(msg):
            return None
        return Entry(key, msg.data, msg.seq or 0)

    async def publish(self, key: str, data: bytes, *, last: int | None, ttl_s: float | None) -> int:
        """One write; nats' APIError as it comes (a lost compare-and-set included)."""
        headers: dict[str, str] = {}
        if last is not None:
            headers[api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(last)
        if ttl_s is not None:
            headers[api.Header.MSG_TTL] = _ttl_header(ttl_s)
            # Earlier revisions go now: when the TTL removes this one, none of them resurfaces.
            headers[api.Header.ROLLUP] = "sub"
        ack = await self._js.publish(self._subject(key), data, headers=headers or None)
        return int(ack.seq)

    async def write(self, key: str, data: bytes, *, last: int | None, ttl_s: float | None) -> int:
        """See :meth:`TypedStore._write`."""
        check_ttl(ttl_s)
        try:
            return await self.publish(key, data, last=last, ttl_s=ttl_s)
        except nats.js.errors.APIError as exc:
            if exc.err_code not in _WRONG_LAST:
                raise
            if last != 0:
                raise StaleRevision(self.bucket, key, last) from exc
            conflict = exc
        # A create found a message: a value (it exists), or a delete or expiry marker, which
        # a create may replace (nats-py's own create knows its delete markers, not the
        # server's expiry markers).
        found = await self.last(key)
        if found is not None and not _live(found):
            with contextlib.suppress(StaleRevision):
                return await self.write(key, data, last=found.seq, ttl_s=ttl_s)
        raise AlreadyExists(self.bucket, key) from conflict

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        headers = {KV_OP: KV_DEL}
        if revision is not None:
            headers[api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(revision)
        try:
            await self._js.publish(self._subject(key), b"", headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST:
                raise StaleRevision(self.bucket, key, revision) from exc
            raise

    async def keys(self, pattern: str) -> list[str]:
        """Keys matching ``pattern`` that hold a value now. The server lists the subjects
        (stream info with a subject filter), and each one's last message says whether it is
        a value or a delete. Not a watch: nats-py's watch can report the end of the stored
        values before the first of them reaches it (its pending count is read after the
        server has sent them), and a listing must not come back empty for that."""
        info = await self._js.stream_info(self._stream, subjects_filter=self._subject(pattern))
        prefix = self._subject("")
        found = []
        for subject in sorted((info.state.subjects or {}).keys()):
            key = subject[len(prefix) :]
            msg = await self.last(key)
            if msg is not None and _live(msg):
                found.append(key)
        return found

    @contextlib.asynccontextmanager
    async def feed(self, pattern: str) -> AsyncIterator[AsyncIterator[Entry | None]]:
        """The last value (or delete) of each key matching ``pattern``, then each change: an
        ordered push consumer (the client resumes it after a reconnect), created before
        anything subscribes to it so that its creation says how many values it holds."""
        config = api.ConsumerConfig(
            deliver_subject=self._js._nc.new_inbox(),
            filter_subject=self._subject(pattern),
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=api.AckPolicy.NONE,
            flow_control=True,
            idle_heartbeat=_WATCH_HEARTBEAT_S,
            inactive_threshold=_WATCH_INACTIVE_S,
            mem_storage=True,
            num_replicas=1,
        )
        info = await self._js.add_consumer(self._stream, config=config)
        try:
            sub = await self._js.subscribe_bind(
                self._stream, config, info.name, ordered_consumer=True
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(self._stream, info.name)
            raise
        try:
            initial = info.num_pending or 0
            name = f"{self.bucket}/{pattern}"
            yield _Changes(sub, info.name, initial, self._subject(""), name)
        finally:
            # The connection may be gone (closed, or down): nothing is left to stop then, and
            # the server drops the consumer once it has had no subscriber for a while.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            # The client replaces the consumer after a gap and names the new one on the
            # subscription; the one it replaced is left to the server, so both go.
            for name in sorted({info.name, sub._consumer}):
                if self._js._nc.is_connected:
                    with contextlib.suppress(Exception):
                        await self._js.delete_consumer(self._stream, name)


class KvStore(TypedStore[M]):
    """One bucket of one model type, in NATS JetStream KV."""

    def __init__(self, kv: KeyValue, model: type[M], bucket: str) -> None:
        super().__init__(model, bucket)
        self._bucket = KvBucket(kv, bucket)

    async def _read(self, key: str) -> Entry | None:
        return await self._bucket.read(key)

    async def _write(self, key: str, data: bytes, *, last: int | None, ttl_s: float | None) -> int:
        return await self._bucket.write(key, data, last=last, ttl_s=ttl_s)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        await self._bucket.delete(check_key(key), revision=revision)

    async def keys(self, prefix: str = "") -> list[str]:
        return await self._bucket.keys(self._pattern(prefix))

    def _feed(
        self, pattern: str
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Entry | None]]:
        return self._bucket.feed(pattern)


class KvLeases:
    """Exclusive, expiring ownership of a name (one replica restarts a run, not two).

    A lease is a key whose message carries a per-message TTL: the server removes it when the
    holder stops renewing, so a crashed holder never blocks the others for longer than the TTL.
    """

    def __init__(self, kv: KeyValue, bucket: str = LEASE_BUCKET) -> None:
        self._bucket = KvBucket(kv, bucket)

    async def acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        payload = json.dumps({"holder": holder}).encode()
        try:
            revision = await self._bucket.write(check_key(name), payload, last=0, ttl_s=ttl_s)
        except AlreadyExists:
            return None
        return Lease(name, holder, revision, ttl_s)

    async def renew(self, lease: Lease) -> Lease:
        payload = json.dumps({"holder": lease.holder}).encode()
        try:
            revision = await self._bucket.publish(
                lease.name, payload, last=lease.revision, ttl_s=lease.ttl_s
            )
        except nats.js.errors.APIError as exc:
            raise LeaseLost(f"lease {lease.name} held by {lease.holder} was lost") from exc
        return Lease(lease.name, lease.holder, revision, lease.ttl_s)

    async def holder(self, name: str) -> str | None:
        entry = await self._bucket.read(check_key(name))
        if entry is None or entry.data is None:
            return None
        held: str = json.loads(entry.data)["holder"]
        return held

    async def release(self, lease: Lease) -> None:
        with contextlib.suppress(StaleRevision):
            await self._bucket.delete(lease.name, revision=lease.revision)


class KvState:
    """All of torchrelay's buckets in NATS JetStream KV, opened once per service."""

    def __init__(self, kvs: dict[str, KeyValue]) -> None:
        self._kvs = kvs
        self.leases = KvLeases(kvs[LEASE_BUCKET])

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        *,
        replicas: int = 1,
        marker_ttl_s: float = DEFAULT_MARKER_TTL_S,
    ) -> KvState:
        """Open (creating or upgrading) every bucket. ``marker_ttl_s``: see
        :data:`DEFAULT_MARKER_TTL_S`; the lease bucket has no markers, so a lease's TTL is
        exact."""
        kvs = {
            name: await open_bucket(js, name, replicas=replicas, marker_ttl_s=marker_ttl_s)
            for name in BUCKETS
        }
        kvs[LEASE_BUCKET] = await open_bucket(js, LEASE_BUCKET, history=1, replicas=replicas)
        return cls(kvs)

    def store(self, bucket: str, model: type[M]) -> KvStore[M]:
        if bucket not in self._kvs or bucket == LEASE_BUCKET:
            known = sorted(set(self._kvs) - {LEASE_BUCKET})
            raise KeyError(f"unknown bucket {bucket!r}; known: {known}")
        return KvStore(self._kvs[bucket], model, bucket)
