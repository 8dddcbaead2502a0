"""The contract between a backend and a training worker: one JSON document in
``TORCHRELAY_WORKER`` (pure: the backend builds it, the worker reads it)."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from torchrelay.shared.events.data import TrainJobSpec

WORKER_ENV = "TORCHRELAY_WORKER"
RENDEZVOUS_TIMEOUT_S = 600.0
"""How long a rank waits for every other rank to join (torchrun's static rendezvous: 600 s):
pods start with skew (image pulls, node scale-up), and a rank that waited less fails the
attempt for nothing."""
COLLECTIVE_TIMEOUT_S = 1800.0
"""How long one collective may take (a slow rank 0 checkpointing to NFS holds the others in
the next all-reduce)."""


class WorkerSpec(BaseModel):
    """Everything one rank needs; the same for the local and Kubernetes backends, except
    ``rank`` (Kubernetes derives it from the completion index) and ``rendezvous``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    attempt: int = Field(ge=0)
    rank: int = Field(ge=0)
    world_size: int = Field(ge=1)
    rendezvous: str = Field(description="torch.distributed init_method: file://... or tcp://...")
    backend: str = Field(description="gloo or nccl")
    job: TrainJobSpec
    storage_root: str
    dataset_path: str = Field(description="The dataset version folder, relative to the root.")
    nats_url: str | None = Field(default=None, description="Where rank 0 reports progress.")
    pipeline_id: str | None = None
    rendezvous_timeout_s: float = Field(
        default=RENDEZVOUS_TIMEOUT_S, gt=0, description="Until every rank joined the group."
    )
    collective_timeout_s: float = Field(
        default=COLLECTIVE_TIMEOUT_S, gt=0, description="Of each collective, once joined."
    )

    @classmethod
    def from_env(cls) -> WorkerSpec:
        raw = os.environ.get(WORKER_ENV)
        if raw is None:
            raise SystemExit(
                f"{WORKER_ENV} is not set: workers are started by a torchrelay backend"
            )
        spec = cls.model_validate_json(raw)
        # Kubernetes Indexed Jobs give the rank as the completion index.
        index = os.environ.get("JOB_COMPLETION_INDEX")
        return spec.model_copy(update={"rank": int(index)}) if index is not None else spec
