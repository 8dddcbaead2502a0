"""Events: the only place torchrelay's event types are defined.

Import event classes from here; :data:`EVENT_TYPES` maps each type name to its class and
:func:`decode` turns a payload into the right one.
"""

from torchrelay.shared.events import data
from torchrelay.shared.events.catalog import (
    DatasetIngestRequested,
    DatasetRejected,
    DatasetStaged,
    DeadLettered,
    ModelDeployed,
    ModelDeployRequested,
    ModelRollbackRequested,
    ModelRolloutFailed,
    ModelRolloutStarted,
    ModelUndeployed,
    ModelUndeployRequested,
    PipelineRejected,
    PipelineSubmitted,
    Pruned,
    PruneRequested,
    SweepCompleted,
    SweepStarted,
    SweepTrialStarted,
    SweepTrialStopped,
    TrainCancelRequested,
    TrainCheckpointed,
    TrainCompleted,
    TrainFailed,
    TrainProgressed,
    TrainRequested,
    TrainRestartRequested,
    TrainStarted,
)
from torchrelay.shared.events.envelope import (
    EVENT_TYPES,
    SUBJECT_PREFIX,
    AnyEvent,
    CloudEvent,
    InvalidEvent,
    decode,
    subject_for_type,
)

ALL_SUBJECTS = f"{SUBJECT_PREFIX}.>"
DEADLETTER_SUBJECT = DeadLettered.nats_subject

__all__ = [
    "ALL_SUBJECTS",
    "DEADLETTER_SUBJECT",
    "EVENT_TYPES",
    "SUBJECT_PREFIX",
    "AnyEvent",
    "CloudEvent",
    "DatasetIngestRequested",
    "DatasetRejected",
    "DatasetStaged",
    "DeadLettered",
    "InvalidEvent",
    "ModelDeployRequested",
    "ModelDeployed",
    "ModelRollbackRequested",
    "ModelRolloutFailed",
    "ModelRolloutStarted",
    "ModelUndeployRequested",
    "ModelUndeployed",
    "PipelineRejected",
    "PipelineSubmitted",
    "PruneRequested",
    "Pruned",
    "SweepCompleted",
    "SweepStarted",
    "SweepTrialStarted",
    "SweepTrialStopped",
    "TrainCancelRequested",
    "TrainCheckpointed",
    "TrainCompleted",
    "TrainFailed",
    "TrainProgressed",
    "TrainRequested",
    "TrainRestartRequested",
    "TrainStarted",
    "data",
    "decode",
    "subject_for_type",
]
