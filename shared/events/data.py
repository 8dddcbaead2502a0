"""Typed ``data`` payloads of every torchrelay event, grouped by domain."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, JsonValue, StringConstraints, model_validator

from torchrelay.shared.events.envelope import Data, Identifier, NonEmpty
from torchrelay.shared.events.sweep import Direction, SweepSpec, Value

Name = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
]
"""A dataset or model name: DNS-label shaped, so it is safe in paths, KV keys and Kubernetes."""

Version = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
Metrics = dict[str, float]
WorkspaceId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
"""A staged workspace: the content id ingest gave the folder (same files, same id)."""
Image = Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=r"^[^\s]+$")]


# --- dataset ----------------------------------------------------------------------------------


class DatasetIngestRequestedData(Data):
    request_id: Identifier
    name: Name
    source: NonEmpty = Field(
        description="A path under an allowed root, an http(s) URL, an upload id, or sklearn:digits."
    )
    format: Literal["auto", "npz", "csv", "images", "pt"] = "auto"


class DatasetStagedData(Data):
    request_id: Identifier | None = None
    name: Name
    version: Version
    path: NonEmpty = Field(description="Folder of the version, relative to the storage root.")
    format: Literal["npz", "csv", "images", "pt"]
    files: int = Field(ge=0)
    size_bytes: int = Field(ge=0)
    manifest_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class DatasetRejectedData(Data):
    request_id: Identifier
    name: Name | None = None
    source: NonEmpty | None = None
    code: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z_]{1,40}$")] = Field(
        description="Machine-readable reason (missing_path, unsafe_path, too_large, ...)."
    )
    reason: NonEmpty = Field(description="What was wrong and what to do about it.")


# --- train ------------------------------------------------------------------------------------


class DatasetRef(Data):
    name: Name
    version: Version


class Resources(Data):
    cpu: float = Field(default=1.0, gt=0, description="CPU cores per worker.")
    memory_mb: int = Field(default=1024, gt=0, description="Memory per worker, MiB.")
    gpu: int = Field(default=0, ge=0, description="GPUs per worker (nvidia.com/gpu).")


class Toleration(Data):
    """A Kubernetes toleration (``tolerationSeconds`` as ``toleration_seconds``)."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class Placement(Data):
    """Where the workers may run, for clusters with more than one pool (GPU and CPU nodes).
    The Kubernetes backend applies it to every worker pod; the local backend ignores it."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels a worker's node must have."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the workers tolerate (a GPU pool's taint)."
    )
    affinity: dict[str, JsonValue] = Field(
        default_factory=dict, description="A Kubernetes affinity object, passed as it is."
    )
    priority_class: str | None = Field(default=None, description="A PriorityClass name.")


class TrainingStage(Data):
    """How to train: the function, the workers, the schedule (a pipeline's training stage)."""

    entrypoint: Annotated[
        str,
        StringConstraints(
            pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$", max_length=256
        ),
    ] = Field(description="module:function of the training function.")
    workspace: WorkspaceId | None = Field(
        default=None,
        description="A staged workspace whose code the entrypoint is imported from (every "
        "rank puts it first on its import path). `torchrelay submit` stages the folder a spec "
        "file names (`workspace: ./src`) and puts its id here.",
    )
    image: Image | None = Field(
        default=None,
        description="Kubernetes: the container image of this stage's workers, for "
        "dependencies the default image lacks (it must contain torchrelay). The local "
        "backend runs workers with the train service's own Python and ignores it.",
    )
    model_name: Name
    world_size: int = Field(default=1, ge=1, le=1024)
    resources: Resources = Resources()
    placement: Placement = Placement()
    hyperparameters: dict[str, JsonValue] = Field(default_factory=dict)
    seed: int = Field(default=0, ge=0)
    checkpoint_every_steps: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    max_restarts: int = Field(default=3, ge=0)


class TrainJobSpec(TrainingStage):
    """What to train, on what, with which resources; the same for every backend."""

    dataset: DatasetRef


class TrainRequestedData(Data):
    run_id: Identifier | None = Field(default=None, description="Chosen by the service if absent.")
    spec: TrainJobSpec


class TrainRestartRequestedData(Data):
    run_id: Identifier
    reason: NonEmpty
    attempt: int = Field(ge=1, description="The restart number this request asks for.")


class TrainCancelRequestedData(Data):
    run_id: Identifier
    reason: NonEmpty = "cancelled by request"
    restart: bool = Field(
        default=False,
        description="The monitor cancels a stalled attempt to restart it: the run goes on "
        "(its train.failed is final only with no restart left). False: the run ends.",
    )


class TrainStartedData(Data):
    run_id: Identifier
    attempt: int = Field(ge=0, description="0 for the first launch, then one more per restart.")
    max_restarts: int = Field(default=0, ge=0, description="Restarts the run may still use up to.")
    world_size: int = Field(ge=1)
    backend: NonEmpty
    dataset: DatasetRef
    resumed_from_step: int | None = None


class TrainProgressData(Data):
    run_id: Identifier
    step: int = Field(ge=0)
    epoch: int = Field(ge=0)
    loss: float | None = Field(
        default=None,
        description="The step's loss; absent when it was NaN or infinite (the run diverged: "
        "JSON has no NaN).",
    )
    samples_per_s: float = Field(ge=0)
    metrics: dict[str, float | None] = Field(
        default_factory=dict,
        description="What the code passed to step_done(metrics=...); null for a value that "
        "was NaN or infinite.",
    )


class TrainCheckpointedData(Data):
    run_id: Identifier
    step: int = Field(ge=0)
    path: NonEmpty


class TrainCompletedData(Data):
    run_id: Identifier
    model_name: Name
    model_version: Version
    path: NonEmpty
    metrics: Metrics = Field(default_factory=dict)


class TrainFailedData(Data):
    run_id: Identifier
    attempt: int = Field(default=0, ge=0, description="The attempt that failed.")
    reason: NonEmpty
    rank: int | None = Field(default=None, ge=0)
    exit_code: int | None = None
    signal: NonEmpty | None = None
    log_tail: list[str] = Field(
        default_factory=list,
        max_length=200,
        description="The last lines of the failed rank's log, or of its exception's traceback "
        "when its code raised.",
    )
    final: bool = Field(
        default=False,
        description="True when no restart will follow: restarts exhausted, a cancel, or a "
        "failure that would repeat (the code cannot be imported, or raised before its first "
        "step).",
    )
    error_type: NonEmpty | None = Field(
        default=None,
        description="The qualified class of the exception the training code raised, if any.",
    )
    error_message: Annotated[str, StringConstraints(max_length=2000)] | None = Field(
        default=None, description="That exception's message (at most 2000 characters)."
    )


# --- pipeline ---------------------------------------------------------------------------------


class DatasetSource(Data):
    """Where a pipeline's dataset comes from: a source to stage (as in
    dataset.ingest.requested), or a version already staged under ``name`` (``version``; the
    newest one when neither is given)."""

    model_config = ConfigDict(
        json_schema_extra={  # what _source_or_version checks, for external publishers
            "not": {
                "required": ["source", "version"],
                "properties": {"source": {"type": "string"}, "version": {"type": "string"}},
            }
        }
    )

    name: Name
    source: NonEmpty | None = Field(
        default=None,
        description="What to stage, as in dataset.ingest.requested. `torchrelay submit` "
        "uploads a local path (relative to the spec file) and names the staged version instead.",
    )
    format: Literal["auto", "npz", "csv", "images", "pt"] = "auto"
    version: Version | None = Field(
        default=None, description="A version of `name` staged before (no source: the newest)."
    )

    @model_validator(mode="after")
    def _source_or_version(self) -> DatasetSource:
        if self.source is not None and self.version is not None:
            raise ValueError("give a source to stage or a staged version, not both")
        return self


class PromotionGate(Data):
    """What a trained model must reach before it replaces what serves (a pipeline's deploy
    stage): a model that fails its gate is not rolled out, and the serving version stays."""

    model_config = ConfigDict(
        json_schema_extra={  # what _says_something checks, for external publishers
            "anyOf": [
                {"required": ["min"], "properties": {"min": {"type": "number"}}},
                {"required": ["max"], "properties": {"max": {"type": "number"}}},
                {
                    "required": ["better_than_serving"],
                    "properties": {"better_than_serving": {"const": True}},
                },
            ]
        }
    )

    metric: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(
        description="A metric the model reports (ctx.export(..., metrics={...}))."
    )
    min: float | None = Field(default=None, description="The metric must be at least this.")
    max: float | None = Field(default=None, description="The metric must be at most this.")
    better_than_serving: bool = Field(
        default=False,
        description="The metric must beat the serving version's (any version passes when "
        "nothing serves yet, or the serving one does not report the metric).",
    )
    higher_is_better: bool = Field(
        default=True, description="False for metrics such as loss, where lower is better."
    )

    @model_validator(mode="after")
    def _says_something(self) -> PromotionGate:
        if self.min is None and self.max is None and not self.better_than_serving:
            raise ValueError("a gate needs min, max or better_than_serving")
        return self


class DeployStage(Data):
    enabled: bool = True
    replicas: int = Field(default=1, ge=1, le=64)
    gate: PromotionGate | None = Field(
        default=None, description="Roll out only a model that passes this gate."
    )


class PipelineSpec(Data):
    """Dataset source -> training job -> deployment. YAML or JSON; schema exported with the
    events (``torchrelay schema export``)."""

    name: Name
    dataset: DatasetSource
    training: TrainingStage
    deploy: DeployStage = DeployStage()
    sweep: SweepSpec | None = Field(
        default=None,
        description="Train several trials instead of one, each with its own hyperparameters "
        "laid over training.hyperparameters; the best trial's model goes on to the deploy "
        "stage (and its gate).",
    )


class PipelineSubmittedData(Data):
    """A pipeline (dataset source -> training -> deployment) was submitted."""

    spec: PipelineSpec


class PipelineRejectedData(Data):
    """A pipeline submission was refused; the pipeline stored under its id is unchanged."""

    pipeline_id: Identifier
    code: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z_]{1,40}$")] = Field(
        description="Machine-readable reason (conflicting_spec: the id holds another spec; "
        "invalid_sweep: the sweep cannot run, as the reason says; invalid_pipeline_id: the "
        "pipeline's training run cannot be named after its id)."
    )
    reason: NonEmpty = Field(description="What was wrong and what to do about it.")


