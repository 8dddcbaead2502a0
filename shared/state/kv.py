"""Typed state over NATS JetStream KV buckets: compare-and-set on the revision, and leases.

Buckets (``pipelines``, ``datasets``, ``runs``, ``models``, ``deployments``) hold status and
lineage as pydantic models. Every update names the revision it read; a write based on a stale
read raises :class:`StaleRevision` instead of overwriting someone else's change.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from pydantic import BaseModel, ValidationError

from torchrelay.shared.errors import AlreadyExists, LeaseLost, PermanentError, StaleRevision

BUCKETS = ("pipelines", "datasets", "runs", "models", "deployments", "monitor")
LEASE_BUCKET = "leases"

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Versioned(Generic[M]):
    """A value together with the revision it was read at."""

    key: str
    value: M
    revision: int


class CorruptState(PermanentError):
    """A stored value does not parse as its model (written by a foreign or older writer)."""


async def open_bucket(
    js: JetStreamContext, bucket: str, *, history: int = 5, replicas: int = 1
) -> KeyValue:
    """Open a KV bucket, creating it on first use (idempotent across replicas)."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    config = api.KeyValueConfig(
        bucket=bucket, history=history, replicas=replicas, storage=api.StorageType.FILE
    )
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:
        # Another replica created it between our lookup and create.
        return await js.key_value(bucket)


class Store(Generic[M]):
    """One bucket of one model type."""

    def __init__(self, kv: KeyValue, model: type[M], bucket: str) -> None:
        self._kv = kv
        self._model = model
        self.bucket = bucket

    def _decode(self, key: str, raw: bytes | None) -> M:
        try:
            return self._model.model_validate_json(raw or b"")
        except ValidationError as exc:
            raise CorruptState(
                f"{self.bucket}/{key} does not parse as {self._model.__name__}: "
                f"{exc.error_count()} problem(s), first {exc.errors()[0]['msg']}"
            ) from exc

    async def get(self, key: str) -> Versioned[M] | None:
        try:
            entry = await self._kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return Versioned(key, self._decode(key, entry.value), entry.revision or 0)

    async def create(self, key: str, value: M) -> int:
        """Store a new key; :class:`AlreadyExists` if it is there."""
        try:
            return int(await self._kv.create(key, value.model_dump_json().encode()))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise AlreadyExists(self.bucket, key) from exc

    async def put(self, key: str, value: M) -> int:
        """Overwrite unconditionally (last writer wins); prefer :meth:`update`."""
        return int(await self._kv.put(key, value.model_dump_json().encode()))

    async def update(self, key: str, value: M, *, revision: int) -> int:
        """Write only if the key is still at ``revision``; :class:`StaleRevision` otherwise."""
        try:
            return int(await self._kv.update(key, value.model_dump_json().encode(), last=revision))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise StaleRevision(self.bucket, key, revision) from exc

    async def mutate(
        self, key: str, change: Callable[[M | None], M | None], *, attempts: int = 10
    ) -> Versioned[M] | None:
        """Read, apply ``change`` (pure: returns the new value, or None for no write), and
        compare-and-set, re-reading on conflict. Returns what is stored afterwards."""
        for _ in range(attempts):
            current = await self.get(key)
            new = change(current.value if current else None)
            if new is None:
                return current
            try:
                if current is None:
                    revision = await self.create(key, new)
                else:
                    revision = await self.update(key, new, revision=current.revision)
            except (AlreadyExists, StaleRevision):
                continue
            return Versioned(key, new, revision)
        raise StaleRevision(self.bucket, key, None)

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        try:
            await self._kv.delete(key, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise StaleRevision(self.bucket, key, revision) from exc

    async def keys(self, prefix: str = "") -> list[str]:
        """Keys, or only those under ``prefix.``; the server does the filtering (nats-py's own
        ``keys(filters=...)`` lists every key and matches substrings client-side)."""
        watcher = await self._kv.watch(
            f"{prefix}.>" if prefix else ">", ignore_deletes=True, meta_only=True
        )
        found = []
        try:
            async for entry in watcher:
                if entry is None:  # the end of what is stored now
                    break
                found.append(entry.key)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return sorted(found)

    async def items(self, prefix: str = "") -> list[Versioned[M]]:
        found = []
        for key in await self.keys(prefix):
            item = await self.get(key)
            if item is not None:
                found.append(item)
        return found


@dataclass(frozen=True, slots=True)
class Lease:
    name: str
    holder: str
    revision: int
    ttl_s: float


class Leases:
    """Exclusive, expiring ownership of a name (one replica restarts a run, not two).

    A lease is a key whose message carries a per-message TTL: the server removes it when the
    holder stops renewing, so a crashed holder never blocks the others for longer than the TTL.
    """

    def __init__(self, js: JetStreamContext, kv: KeyValue, bucket: str = LEASE_BUCKET) -> None:
        self._js = js
        self._kv = kv
        self._bucket = bucket

    async def acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take the lease if nobody holds it; None when another holder has it."""
        payload = json.dumps({"holder": holder}).encode()
        try:
            revision = await self._kv.create(name, payload, msg_ttl=ttl_s)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        return Lease(name, holder, int(revision), ttl_s)

    async def renew(self, lease: Lease) -> Lease:
        """Extend the lease by its TTL; :class:`LeaseLost` if it expired or changed hands."""
        try:
            ack = await self._js.publish(
                f"$KV.{self._bucket}.{lease.name}",
                json.dumps({"holder": lease.holder}).encode(),
                headers={api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(lease.revision)},
                msg_ttl=lease.ttl_s,
            )
        except nats.js.errors.APIError as exc:
            raise LeaseLost(f"lease {lease.name} held by {lease.holder} was lost") from exc
        return Lease(lease.name, lease.holder, int(ack.seq), lease.ttl_s)

    async def holder(self, name: str) -> str | None:
        """Who holds the lease now, or None when nobody does (never taken, released, expired)."""
        try:
            entry = await self._kv.get(name)
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        held: str = json.loads(entry.value)["holder"]
        return held

    async def release(self, lease: Lease) -> None:
        """Give the lease up; a lease already lost is not an error."""
        try:
            await self._kv.delete(lease.name, last=lease.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return


class State:
    """All of torchrelay's buckets, opened once per service."""

    def __init__(self, js: JetStreamContext, kvs: dict[str, KeyValue]) -> None:
        self._js = js
        self._kvs = kvs
        self.leases = Leases(js, kvs[LEASE_BUCKET])

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int = 1) -> State:
        kvs = {name: await open_bucket(js, name, replicas=replicas) for name in BUCKETS}
        kvs[LEASE_BUCKET] = await open_bucket(js, LEASE_BUCKET, history=1, replicas=replicas)
        return cls(js, kvs)

    def store(self, bucket: str, model: type[M]) -> Store[M]:
        if bucket not in self._kvs:
            raise KeyError(f"unknown bucket {bucket!r}; known: {sorted(self._kvs)}")
        return Store(self._kvs[bucket], model, bucket)


def key_part(text: str) -> str:
    """Make ``text`` safe inside a KV key (NATS allows ``[-/_=.A-Za-z0-9]``): other characters
    become ``=XX`` hex escapes, and ``.`` too, since it separates key parts."""
    safe = []
    for char in text:
        if char.isascii() and (char.isalnum() or char in "-_"):
            safe.append(char)
        else:
            safe.extend(f"={byte:02X}" for byte in char.encode())
    return "".join(safe)
