"""Run records in the ``runs`` bucket: written by the train service, read by the monitor (to
reconcile what the bus left behind) and by the command line.

Pure: the record, and the rules every reader applies to it the same way.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from torchrelay.shared.events.data import TrainCompletedData, TrainFailedData, TrainJobSpec

RunStatus = Literal["running", "succeeded", "failed", "cancelled"]
Outcome = TrainFailedData | TrainCompletedData
_OUTCOME_IDS = uuid.UUID("3f0c6a52-8d4e-4b1a-9e27-5c8b1d7a2e90")


class RunRecord(BaseModel):
    """A run in the ``runs`` bucket."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    spec: TrainJobSpec
    dataset_path: str
    status: RunStatus
    attempt: int
    owner: str
    handle: str | None = None
    """The backend's opaque handle of the current attempt (what ``schedule`` returned or
    ``adopt`` found), used to cancel it; None until the attempt is launched, and in records
    written before handles were stored."""
    cancel: Literal["final", "restart"] | None = None
    """Why the current attempt is being cancelled: a user's cancel (final) or the monitor's
    cancel of a stalled attempt to restart it. Kept here, not in a replica's memory, because
    the replica that cancels is not always the one that watches the attempt end."""
    pipeline_id: str | None = None
    trial: int | None = None
    """The sweep trial this run is (its sweep is its pipeline's): the sweep, not the run,
    writes the pipeline's train stage."""
    reason: str | None = None
    model_version: str | None = None
    updated: datetime
    """When the record last changed status (an attempt's launch, or how it ended)."""
    outcome: Outcome | None = None
    """How the current attempt ended: the data of the ``train.failed`` or ``train.completed``
    that says so. None while it runs (and in records written before outcomes were kept)."""
    announced: bool = True
    """Whether ``outcome``'s event is on the bus and the pipeline's train stage is written.
    False from recording an outcome until both are done: a replica that dies in between
    leaves them to the replica that takes the run over, which announces the same event (its
    id comes from the run and attempt, so the stream holds it once)."""

    @property
    def over(self) -> bool:
        """Nothing more will happen to the run: it succeeded, or its failure was final."""
        if self.status == "succeeded":
            return True
        return isinstance(self.outcome, TrainFailedData) and self.outcome.final

    @property
    def restart_due(self) -> bool:
        """The current attempt failed and a restart is to follow (the monitor asks for it)."""
        return (
            self.status in {"failed", "cancelled"}
            and isinstance(self.outcome, TrainFailedData)
            and not self.outcome.final
        )


def outcome_event_id(run_id: str, attempt: int, outcome: Outcome) -> str:
    """The id of the event that announces how ``attempt`` ended: the same from every replica
    and every try, so announcing twice stores one event (JetStream's duplicate window)."""
    kind = "failed" if isinstance(outcome, TrainFailedData) else "completed"
    return str(uuid.uuid5(_OUTCOME_IDS, f"{kind}:{run_id}:{attempt}"))


def halted_event_id(run_id: str, attempt: int) -> str:
    """The id of the final ``train.failed`` that says a failed attempt will not be restarted
    after all (its sweep trial was stopped meanwhile): not the id of that attempt's first,
    non-final ``train.failed``, which the stream would take for a repeat of it."""
    return str(uuid.uuid5(_OUTCOME_IDS, f"halted:{run_id}:{attempt}"))


def restart_event_id(run_id: str, attempt: int) -> str:
    """The id of the request for restart ``attempt``: whoever asks (the monitor handling the
    failure, or its reconciliation), the stream holds one request."""
    return str(uuid.uuid5(_OUTCOME_IDS, f"restart:{run_id}:{attempt}"))
