"""Which replicas are alive: each holds a presence lease while it runs.

A replica that starts local work (training ranks, model servers) owns it: nobody else can watch
or stop those processes. When it dies its lease expires within the TTL, and another replica of
the same service takes the work over (a run is restarted from its checkpoint, a model is served
again on its port). A replica that cannot renew its lease in time must assume the others
already took its work, so losing the lease is fatal to it: it stops, and is restarted fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog

from torchrelay.shared.errors import ConfigError, LeaseLost
from torchrelay.shared.state.kv import Lease, Leases, key_part

log = structlog.get_logger("torchrelay.presence")
PRESENCE_TTL_S = 10.0


def presence_key(service: str, instance: str) -> str:
    return f"replicas.{key_part(service)}.{key_part(instance)}"


class Presence:
    def __init__(
        self, leases: Leases, service: str, instance: str, *, ttl_s: float = PRESENCE_TTL_S
    ) -> None:
        self._leases = leases
        self.service = service
        self.instance = instance
        self.ttl_s = ttl_s
        self._lease: Lease | None = None

    async def announce(self) -> None:
        """Take this replica's presence lease (before it starts any work)."""
        lease = await self._leases.acquire(
            presence_key(self.service, self.instance), self.instance, self.ttl_s
        )
        if lease is None:
            raise ConfigError(
                f"another {self.service} replica named {self.instance!r} is running; "
                "give each replica its own TORCHRELAY_INSTANCE"
            )
        self._lease = lease

    async def keep(self, stop: asyncio.Event) -> None:
        """Renew until ``stop``; raise :class:`LeaseLost` if the lease ran out meanwhile."""
        if self._lease is None:
            raise RuntimeError("announce() first")
        every = self.ttl_s / 4
        renewed = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await stop.wait()
                    return
            try:
                self._lease = await self._leases.renew(self._lease)
                renewed = time.monotonic()
            except LeaseLost:
                raise
            except Exception as exc:  # a NATS hiccup: try again while the lease may still hold
                if time.monotonic() - renewed >= self.ttl_s:
                    raise LeaseLost(f"{self.instance} could not renew its presence") from exc
                log.warning("presence.renew_failed", error=repr(exc))

    async def withdraw(self) -> None:
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._leases.release(self._lease)
            self._lease = None

    async def alive(self, instance: str) -> bool:
        """Whether the replica ``instance`` of this service holds its presence now."""
        if instance == self.instance:
            return self._lease is not None
        return await self._leases.holder(presence_key(self.service, instance)) is not None


@contextlib.asynccontextmanager
async def exclusive(
    leases: Leases, name: str, holder: str, *, ttl_s: float = 15.0, poll_s: float = 0.2
) -> AsyncIterator[None]:
    """Hold the lease ``name`` for the body, waiting for it when another holder has it, and
    renewing it in the background (a crashed holder blocks the others for at most ``ttl_s``)."""
    # Polling: a lease's expiry is a server-side TTL that announces nothing.
    while (lease := await leases.acquire(name, holder, ttl_s)) is None:  # noqa: ASYNC110
        await asyncio.sleep(poll_s)
    held = lease

    async def renew() -> None:
        nonlocal held
        while True:
            await asyncio.sleep(ttl_s / 3)
            held = await leases.renew(held)

    renewer = asyncio.create_task(renew(), name=f"lease:{name}")
    try:
        yield
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError, LeaseLost):
            await renewer
        with contextlib.suppress(Exception):
            await leases.release(held)
