"""The contract between a backend and a training worker: one JSON document in
``TORCHRELAY_WORKER`` (pure: the backend builds it, the worker reads it)."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from torchrelay.shared.events.data import TrainJobSpec

WORKER_ENV = "TORCHRELAY_WORKER"


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
    collective_timeout_s: float = Field(default=120.0, gt=0)

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
