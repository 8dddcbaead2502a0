"""The event catalogue: every event type torchrelay knows, in one module.

A type is ``io.torchrelay.<domain>.<event>.v<N>``; its NATS subject derives from it
(``torchrelay.<domain>.<event>``). A breaking change to an event is a new class with the next
version; the old class stays until nothing produces it.
"""

from __future__ import annotations

from typing import Literal

from torchrelay.shared.events import data as d
from torchrelay.shared.events.envelope import CloudEvent


class PipelineSubmitted(CloudEvent[d.PipelineSubmittedData]):
    """A pipeline spec was submitted; services act on its stages as their inputs arrive."""

    type: Literal["io.torchrelay.pipeline.submitted.v1"] = "io.torchrelay.pipeline.submitted.v1"


class PipelineRejected(CloudEvent[d.PipelineRejectedData]):
    """A pipeline submission was refused (its id holds another spec); nothing changed."""

    type: Literal["io.torchrelay.pipeline.rejected.v1"] = "io.torchrelay.pipeline.rejected.v1"


class DatasetIngestRequested(CloudEvent[d.DatasetIngestRequestedData]):
    """Someone asks ingest to stage a dataset from a source."""

    type: Literal["io.torchrelay.dataset.ingest.requested.v1"] = (
        "io.torchrelay.dataset.ingest.requested.v1"
    )


class DatasetStaged(CloudEvent[d.DatasetStagedData]):
    """A dataset version is complete on the shared storage, manifest and all."""

    type: Literal["io.torchrelay.dataset.staged.v1"] = "io.torchrelay.dataset.staged.v1"


class DatasetRejected(CloudEvent[d.DatasetRejectedData]):
    """An ingest request failed; nothing was left on storage."""

    type: Literal["io.torchrelay.dataset.rejected.v1"] = "io.torchrelay.dataset.rejected.v1"


class TrainRequested(CloudEvent[d.TrainRequestedData]):
    """Someone asks for a training run."""

    type: Literal["io.torchrelay.train.requested.v1"] = "io.torchrelay.train.requested.v1"


class TrainRestartRequested(CloudEvent[d.TrainRestartRequestedData]):
    """A failed or stalled run should be relaunched from its newest valid checkpoint."""

    type: Literal["io.torchrelay.train.restart.requested.v1"] = (
        "io.torchrelay.train.restart.requested.v1"
    )


class TrainCancelRequested(CloudEvent[d.TrainCancelRequestedData]):
    """A run should stop; its workers are torn down."""

    type: Literal["io.torchrelay.train.cancel.requested.v1"] = (
        "io.torchrelay.train.cancel.requested.v1"
    )


class TrainStarted(CloudEvent[d.TrainStartedData]):
    """All workers of a run (or of one restart of it) were launched."""

    type: Literal["io.torchrelay.train.started.v1"] = "io.torchrelay.train.started.v1"


class TrainProgressed(CloudEvent[d.TrainProgressData]):
    """A run reported its step, loss and throughput.

    Version 2: a loss or metric that was NaN or infinite (a run that diverged) is left out or
    null, where version 1 required a finite loss and failed the training step instead. Only
    rank 0 of a training run produces it. A job started before an upgrade still sends version
    1, which no longer decodes (its reports are dead-lettered and the monitor may take the run
    for stalled): let running jobs finish, or restart them, when upgrading.
    """

    type: Literal["io.torchrelay.train.progress.v2"] = "io.torchrelay.train.progress.v2"


class TrainCheckpointed(CloudEvent[d.TrainCheckpointedData]):
    """A run wrote a complete checkpoint."""

    type: Literal["io.torchrelay.train.checkpointed.v1"] = "io.torchrelay.train.checkpointed.v1"


class TrainCompleted(CloudEvent[d.TrainCompletedData]):
    """A run finished and exported a model version."""

    type: Literal["io.torchrelay.train.completed.v1"] = "io.torchrelay.train.completed.v1"


class TrainFailed(CloudEvent[d.TrainFailedData]):
    """A run (or one attempt of it) failed."""

    type: Literal["io.torchrelay.train.failed.v1"] = "io.torchrelay.train.failed.v1"


class SweepStarted(CloudEvent[d.SweepStartedData]):
    """A pipeline's sweep began: its trials are planned on the staged dataset."""

    type: Literal["io.torchrelay.sweep.started.v1"] = "io.torchrelay.sweep.started.v1"


