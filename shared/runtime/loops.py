"""Background loops a service runs beside its consumers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("torchrelay.runtime")


async def every(
    seconds: float, stop: asyncio.Event, work: Callable[[], Awaitable[object]], *, name: str
) -> None:
    """Run ``work`` now and then every ``seconds`` until ``stop`` is set. A round that fails
    (NATS unavailable for a moment) is logged and the next round runs: the loop outlives it."""
    while not stop.is_set():
        try:
            await work()
        except Exception as exc:  # noqa: BLE001 - one bad round must not end the loop
            log.warning("loop.round_failed", loop=name, error=repr(exc))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()
