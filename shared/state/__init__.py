"""State: typed KV buckets over NATS JetStream with compare-and-set, and leases with TTL."""

from torchrelay.shared.state.kv import (
    BUCKETS,
    CorruptState,
    Lease,
    Leases,
    State,
    Store,
    Versioned,
    key_part,
    open_bucket,
)

__all__ = [
    "BUCKETS",
    "CorruptState",
    "Lease",
    "Leases",
    "State",
    "Store",
    "Versioned",
    "key_part",
    "open_bucket",
]
