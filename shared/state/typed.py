"""What every state adapter shares: JSON models over bytes, mutate's retry loop, watches.

An adapter subclasses :class:`TypedStore` and supplies the bucket operations on bytes; the
rest of the :class:`~torchrelay.shared.state.port.Store` port is built here once, so both
adapters agree on it by construction.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Generic

from pydantic import ValidationError

from torchrelay.shared.errors import AlreadyExists, StaleRevision
from torchrelay.shared.state.keys import check_key
from torchrelay.shared.state.port import CorruptState, M, Retention, Versioned
from torchrelay.shared.state.views import Entry, KeyUpdates, LiveView


class TypedStore(abc.ABC, Generic[M]):
    """One bucket of one model type; subclasses provide the byte-level operations."""

    def __init__(self, model: type[M], bucket: str) -> None:
        self._model = model
        self.bucket = bucket

    # -- what an adapter provides -------------------------------------------------------------

    @abc.abstractmethod
    async def _read(self, key: str) -> Entry | None:
        """The key's current entry, or None when absent, deleted or expired."""

    @abc.abstractmethod
    async def _write(self, key: str, data: bytes, *, last: int | None, ttl_s: float | None) -> int:
        """Store ``data``; ``last`` None: unconditionally, 0: only if the key holds no value
        (:class:`AlreadyExists`), else only if at that revision (:class:`StaleRevision`)."""

    @abc.abstractmethod
    async def delete(self, key: str, *, revision: int | None = None) -> None: ...

    @abc.abstractmethod
    async def keys(self, prefix: str = "") -> list[str]: ...

    @abc.abstractmethod
    def _feed(
        self, pattern: str
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Entry | None]]:
        """Follow the keys matching ``pattern`` (a key, ``prefix.>`` or ``>``): the current
        entries, None, then each change."""

    # -- the port, built on those ---------------------------------------------------------------

    def _decode(self, key: str, raw: bytes) -> M:
        try:
            return self._model.model_validate_json(raw)
        except ValidationError as exc:
            raise CorruptState(
                f"{self.bucket}/{key} does not parse as {self._model.__name__}: "
                f"{exc.error_count()} problem(s), first {exc.errors()[0]['msg']}"
            ) from exc

    @staticmethod
    def _encode(value: M) -> bytes:
        return value.model_dump_json().encode()

    async def get(self, key: str) -> Versioned[M] | None:
        entry = await self._read(check_key(key))
        if entry is None or entry.data is None:
            return None
        return Versioned(key, self._decode(key, entry.data), entry.revision)

    async def create(self, key: str, value: M, *, ttl_s: float | None = None) -> int:
        return await self._write(check_key(key), self._encode(value), last=0, ttl_s=ttl_s)

    async def put(self, key: str, value: M, *, ttl_s: float | None = None) -> int:
        return await self._write(check_key(key), self._encode(value), last=None, ttl_s=ttl_s)

    async def update(self, key: str, value: M, *, revision: int, ttl_s: float | None = None) -> int:
        if revision <= 0:
            raise ValueError(f"revision must be > 0 (use create for a new key), got {revision}")
        return await self._write(check_key(key), self._encode(value), last=revision, ttl_s=ttl_s)

    async def mutate(
        self,
        key: str,
        change: Callable[[M | None], M | None],
        *,
        attempts: int = 10,
        ttl_s: Retention[M] = None,
    ) -> Versioned[M] | None:
        for _ in range(attempts):
            current = await self.get(key)
            new = change(current.value if current else None)
            if new is None:
                return current
            retention = ttl_s(new) if callable(ttl_s) else ttl_s
            try:
                if current is None:
                    revision = await self.create(key, new, ttl_s=retention)
                else:
                    revision = await self.update(
                        key, new, revision=current.revision, ttl_s=retention
                    )
            except (AlreadyExists, StaleRevision):
                continue
            return Versioned(key, new, revision)
        raise StaleRevision(self.bucket, key, None)

    @staticmethod
    def _pattern(prefix: str) -> str:
        return f"{check_key(prefix)}.>" if prefix else ">"

    async def items(self, prefix: str = "") -> list[Versioned[M]]:
        """What the keys under ``prefix`` hold now, each read on its own (a one-shot listing;
        loops that look again and again follow a :meth:`live` view instead)."""
        found = []
        for key in await self.keys(prefix):
            item = await self.get(key)
            if item is not None:
                found.append(item)
        return found

    @contextlib.asynccontextmanager
    async def watch_key(self, key: str) -> AsyncIterator[AsyncIterator[Versioned[M] | None]]:
        async with self._feed(check_key(key)) as changes:
            yield KeyUpdates(key, changes, self._decode)

    def live(
        self,
        predicate: Callable[[M], bool] = lambda _: True,
        *,
        prefix: str = "",
        resync_s: float = 300.0,
    ) -> LiveView[M]:
        pattern = self._pattern(prefix)
        return LiveView(
            lambda: self._feed(pattern),
            self._decode,
            predicate,
            name=f"{self.bucket}/{prefix or '*'}",
            resync_s=resync_s,
        )
