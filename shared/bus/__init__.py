"""The bus: a port (:mod:`.port`), its one outcome table (:mod:`.outcome`), the NATS JetStream
adapter (:mod:`.jetstream`), an in-memory adapter for unit tests (:mod:`.memory`), and the
embedded nats-server (:mod:`.server`)."""

from torchrelay.shared.bus.outcome import Action, Outcome, decide
from torchrelay.shared.bus.port import BusObserver, EventBus, Handled, Handler, Subscription

__all__ = [
    "Action",
    "BusObserver",
    "EventBus",
    "Handled",
    "Handler",
    "Outcome",
    "Subscription",
    "decide",
]
