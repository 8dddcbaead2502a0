"""Compute backends: the port (:mod:`.port`) and its local implementation (:mod:`.local`).
The Kubernetes implementation is imported lazily by the service that chooses it."""

from torchrelay.shared.cluster.port import Backend, Ended, Status, Unplaceable, WorkerJob

__all__ = ["Backend", "Ended", "Status", "Unplaceable", "WorkerJob"]
