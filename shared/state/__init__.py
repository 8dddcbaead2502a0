"""State: typed KV buckets with compare-and-set, retention TTLs, watches and leases.

Callers annotate with the port (:class:`Store`, :class:`Leases`, :class:`State`); a service
opens :class:`KvState` (NATS JetStream KV), a fast test may use :class:`MemoryState`.
"""

from torchrelay.shared.state.keys import InvalidKey, check_key, key_part
from torchrelay.shared.state.kv import (
    DEFAULT_MARKER_TTL_S,
    KvLeases,
    KvState,
    KvStore,
    open_bucket,
)
from torchrelay.shared.state.memory import MemoryState
from torchrelay.shared.state.port import (
    BUCKETS,
    LEASE_BUCKET,
    CorruptState,
    Lease,
    Leases,
    State,
    Store,
    Versioned,
)
from torchrelay.shared.state.views import LiveView

__all__ = [
    "BUCKETS",
    "DEFAULT_MARKER_TTL_S",
    "LEASE_BUCKET",
    "CorruptState",
    "InvalidKey",
    "KvLeases",
    "KvState",
    "KvStore",
    "Lease",
    "Leases",
    "LiveView",
    "MemoryState",
    "State",
    "Store",
    "Versioned",
    "check_key",
    "key_part",
    "open_bucket",
]