# --- sweep ------------------------------------------------------------------------------------

TrialStopCode = Literal["early_stopped", "failed", "cancelled"]


class SweepStartedData(Data):
    """A pipeline's sweep began on its staged dataset: its trials are planned."""

    sweep_id: Identifier = Field(description="The pipeline id: a sweep is its pipeline's.")
    algorithm: Literal["grid", "random", "bayesian"]
    trials: int = Field(ge=1, description="Trials the sweep runs at most.")
    parallel: int = Field(ge=1)
    metric: NonEmpty
    direction: Direction
    dataset: DatasetRef


class SweepTrialStartedData(Data):
    """A trial's run was launched with these hyperparameters."""

    sweep_id: Identifier
    trial: int = Field(ge=0)
    run_id: Identifier
    hyperparameters: dict[str, Value]


class SweepTrialStoppedData(Data):
    """A trial ended without a model: stopped early, or its run failed for good."""

    sweep_id: Identifier
    trial: int = Field(ge=0)
    run_id: Identifier
    code: TrialStopCode = Field(
        description="early_stopped: the monitor's median stopping; cancelled: the sweep's "
        "cancel ended the run; failed: the run failed otherwise."
    )
    reason: NonEmpty
    objective: float | None = Field(
        default=None, description="The last objective the trial reported, if any."
    )


