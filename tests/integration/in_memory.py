"""Handlers run in memory: what they publish, recorded, and a service replica's presence."""

from __future__ import annotations

import uuid
from typing import TypeVar

from torchrelay.shared.events import AnyEvent
from torchrelay.shared.state.memory import MemoryState
from torchrelay.shared.state.presence import Presence

E = TypeVar("E", bound=AnyEvent)


class Published:
    """A handler's ``publish``: records each event and says it was published."""

    def __init__(self) -> None:
        self.events: list[AnyEvent] = []

    async def __call__(self, event: AnyEvent) -> bool:
        self.events.append(event)
        return True

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]


async def present(state: MemoryState, service: str) -> Presence:
    """A replica of ``service`` that has announced itself."""
    presence = Presence(state.leases, service, f"{service}-{uuid.uuid4().hex[:6]}")
    await presence.announce()
    return presence
