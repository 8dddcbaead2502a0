"""Compute backends: the generic port (:mod:`.port`), the registry that opens one by name
(:mod:`.registry`), local processes (:mod:`.local`, :mod:`.local_serving`) and Kubernetes
(:mod:`.kubernetes`)."""

from torchrelay.shared.cluster.port import (
    Backend,
    Description,
    Ended,
    ModelVersion,
    NotReady,
    Phase,
    ServingBackend,
    Status,
    TrainingBackend,
    Unplaceable,
    WorkerJob,
)

__all__ = [
    "Backend",
    "Description",
    "Ended",
    "ModelVersion",
    "NotReady",
    "Phase",
    "ServingBackend",
    "Status",
    "TrainingBackend",
    "Unplaceable",
    "WorkerJob",
]
