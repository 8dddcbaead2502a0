"""The state port: what handlers, the CLI and the runtime may ask of state, whatever holds it.

Two adapters implement it: :mod:`.kv` over NATS JetStream KV buckets (every service), and
:mod:`.memory` in one process (fast tests of handlers). One contract suite runs against both
(``tests/integration/test_state_contract.py``).

Semantics every adapter keeps:

- a bucket holds pydantic models as JSON under keys that NATS KV accepts (:func:`check_key`);
- every write gets a revision; revisions grow within a bucket, across its keys;
- ``create`` refuses an existing key (:class:`AlreadyExists`), ``update`` and ``delete`` with a
  revision refuse when the key moved on (:class:`StaleRevision`);
- a write with ``ttl_s`` is removed by the server about ``ttl_s`` later, together with the key's
  earlier revisions (a finished record is retained, then it goes);
- a value that does not parse as the model raises :class:`CorruptState`;
- a lease is a key with a TTL: one holder until it expires, is released or is lost.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from pydantic import BaseModel

from torchrelay.shared.errors import PermanentError

if TYPE_CHECKING:
    from torchrelay.shared.state.views import LiveView

M = TypeVar("M", bound=BaseModel)

BUCKETS = ("pipelines", "datasets", "runs", "models", "deployments", "monitor", "sweeps")
LEASE_BUCKET = "leases"

# A retention period in seconds, or a rule giving it from the value being written (None: keep).
Retention = float | Callable[[M], float | None] | None


@dataclass(frozen=True, slots=True)
class Versioned(Generic[M]):
    """A value together with the revision it was read at."""

    key: str
    value: M
    revision: int


@dataclass(frozen=True, slots=True)
class Lease:
    name: str
    holder: str
    revision: int
    ttl_s: float


class CorruptState(PermanentError):
    """A stored value does not parse as its model (written by a foreign or older writer)."""


class Store(Protocol[M]):
    """One bucket seen as one model type (several models may share a bucket under distinct key
    prefixes)."""

    bucket: str

    async def get(self, key: str) -> Versioned[M] | None:
        """The value and its revision, or None when the key is absent, deleted or expired."""
        ...

    async def create(self, key: str, value: M, *, ttl_s: float | None = None) -> int:
        """Store a new key and return its revision; :class:`AlreadyExists` if it is there."""
        ...

    async def put(self, key: str, value: M, *, ttl_s: float | None = None) -> int:
        """Overwrite unconditionally (last writer wins); prefer :meth:`update`. With ``ttl_s``
        the key (all its revisions) is removed ``ttl_s`` seconds later."""
        ...

    async def update(self, key: str, value: M, *, revision: int, ttl_s: float | None = None) -> int:
        """Write only if the key is still at ``revision``; :class:`StaleRevision` otherwise."""
        ...

    async def mutate(
        self,
        key: str,
        change: Callable[[M | None], M | None],
        *,
        attempts: int = 10,
        ttl_s: Retention[M] = None,
    ) -> Versioned[M] | None:
        """Read, apply ``change`` (pure: the new value, or None for no write), compare-and-set,
        and re-read on conflict. ``ttl_s`` is a retention period or a rule giving it from the
        new value (e.g. only once the record is finished). Returns what is stored afterwards;
        :class:`StaleRevision` after ``attempts`` lost races."""
        ...

    async def delete(self, key: str, *, revision: int | None = None) -> None:
        """Delete the key (only if still at ``revision`` when given: :class:`StaleRevision`)."""
        ...

    async def keys(self, prefix: str = "") -> list[str]:
        """Sorted keys, or only those under ``prefix.``."""
        ...

    async def items(self, prefix: str = "") -> list[Versioned[M]]:
        """Every value, sorted by key, or only those under ``prefix.``."""
        ...

    def watch_key(
        self, key: str
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Versioned[M] | None]]:
        """Follow one key: ``async with store.watch_key(k) as updates: async for item in
        updates``. The first item is the current value (None when absent), then every change
        (None when deleted or expired). Leaving the block stops the watch."""
        ...

    def live(
        self,
        predicate: Callable[[M], bool] = lambda _: True,
        *,
        prefix: str = "",
        resync_s: float = 300.0,
    ) -> LiveView[M]:
        """An in-memory view of the values (under ``prefix.``) for which ``predicate`` holds,
        kept current by a watch: reading it costs no request. Use ``async with`` (or
        ``start``/``stop``); see :class:`~torchrelay.shared.state.views.LiveView`."""
        ...


class Leases(Protocol):
    """Exclusive, expiring ownership of a name (one replica restarts a run, not two)."""

    async def acquire(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take the lease if nobody holds it; None when another holder has it."""
        ...

    async def renew(self, lease: Lease) -> Lease:
        """Extend the lease by its TTL; :class:`LeaseLost` if it expired or changed hands."""
        ...

    async def holder(self, name: str) -> str | None:
        """Who holds the lease now, or None when nobody does (never taken, released, expired)."""
        ...

    async def release(self, lease: Lease) -> None:
        """Give the lease up; a lease already lost is not an error."""
        ...


class State(Protocol):
    """All of torchrelay's buckets, opened once per service."""

    @property
    def leases(self) -> Leases: ...

    def store(self, bucket: str, model: type[M]) -> Store[M]:
        """The bucket ``bucket`` seen as ``model``; KeyError for a bucket that is not known."""
        ...
