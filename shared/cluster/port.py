"""The compute backend port: one generic interface, for training and for serving.

A backend turns a piece of work (a :class:`WorkerJob`: one attempt of a training run; a
:class:`ModelVersion`: one version of a model to serve) into something running, in the shape
of torchx's ``Scheduler``:

- ``check`` refuses work the backend can never place, before anything is recorded;
- ``dryrun`` is pure and returns the exact request (the argv and environment of each process
  locally, the manifests on Kubernetes), to log, show or test;
- ``schedule`` does the I/O and returns a **handle**;
- ``describe`` says what a handle's work is doing now (None: the backend knows nothing of it);
- ``wait`` returns how it ended;
- ``cancel`` stops it (idempotent);
- ``undeploy`` (serving only) takes a model down altogether, endpoint and all (idempotent);
- ``adopt`` takes over work another replica scheduled, when that work outlives its replica;
- ``aclose`` lets go of the backend's resources.

A handle is opaque: callers store it (in the run or deployment record) and hand it back; no
service builds or parses one. Backends are chosen by name through :mod:`.registry`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from torchrelay.shared.cluster.worker_spec import COLLECTIVE_TIMEOUT_S, RENDEZVOUS_TIMEOUT_S
from torchrelay.shared.errors import PermanentError
from torchrelay.shared.events.data import TrainJobSpec

Work_contra = TypeVar("Work_contra", contravariant=True)
Request = TypeVar("Request")


class Unplaceable(PermanentError):
    """The backend cannot place this work (too many workers, GPUs it does not have)."""


class NotReady(PermanentError):
    """A model version's servers did not get ready; the reason says why (their last log lines,
    the pods that did not start). Nothing of the version is left running."""


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


class Phase(enum.Enum):
    PENDING = "pending"
    """Scheduled, not running yet (pods being scheduled or pulling images, servers loading)."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class Description:
    """What ``describe`` says of a handle now."""

    handle: str
    phase: Phase
    detail: str = ""


class Backend(Protocol[Work_contra, Request]):
    """A compute backend for one kind of work."""

    name: str

    def check(self, work: Work_contra) -> None:
        """Raise :class:`Unplaceable` if this backend can never run ``work``."""
        ...

    def dryrun(self, work: Work_contra) -> Request:
        """The exact request ``schedule`` would send, without side effects."""
        ...

    async def schedule(self, request: Request) -> str:
        """Start the work; returns its handle (store it, never parse it)."""
        ...

    async def describe(self, handle: str) -> Description | None:
        """What the work behind ``handle`` is doing now; None when there is none (it ended and
        is gone, or it never was)."""
        ...

    async def wait(self, handle: str) -> Ended:
        """Until the work ends: training when any rank fails (the others are torn down) or
        every rank finished; serving when the version stops serving."""
        ...

    async def adopt(self, request: Request) -> str | None:
        """Take over work another (dead) replica scheduled: its handle, or None when the work
        cannot outlive the replica that started it (local processes)."""
        ...

    async def cancel(self, handle: str) -> None:
        """Stop the work behind ``handle``; a ``wait`` on it then ends as ``CANCELLED``.

        Idempotent: cancelling twice is success. Who may cancel is the backend's to say: one
        whose work is bound to the replica that started it (local training ranks) raises
        :class:`~torchrelay.shared.errors.NotOwned` for a handle it is not running, so the
        caller can leave the cancel to the owner; one whose work outlives any replica
        (Kubernetes objects) cancels any handle it is given, and work already gone is success.
        """
        ...

    async def aclose(self) -> None: ...


# --- training ------------------------------------------------------------------------------


class WorkerJob(BaseModel):
    """One attempt of a training run, as a training backend receives it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    attempt: int
    job: TrainJobSpec
    dataset_path: str
    storage_root: str
    nats_url: str | None = None
    pipeline_id: str | None = None
    rendezvous_timeout_s: float = Field(default=RENDEZVOUS_TIMEOUT_S, gt=0)
    """Given to every rank: how long it waits for the others to join."""
    collective_timeout_s: float = Field(default=COLLECTIVE_TIMEOUT_S, gt=0)
    """Given to every rank: how long one collective may take."""


TrainingBackend = Backend[WorkerJob, Any]


# --- serving -------------------------------------------------------------------------------


class ModelVersion(BaseModel):
    """One version of a model to serve, as a serving backend receives it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    version: str
    replicas: int = Field(ge=1)
    replacing: str | None = None
    """The handle of what serves the model now, if anything: its endpoint is kept, and its
    servers are retired once this version takes over."""


class ServingBackend(Backend[ModelVersion, Request], Protocol):
    """A serving backend: ``schedule`` starts a version's servers, ``ready`` waits until they
    can answer, ``promote`` puts them on the model's stable endpoint.

    Between ``ready`` and ``promote`` the deployer checks the servers with a smoke inference;
    a version that fails it is cancelled, and what it was replacing keeps serving.
    """

    async def ready(self, handle: str) -> list[str]:
        """Until the version's servers are ready: the base URL of each (where the deployer's
        smoke inference goes). :class:`NotReady` if they are not within the backend's
        timeout; then the version is cancelled and what it replaces keeps serving."""
        ...

    async def promote(self, handle: str) -> str:
        """Put the version on the model's stable endpoint and retire what it replaced;
        returns the endpoint. Idempotent."""
        ...

    async def undeploy(self, model: str, handle: str | None) -> None:
        """Take ``model`` down: every server of it this backend started, the version behind
        ``handle`` (the deployment record's, perhaps another replica's) and the model's stable
        endpoint, which no longer answers once this returns. Idempotent: a model with nothing
        left running is success."""
        ...
