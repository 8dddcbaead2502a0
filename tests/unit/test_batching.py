"""The dynamic batcher's swap: a new model takes over between two batches, and every answer
names the model that computed it."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torchrelay.services.serve.server.batching import DynamicBatcher


@dataclass
class Model:
    """Adds ``offset``; holds each batch until ``release`` is set (from the test)."""

    offset: float
    release: threading.Event = field(default_factory=threading.Event)

    def predict(self, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        self.release.wait(5)
        result: np.ndarray[Any, Any] = batch + self.offset
        return result


async def test_a_swap_takes_effect_at_the_next_batch_and_answers_name_their_model() -> None:
    old, new = Model(100.0), Model(200.0)
    new.release.set()
    batcher = DynamicBatcher(old, max_batch_size=8, max_delay_s=0, max_queue=8)
    loop = asyncio.create_task(batcher.run())
    try:
        running = [asyncio.create_task(batcher.infer(np.array([[i]]))) for i in range(2)]
        await asyncio.sleep(0.05)  # the first batch is in old.predict, held
        batcher.swap(new)
        later = asyncio.create_task(batcher.infer(np.array([[5.0]])))
        await asyncio.sleep(0.05)
        old.release.set()
        answers = await asyncio.gather(*running, later)
    finally:
        loop.cancel()
    assert [(float(out[0, 0]), model) for out, model in answers] == [
        (100.0, old),
        (101.0, old),
        (205.0, new),
    ]
    assert batcher.model is new
