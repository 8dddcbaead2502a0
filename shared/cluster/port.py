"""The compute backend port: one interface, a local and a Kubernetes implementation.

``dryrun`` is pure and returns the exact request (argv and environment per rank locally, the
manifests on Kubernetes); ``schedule`` does the I/O; ``wait`` reports how the job ended;
``cancel`` and ``aclose`` are idempotent.

A handle (what ``schedule`` and ``adopt`` return) is opaque: callers store it and hand it back
to ``wait`` and ``cancel``, and never build or parse one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from torchrelay.shared.errors import PermanentError
from torchrelay.shared.events.data import TrainJobSpec


class Unplaceable(PermanentError):
    """The backend cannot place this job (too many workers, GPUs it does not have)."""


class WorkerJob(BaseModel):
    """One attempt of a training run, as a backend receives it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    attempt: int
    job: TrainJobSpec
    dataset_path: str
    storage_root: str
    nats_url: str | None = None
    pipeline_id: str | None = None


class Status(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Ended:
    status: Status
    reason: str
    rank: int | None = None
    exit_code: int | None = None
    signal: str | None = None
    log_tail: list[str] = field(default_factory=list)


class Backend(Protocol):
    name: str

    def check(self, job: WorkerJob) -> None:
        """Raise :class:`Unplaceable` if this backend can never run the job."""
        ...

    def dryrun(self, job: WorkerJob) -> object:
        """The exact launch request, without side effects."""
        ...

    async def schedule(self, request: object) -> str:
        """Launch; returns an opaque handle for wait/cancel (store it, never parse it)."""
        ...

    async def wait(self, handle: str) -> Ended:
        """Until the job ends (any failed worker ends it: the others are torn down)."""
        ...

    async def adopt(self, request: object) -> str | None:
        """Take over an attempt that another (dead) replica scheduled: its handle, or None when
        the attempt cannot outlive the replica that started it (local processes)."""
        ...

    async def cancel(self, handle: str) -> None:
        """Stop the job behind ``handle``; a ``wait`` on it then ends as ``CANCELLED``.

        Idempotent: cancelling a job twice is success. Who may cancel is the backend's to say:
        one whose jobs are bound to the replica that started them (local processes) raises
        :class:`~torchrelay.shared.errors.NotOwned` for a handle it is not running (started
        elsewhere, or already waited for and forgotten), so the caller can leave the cancel to
        the owner; one whose jobs outlive any replica (Kubernetes Jobs) cancels any handle it
        is given, from any replica, and a job already gone is success.
        """
        ...

    async def aclose(self) -> None: ...