class SweepTrialStarted(CloudEvent[d.SweepTrialStartedData]):
    """A trial of a sweep was launched as a training run."""

    type: Literal["io.torchrelay.sweep.trial.started.v1"] = "io.torchrelay.sweep.trial.started.v1"


class SweepTrialStopped(CloudEvent[d.SweepTrialStoppedData]):
    """A trial ended without a model: stopped early, failed, or cancelled with its sweep."""

    type: Literal["io.torchrelay.sweep.trial.stopped.v1"] = "io.torchrelay.sweep.trial.stopped.v1"


class SweepCancelRequested(CloudEvent[d.SweepCancelRequestedData]):
    """Someone asks to stop a sweep: its running trials are cancelled and no more start."""

    type: Literal["io.torchrelay.sweep.cancel.requested.v1"] = (
        "io.torchrelay.sweep.cancel.requested.v1"
    )


class SweepCompleted(CloudEvent[d.SweepCompletedData]):
    """Every trial of a sweep ended; the best trial's model goes on to the deploy stage."""

    type: Literal["io.torchrelay.sweep.completed.v1"] = "io.torchrelay.sweep.completed.v1"


class ModelDeployRequested(CloudEvent[d.ModelDeployRequestedData]):
    """Someone asks serve to roll out a model version."""

    type: Literal["io.torchrelay.model.deploy.requested.v1"] = (
        "io.torchrelay.model.deploy.requested.v1"
    )


class ModelRollbackRequested(CloudEvent[d.ModelRollbackRequestedData]):
    """Someone asks serve to return a model to an earlier version."""

    type: Literal["io.torchrelay.model.rollback.requested.v1"] = (
        "io.torchrelay.model.rollback.requested.v1"
    )


class ModelRolloutStarted(CloudEvent[d.ModelRolloutStartedData]):
    """A new version of a model is starting; the old one keeps traffic until it is ready."""

    type: Literal["io.torchrelay.model.rollout.started.v1"] = (
        "io.torchrelay.model.rollout.started.v1"
    )


class ModelDeployed(CloudEvent[d.ModelDeployedData]):
    """A model version is ready and takes the traffic of its stable endpoint."""

    type: Literal["io.torchrelay.model.deployed.v1"] = "io.torchrelay.model.deployed.v1"


class ModelRolloutFailed(CloudEvent[d.ModelRolloutFailedData]):
    """A rollout failed; the previous version (if any) keeps serving."""

    type: Literal["io.torchrelay.model.rollout.failed.v1"] = "io.torchrelay.model.rollout.failed.v1"


class ModelUndeployRequested(CloudEvent[d.ModelUndeployRequestedData]):
    """Someone asks serve to take a model's endpoint down (every server of it)."""

    type: Literal["io.torchrelay.model.undeploy.requested.v1"] = (
        "io.torchrelay.model.undeploy.requested.v1"
    )


class ModelUndeployed(CloudEvent[d.ModelUndeployedData]):
    """A model no longer serves: its servers and its endpoint are gone."""

    type: Literal["io.torchrelay.model.undeployed.v1"] = "io.torchrelay.model.undeployed.v1"


class PruneRequested(CloudEvent[d.PruneRequestedData]):
    """An operator asks to reclaim old datasets, models, runs, pipelines and workspaces."""

    type: Literal["io.torchrelay.platform.prune.requested.v1"] = (
        "io.torchrelay.platform.prune.requested.v1"
    )


class Pruned(CloudEvent[d.PrunedData]):
    """A prune ran: what it removed (or would remove), what it kept and why, bytes freed."""

    type: Literal["io.torchrelay.platform.pruned.v1"] = "io.torchrelay.platform.pruned.v1"


class DeadLettered(CloudEvent[d.DeadLetteredData]):
    """An event was given up on: malformed, permanently failing, or out of deliveries.

    Version 2 names the original by stream sequence, size and sha256 and keeps a 1 KiB prefix
    of it, so a dead letter stays a few KiB however large the original was (version 1 embedded
    the whole original and could exceed NATS's max payload, losing the event). Nothing
    produces version 1 any more, so its class is gone; a v1 letter still in the stream no
    longer decodes, is never dead-lettered itself (nothing on the dead-letter subject is), and
    ``torchrelay deadletters`` lists it as unreadable.
    """

    type: Literal["io.torchrelay.deadletter.v2"] = "io.torchrelay.deadletter.v2"
