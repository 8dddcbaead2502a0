"""Dynamic batching: requests that arrive while the model is busy run together.

A lone request (no other in flight) on an idle model runs at once, on the event loop itself:
a hand-off to a thread costs more than a small model's forward pass. Under load, whatever
queued during the previous batch runs as the next one on a worker thread, up to
``max_batch_size`` rows, optionally waiting up to ``max_delay_s`` for more. The queue is
bounded: when full, :class:`Overloaded` is raised at once (HTTP 503 with Retry-After) instead
of growing memory and latency.

The model is swappable (:meth:`DynamicBatcher.swap`) between two batches: each batch takes the
model once, when it starts, and every answer carries the model that computed it, so no request
sees a mixed state and each response can name its true version.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

Array = np.ndarray[Any, Any]


class Predictor(Protocol):
    def predict(self, batch: Array) -> Array: ...


M = TypeVar("M", bound=Predictor)


class Overloaded(Exception):
    """The queue is full; try again shortly."""


class DynamicBatcher(Generic[M]):
    def __init__(
        self,
        model: M,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.model = model
        """The model the next batch runs on (see :meth:`swap`)."""
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: collections.deque[tuple[Array, asyncio.Future[tuple[Array, M]]]] = (
            collections.deque()
        )
        self._arrived = asyncio.Event()
        self._busy = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    def swap(self, model: M) -> None:
        """Run every later batch on ``model``; a batch already running ends on the old one
        (and its answers say so)."""
        self.model = model

    async def infer(self, array: Array, *, alone: bool = False) -> tuple[Array, M]:
        """The output for ``array`` and the model that computed it; ``alone`` says no other
        request is in flight."""
        if alone and not self._busy and not self._queue and self.max_delay_s == 0:
            self._busy = True
            model = self.model
            try:
                output = model.predict(array)
            finally:
                self._busy = False
            self._on_batch(len(array))
            return output, model
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"{len(self._queue)} requests queued (the limit)")
        future: asyncio.Future[tuple[Array, M]] = asyncio.get_running_loop().create_future()
        self._queue.append((array, future))
        self._arrived.set()
        return await future

    async def run(self) -> None:
        """The batching loop: one batch at a time, on a worker thread."""
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self.max_delay_s > 0 and self._rows() < self.max_batch_size:
                await self._gather_more()
            batch = self._take()
            model = self.model  # once per batch: a swap takes effect between two batches
            try:
                inputs = (
                    np.concatenate([array for array, _ in batch]) if len(batch) > 1 else batch[0][0]
                )
                outputs = await asyncio.to_thread(model.predict, inputs)
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self._on_batch(len(inputs))
            start = 0
            for array, future in batch:
                if not future.done():  # a cancelled request (client gone) is skipped
                    future.set_result((outputs[start : start + len(array)], model))
                start += len(array)

    def _rows(self) -> int:
        return sum(len(array) for array, _ in self._queue)

    async def _gather_more(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        while self._rows() < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return

    def _take(self) -> list[tuple[Array, asyncio.Future[tuple[Array, M]]]]:
        batch = [self._queue.popleft()]
        rows = len(batch[0][0])
        while self._queue and rows + len(self._queue[0][0]) <= self.max_batch_size:
            item = self._queue.popleft()
            rows += len(item[0])
            batch.append(item)
        return [(array, future) for array, future in batch if not future.cancelled()] or batch