class SweepCancelRequestedData(Data):
    """Someone asks to stop a sweep: no trial starts any more, the running ones are cancelled,
    and the sweep ends without a best trial (its pipeline fails)."""

    sweep_id: Identifier = Field(description="The sweep's pipeline id.")
    reason: NonEmpty = "cancelled by request"


class SweepCompletedData(Data):
    """Every trial ended (or the sweep was cancelled): the best one (None when none completed,
    or on a cancel) goes on to the deploy stage."""

    sweep_id: Identifier
    metric: NonEmpty
    direction: Direction
    best_trial: int | None = Field(default=None, ge=0)
    run_id: Identifier | None = None
    hyperparameters: dict[str, Value] = Field(default_factory=dict)
    objective: float | None = None
    model_name: Name
    model_version: Version | None = None
    metrics: Metrics = Field(
        default_factory=dict, description="Every final metric of the best trial's model."
    )
    completed: int = Field(ge=0)
    stopped: int = Field(ge=0, description="Trials stopped early.")
    failed: int = Field(
        ge=0, description="Trials that failed; those the sweep's cancel ended are not counted."
    )
    cancelled: bool = Field(default=False, description="The sweep was cancelled.")
    reason: NonEmpty | None = Field(
        default=None,
        description="Why there is no best trial: the sweep was cancelled (and why), no trial "
        "completed, or the sweep could not run (a bayesian sweep without Optuna).",
    )


# --- model ------------------------------------------------------------------------------------


