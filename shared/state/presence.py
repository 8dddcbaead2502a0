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
from torchrelay.shared.state.keys import key_part
from torchrelay.shared.state.port import Lease, Leases

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
    renewing it in the background (a crashed holder blocks the others for at most ``ttl_s``).

    Losing the lease ends the body: it is cancelled where it awaits and :class:`LeaseLost`
    leaves the ``async with`` (another holder may already be inside, so the body must not go
    on). The lease is lost when a renewal finds it expired or taken, or when renewals keep
    failing (NATS unreachable) until ``ttl_s`` has passed since the last one that landed.
    """
    # Polling: a lease's expiry is a server-side TTL that announces nothing.
    while (lease := await leases.acquire(name, holder, ttl_s)) is None:  # noqa: ASYNC110
        await asyncio.sleep(poll_s)
    held = lease
    body = asyncio.current_task()
    if body is None:
        raise RuntimeError("exclusive() runs inside an asyncio task")
    inside = True
    lost: LeaseLost | None = None

    async def renew() -> None:
        nonlocal held, lost
        renewed = time.monotonic()
        try:
            while True:
                await asyncio.sleep(ttl_s / 3)
                try:
                    held = await leases.renew(held)
                    renewed = time.monotonic()
                except LeaseLost:
                    raise
                except Exception as exc:  # a NATS hiccup: retry while the lease may still hold
                    if time.monotonic() - renewed >= ttl_s:
                        raise LeaseLost(f"{holder} could not renew lease {name}") from exc
                    log.warning("lease.renew_failed", lease=name, error=repr(exc))
        except LeaseLost as exc:
            lost = exc
            log.warning("lease.lost", lease=name, holder=holder)
            # Only while the body runs: once it is back here, it finishes its own exit.
            if inside:
                body.cancel(f"lease {name} lost")

    renewer = asyncio.create_task(renew(), name=f"lease:{name}")
    try:
        yield
    except asyncio.CancelledError:
        inside = False
        # Our cancel, and nobody else's: turn it into the reason. Any other cancel wins.
        if lost is not None and body.uncancel() == 0:
            raise lost from lost.__cause__
        raise
    finally:
        inside = False
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        with contextlib.suppress(Exception):
            await leases.release(held)
    if lost is not None:  # the body swallowed our cancel, or finished as the lease went
        if body.cancelling():
            body.uncancel()
        raise lost
