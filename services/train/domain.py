"""Pure rules of the train service: run ids, the run record, and which requests to act on."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from torchrelay.shared.events.data import TrainJobSpec
from torchrelay.shared.state import key_part

RunStatus = Literal["running", "succeeded", "failed", "cancelled"]
_RUN_IDS = uuid.UUID("7c1d9e2a-4b3f-4e8a-9c6d-1f2e3a4b5c6d")


def run_id_for(requested: str | None, event_id: str) -> str:
    """The request's run id, or one derived from the event id (a redelivery gets the same)."""
    return requested or f"run-{uuid.uuid5(_RUN_IDS, event_id).hex[:12]}"


class RunRecord(BaseModel):
    """A run in the ``runs`` bucket."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    spec: TrainJobSpec
    dataset_path: str
    status: RunStatus
    attempt: int
    owner: str
    pipeline_id: str | None = None
    reason: str | None = None
    model_version: str | None = None
    updated: datetime


class ModelRecord(BaseModel):
    """A trained model version in the ``models`` bucket, with where it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    path: str
    metrics: dict[str, float]
    run_id: str
    dataset: str
    """``name@version`` of the dataset it was trained on."""
    pipeline_id: str | None = None
    created: datetime


def model_key(name: str, version: str) -> str:
    return f"{key_part(name)}.{key_part(version)}"


def restart_allowed(record: RunRecord, attempt: int) -> str | None:
    """Why a restart to ``attempt`` must not happen, or None if it may."""
    if record.status == "running":
        return f"run {record.run_id} is running"
    if record.status == "succeeded":
        return f"run {record.run_id} already succeeded"
    if attempt != record.attempt + 1:
        return f"run {record.run_id} is at attempt {record.attempt}; restart {attempt} is stale"
    if attempt > record.spec.max_restarts:
        return f"run {record.run_id} has used its {record.spec.max_restarts} restarts"
    return None
