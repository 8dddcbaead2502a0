"""Joining the attempt's process group, with two timeouts from the worker's spec.

torch's ``init_process_group`` has one timeout for everything: how long a rank waits for its
peers to turn up, and how long any collective may take afterwards. Here they are separate. A
rank first joins the rendezvous store and waits until every rank has (``rendezvous_timeout_s``:
pods start with skew), then forms the group, whose collectives get ``collective_timeout_s``.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from torchrelay.shared.cluster.worker_spec import WorkerSpec

JOINED_KEY = "torchrelay/joined"
EVERYONE_KEY = "torchrelay/everyone-joined"


class RendezvousTimeout(RuntimeError):
    """Not every rank joined the rendezvous in time."""


def join(spec: WorkerSpec) -> None:
    """Join the group of ``spec``'s attempt once every rank is there; raises
    :class:`RendezvousTimeout` naming the rendezvous, how many ranks came and how long it
    waited, when the others did not come within ``rendezvous_timeout_s``."""
    waited = timedelta(seconds=spec.rendezvous_timeout_s)
    try:
        store, rank, world_size = next(
            rendezvous(spec.rendezvous, spec.rank, spec.world_size, timeout=waited)
        )
        store.set_timeout(waited)
        if store.add(JOINED_KEY, 1) == world_size:
            store.set(EVERYONE_KEY, "1")
        store.wait([EVERYONE_KEY], waited)
    except (RuntimeError, ValueError) as exc:  # DistStoreError and the store's "Wait timeout"
        raise RendezvousTimeout(_not_joined(spec, exc)) from exc
    dist.init_process_group(
        spec.backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=spec.collective_timeout_s),
    )


def _not_joined(spec: WorkerSpec, exc: BaseException) -> str:
    return (
        f"rank {spec.rank}: not every one of the {spec.world_size} ranks joined the rendezvous "
        f"at {spec.rendezvous} within {spec.rendezvous_timeout_s:g}s "
        f"(TORCHRELAY_TRAIN_RENDEZVOUS_TIMEOUT_S): {exc}"
    )
