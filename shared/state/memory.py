"""The state port in one process's memory, for fast tests of handlers and the CLI.

Faithful to the NATS adapter where callers can tell (the contract suite runs against both):
revisions grow per bucket, deletes and expiries take a revision like JetStream's markers,
compare-and-set raises the same errors, keys follow NATS's rules, TTLs run on
``time.monotonic`` and watchers see expiries. Values are kept as JSON bytes, so several models
can share a bucket and a corrupt value (:meth:`MemoryState.put_raw`) fails the same way. The
NATS adapter may keep a value past its TTL up to its marker TTL; this one removes it on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from torchrelay.shared.errors import AlreadyExists, LeaseLost, StaleRevision
from torchrelay.shared.state.keys import check_key, check_ttl
from torchrelay.shared.state.port import BUCKETS, LEASE_BUCKET, Lease, M
from torchrelay.shared.state.typed import TypedStore
from torchrelay.shared.state.views import Entry


@dataclass(frozen=True, slots=True)
class _Value:
    data: bytes
    revision: int
    expires_at: float | None  # time.monotonic()


def _matches(pattern: str, key: str) -> bool:
    if pattern == ">":
        return True
    if pattern.endswith(".>"):
        return key.startswith(pattern[:-1])
    return key == pattern


class _Watch:
    _END = Entry("", None, -1)

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.queue: asyncio.Queue[Entry | None] = asyncio.Queue()

    def __aiter__(self) -> _Watch:
        return self

    async def __anext__(self) -> Entry | None:
        entry = await self.queue.get()
        if entry is self._END:
            raise StopAsyncIteration
        return entry


class MemoryBucket:
    """One bucket's byte-level state: live values, each key's last revision, watchers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._revision = 0
        self._values: dict[str, _Value] = {}
        self._last: dict[str, int] = {}  # each key's last message: a value, delete or marker
        self._watches: list[_Watch] = []

    def _next(self) -> int:
        self._revision += 1
        return self._revision

    def _notify(self, entry: Entry) -> None:
        for watch in self._watches:
            if _matches(watch.pattern, entry.key):
                watch.queue.put_nowait(entry)

    def expire(self) -> None:
        """Remove what outlived its TTL, each with a marker revision that watchers see."""
        now = time.monotonic()
        due = [
            key
            for key, value in self._values.items()
            if value.expires_at is not None and value.expires_at <= now
        ]
        for key in sorted(due, key=lambda k: self._values[k].revision):
            del self._values[key]
            self._last[key] = revision = self._next()
            self._notify(Entry(key, None, revision))

    def read(self, key: str) -> Entry | None:
        self.expire()
        value = self._values.get(key)
        return None if value is None else Entry(key, value.data, value.revision)

    def write(self, key: str, data: bytes, *, last: int | None, ttl_s: float | None) -> int:
        check_ttl(ttl_s)
        self.expire()
        if last == 0 and key in self._values:
            raise AlreadyExists(self.name, key)
        if last not in (None, 0) and last != self._last.get(key, 0):
            raise StaleRevision(self.name, key, last)
        revision = self._next()
        expires_at = None
        if ttl_s is not None:
            expires_at = time.monotonic() + ttl_s
            asyncio.get_running_loop().call_later(ttl_s, self.expire)
        self._values[key] = _Value(data, revision, expires_at)
        self._last[key] = revision
        self._notify(Entry(key, data, revision))
        return revision

    def delete(self, key: str, *, revision: int | None) -> None:
        self.expire()
        if revision is not None and revision != self._last.get(key, 0):
            raise StaleRevision(self.name, key, revision)
        self._values.pop(key, None)
        self._last[key] = marker = self._next()
        self._notify(Entry(key, None, marker))

    def keys(self, pattern: str) -> list[str]:
        self.expire()
        return sorted(key for key in self._values if _matches(pattern, key))

    @contextlib.asynccontextmanager
    async def feed(self, pattern: str) -> AsyncIterator[AsyncIterator[Entry | None]]:
        self.expire()
        watch = _Watch(pattern)
        current = sorted(
            (Entry(k, v.data, v.revision) for k, v in self._values.items() if _matches(pattern, k)),
            key=lambda entry: entry.revision,
        )
        for entry in current:
            watch.queue.put_nowait(entry)
        watch.queue.put_nowait(None)
        self._watches.append(watch)
        try:
            yield watch
        finally:
            self._watches.remove(watch)
            watch.queue.put_nowait(_Watch._END)


class MemoryStore(TypedStore[M]):
    """One bucket of one model type, in memory."""

    def __init__(self, bucket: MemoryBucket, model: type[M]) -> None:
        super().__init__(model, bucket.name)
        self._bucket = bucket

    async def _read(self, key: str) -> Entry | None:
        return self._bucket.read(key)

    async def _write(self, key: str, data: bytes, *, last: int | None, ttl_s: float | None) -> int:
        return self._bucket.write(key, data, last=last, ttl_s=ttl_s)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        self._bucket.delete(check_key(key), revision=revision)

    async def keys(self, prefix: str = "") -> list[str]:
        return self._bucket.keys(self._pattern(prefix))

    def _feed(
        self, pattern: str
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Entry | None]]:
        return self._bucket.feed(pattern)


class MemoryLeases:
    """Leases in memory: a key with a TTL, as in :class:`~torchrelay.shared.state.kv.KvLeases`."""

    def __init__(self, bucket: MemoryBucket) -> None:
        self._bucket = bucket

    async def acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        payload = json.dumps({"holder": holder}).encode()
        try:
            revision = self._bucket.write(check_key(name), payload, last=0, ttl_s=ttl_s)
        except AlreadyExists:
            return None
        return Lease(name, holder, revision, ttl_s)

    async def renew(self, lease: Lease) -> Lease:
        payload = json.dumps({"holder": lease.holder}).encode()
        try:
            revision = self._bucket.write(
                lease.name, payload, last=lease.revision, ttl_s=lease.ttl_s
            )
        except StaleRevision as exc:
            raise LeaseLost(f"lease {lease.name} held by {lease.holder} was lost") from exc
        return Lease(lease.name, lease.holder, revision, lease.ttl_s)

    async def holder(self, name: str) -> str | None:
        entry = self._bucket.read(check_key(name))
        if entry is None or entry.data is None:
            return None
        held: str = json.loads(entry.data)["holder"]
        return held

    async def release(self, lease: Lease) -> None:
        with contextlib.suppress(StaleRevision):
            self._bucket.delete(lease.name, revision=lease.revision)


class MemoryState:
    """All of torchrelay's buckets in memory; nothing is shared across processes."""

    def __init__(self, buckets: Iterable[str] = BUCKETS) -> None:
        self._buckets = {name: MemoryBucket(name) for name in buckets}
        self.leases = MemoryLeases(MemoryBucket(LEASE_BUCKET))

    def store(self, bucket: str, model: type[M]) -> MemoryStore[M]:
        if bucket not in self._buckets:
            raise KeyError(f"unknown bucket {bucket!r}; known: {sorted(self._buckets)}")
        return MemoryStore(self._buckets[bucket], model)

    def put_raw(self, bucket: str, key: str, data: bytes) -> int:
        """Store bytes as they are (a foreign or broken writer), for tests."""
        return self._buckets[bucket].write(check_key(key), data, last=None, ttl_s=None)

    def drop(self, bucket: str, key: str) -> None:
        """Delete ``key`` whoever holds it (``leases`` included), for tests: a lease deleted
        from under its holder, an operator's cleanup."""
        target = self.leases._bucket if bucket == LEASE_BUCKET else self._buckets[bucket]
        target.delete(check_key(key), revision=None)