class ModelDeployRequestedData(Data):
    model_name: Name
    version: Version
    replicas: int = Field(default=1, ge=1, le=64)


class ModelRollbackRequestedData(Data):
    model_name: Name
    to_version: Version | None = Field(default=None, description="Previous version if absent.")


class ModelRolloutStartedData(Data):
    model_name: Name
    version: Version
    previous_version: Version | None = None


class ModelDeployedData(Data):
    model_name: Name
    version: Version
    endpoint: NonEmpty


class ModelRolloutFailedData(Data):
    model_name: Name
    version: Version
    reason: NonEmpty
    serving_version: Version | None = Field(
        default=None, description="The version that keeps serving, if any."
    )


class ModelUndeployRequestedData(Data):
    model_name: Name
    reason: NonEmpty = Field(
        default="undeployed by request", description="Why the model is taken down (logged)."
    )


class ModelUndeployedData(Data):
    model_name: Name
    version: Version = Field(description="The version that served until now.")
    endpoint: NonEmpty | None = Field(
        default=None, description="The endpoint that went away (None if none was recorded)."
    )
    reason: NonEmpty = Field(description="Why, as the request said.")


# --- platform ---------------------------------------------------------------------------------

PruneKind = Literal["datasets", "models", "runs", "pipelines", "workspaces"]
PRUNE_KINDS: tuple[PruneKind, ...] = ("datasets", "models", "runs", "pipelines", "workspaces")


class PruneRequestedData(Data):
    """Reclaim what is older than ``older_than_s``: storage folders and their records."""

    older_than_s: float = Field(
        gt=0, description="Seconds: only what is at least this old is removed."
    )
    dry_run: bool = Field(default=False, description="Plan only: say what would go; remove none.")
    kinds: list[PruneKind] = Field(
        default_factory=lambda: list(PRUNE_KINDS),
        min_length=1,
        description="What may be removed (default: every kind). Keep rules apply to all kinds.",
    )


class PrunedItem(Data):
    """One dataset version, model version, run, pipeline or workspace the prune looked at."""

    kind: PruneKind
    name: NonEmpty = Field(description="name@version, a run id, a pipeline id or a workspace id.")
    age_s: float = Field(ge=0, description="Seconds since it was created or last changed.")
    reason: NonEmpty | None = Field(default=None, description="Why it is kept (kept items only).")


class PrunedData(Data):
    """What a prune removed (or would remove, on a dry run) and what it kept, and why."""

    request_id: Identifier = Field(description="The id of the prune.requested event.")
    dry_run: bool
    older_than_s: float = Field(gt=0)
    removed: list[PrunedItem] = Field(description="Removed (dry run: would be removed).")
    kept: list[PrunedItem] = Field(description="Old enough, but kept: each with its reason.")
    bytes_freed: int = Field(ge=0, description="Bytes of the removed folders (dry run: would be).")
    problems: list[NonEmpty] = Field(
        default_factory=list,
        description="What could not be removed (a folder, a record that changed meanwhile).",
    )


# --- dead letters -----------------------------------------------------------------------------


class DeadLetteredData(Data):
    """An event no consumer could handle: bounded in size whatever the original's size.

    It names the original (stream sequence, size, sha256, ids) and keeps only a short prefix of
    it; the original itself stays in the stream for the stream's retention period, at
    ``original_sequence``, from where ``torchrelay deadletters replay`` republishes it.
    """

    original_subject: NonEmpty
    original_sequence: int = Field(
        ge=1, description="Stream sequence of the original: where to fetch or replay it from."
    )
    original_msg_id: NonEmpty | None = Field(
        default=None,
        description="The original's Nats-Msg-Id (its dedup key), else its event id, if any.",
    )
    original_type: NonEmpty | None = Field(default=None, description="When it decoded.")
    original_id: NonEmpty | None = Field(default=None, description="Event id, when it decoded.")
    original_size_bytes: int = Field(ge=0, description="Size of the original payload.")
    original_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="sha256 of the original payload, hex."
    )
    original_prefix: Annotated[str, StringConstraints(max_length=2048)] = Field(
        description="The start of the original payload (at most 1 KiB of it), text or base64."
    )
    original_prefix_encoding: Literal["utf-8", "base64"]
    original_truncated: bool = Field(
        description="True when the prefix is not the whole original payload."
    )
    consumer: NonEmpty = Field(description="The durable consumer that gave up.")
    reason: NonEmpty
    deliveries: int = Field(ge=1)
