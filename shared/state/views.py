"""Following state as it changes: one key (:class:`KeyUpdates`), or a filtered view of a bucket
kept in memory (:class:`LiveView`). Adapter-neutral: an adapter supplies a *feed*, the changes
of the keys it matches as :class:`Entry` items, with None once after the current values."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Generic

import structlog

from torchrelay.shared.state.port import CorruptState, M, Versioned

log = structlog.get_logger("torchrelay.state")


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored change as an adapter reports it: ``data`` None means deleted or expired."""

    key: str
    data: bytes | None
    revision: int


# Opens a feed: the current entries, then None (once), then each change as it lands. None comes
# only once every entry stored when the feed opened has come (never on a guess about what is
# still on its way), so what precedes it is a complete snapshot.
Feed = Callable[[], contextlib.AbstractAsyncContextManager[AsyncIterator[Entry | None]]]
Decode = Callable[[str, bytes], M]


class KeyUpdates(Generic[M]):
    """One key's value now (None when absent), then after each change (None when gone)."""

    def __init__(self, key: str, changes: AsyncIterator[Entry | None], decode: Decode[M]) -> None:
        self._key = key
        self._changes = changes
        self._decode = decode
        self._started = False

    def __aiter__(self) -> KeyUpdates[M]:
        return self

    async def __anext__(self) -> Versioned[M] | None:
        if not self._started:
            self._started = True
            current: Entry | None = None
            async for entry in self._changes:
                if entry is None:  # the end of what is stored now
                    break
                current = entry
            return self._versioned(current)
        async for entry in self._changes:
            if entry is not None:
                return self._versioned(entry)
        raise StopAsyncIteration

    def _versioned(self, entry: Entry | None) -> Versioned[M] | None:
        if entry is None or entry.data is None:
            return None
        return Versioned(entry.key, self._decode(entry.key, entry.data), entry.revision)


class LiveView(Generic[M]):
    """The values of a bucket (under a prefix) for which ``predicate`` holds, in memory.

    A background task follows the bucket with a watch: the current values first, then every
    write; deletes and expiries, and values that stop matching, leave the view. Reading it
    (:meth:`values`, :meth:`items`, :meth:`get`) sends no request. Every ``resync_s`` the
    watch is replaced by a fresh one and the view by its snapshot, so nothing a reconnect
    missed (an expiry marker that lapsed while the connection was down) outlives a resync;
    between resyncs the NATS client's ordered consumer resumes where it stopped. A feed that
    fails is reopened after ``retry_s`` (logged); only a failure before the first snapshot
    reaches :meth:`start`. A value that does not parse is logged and left out.
    """

    def __init__(
        self,
        feed: Feed,
        decode: Decode[M],
        predicate: Callable[[M], bool],
        *,
        name: str,
        resync_s: float = 300.0,
        retry_s: float = 1.0,
    ) -> None:
        if resync_s <= 0 or retry_s <= 0:
            raise ValueError(f"resync_s and retry_s must be > 0, got {resync_s}, {retry_s}")
        self._feed = feed
        self._decode = decode
        self._predicate = predicate
        self.name = name
        self._resync_s = resync_s
        self._retry_s = retry_s
        self._items: dict[str, Versioned[M]] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.resyncs = 0  # snapshots taken so far, for tests and metrics

    async def start(self) -> None:
        """Start following; return once the view holds the current values."""
        if self._task is not None:
            raise RuntimeError(f"live view {self.name} is already started")
        self._task = asyncio.create_task(self._run(), name=f"live:{self.name}")
        ready = asyncio.create_task(self._ready.wait(), name=f"live:{self.name}:ready")
        try:
            await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ready
        if self._task.done():
            self._task.result()  # the first snapshot failed: raise why

    async def stop(self) -> None:
        """Stop following (idempotent); the view keeps what it last held."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> LiveView[M]:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def values(self) -> list[M]:
        return [item.value for item in self.items()]

    def items(self) -> list[Versioned[M]]:
        """The matching values with their revisions, sorted by key."""
        return [self._items[key] for key in sorted(self._items)]

    def get(self, key: str) -> Versioned[M] | None:
        return self._items.get(key)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    async def _run(self) -> None:
        while True:
            try:
                await self._follow_once()
            except Exception as exc:
                if not self._ready.is_set():
                    raise
                log.warning("state.live.feed_failed", view=self.name, error=repr(exc))
                await asyncio.sleep(self._retry_s)

    async def _follow_once(self) -> None:
        async with self._feed() as changes:
            snapshot: dict[str, Versioned[M]] = {}
            async for entry in changes:
                if entry is None:
                    break
                self._apply(snapshot, entry)
            else:
                raise ConnectionError(f"live view {self.name}: the watch ended early")
            self._items = snapshot
            self.resyncs += 1
            self._ready.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._resync_s):
                    async for entry in changes:
                        if entry is not None:
                            self._apply(self._items, entry)
                    raise ConnectionError(f"live view {self.name}: the watch ended")

    def _apply(self, items: dict[str, Versioned[M]], entry: Entry) -> None:
        if entry.data is None:
            items.pop(entry.key, None)
            return
        try:
            value = self._decode(entry.key, entry.data)
        except CorruptState as exc:
            log.warning("state.live.unreadable", view=self.name, key=entry.key, error=str(exc))
            items.pop(entry.key, None)
            return
        if self._predicate(value):
            items[entry.key] = Versioned(entry.key, value, entry.revision)
        else:
            items.pop(entry.key, None)
