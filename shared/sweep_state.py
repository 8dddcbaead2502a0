"""Sweep records in the ``sweeps`` bucket: a sweep's trials and how each ended (the train
service writes them), and each trial's objective history (the monitor appends to it).

Pure but for :func:`sweep_key` and :func:`history_key`: the transitions (:func:`fill_slots`,
:func:`end_trial`, :func:`conclude`) are applied inside compare-and-set updates, so replicas
that advance one sweep at once agree, and one that dies half-way leaves a record the next
one carries on from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field

from torchrelay.shared.events.data import PipelineSpec, TrainJobSpec
from torchrelay.shared.events.sweep import SweepSpec, Value
from torchrelay.shared.pipelines import MAX_RUN_ID, is_run_id, train_run_id
from torchrelay.shared.sweeps import History, best, sweep_refusal, trials

SWEEPS = "sweeps"
"""The bucket."""
SWEEP_PREFIX = "sweep"
HISTORY_PREFIX = "trial"


def sweep_key(sweep_id: str) -> str:
    from torchrelay.shared.state import key_part

    return f"{SWEEP_PREFIX}.{key_part(sweep_id)}"


def history_key(sweep_id: str, index: int) -> str:
    from torchrelay.shared.state import key_part

    return f"{HISTORY_PREFIX}.{key_part(sweep_id)}.{index}"


# --- the record in the ``sweeps`` bucket ---------------------------------------------------------

TrialStatus = Literal["pending", "running", "completed", "stopped", "failed", "cancelled"]
"""``stopped``: by early stopping; ``cancelled``: its sweep's cancel ended its run; ``failed``:
its run failed otherwise (a cancel of the run alone included)."""
TRIAL_STATUSES: tuple[TrialStatus, ...] = get_args(TrialStatus)
ENDED_WITHOUT_MODEL: frozenset[TrialStatus] = frozenset({"stopped", "failed", "cancelled"})
"""What ``sweep.trial.stopped`` says, and Optuna learns as a failure."""
TRIAL_ENDED: frozenset[TrialStatus] = ENDED_WITHOUT_MODEL | {"completed"}
SweepStatus = Literal["running", "completed", "failed"]
REASON_MAX = 512
"""A stopped or failed trial's reason is cut to this (what an event carries)."""
MAX_HISTORY_POINTS = 512
"""Points a trial's objective history keeps: beyond, every other older point goes (the
newest is always kept), so a long trial's history stays a few KiB in its KV value."""


class Trial(BaseModel):
    """One trial of a sweep: its hyperparameters, its run, and how it ended."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(ge=0)
    params: dict[str, Value]
    run_id: str
    status: TrialStatus = "pending"
    started: datetime | None = None
    ended: datetime | None = None
    objective: float | None = None
    """The final objective of a completed trial; the last one reported by a stopped one."""
    model_version: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    """A completed trial's final metrics (what its model reports, and its gate judges)."""
    stop_requested: str | None = None
    """Why the monitor stops the trial early: written before it asks for the cancel, so the
    trial ends as stopped (not failed) whichever replica sees its run end."""
    reason: str | None = None
    """Why a stopped or failed trial ended."""
    announced: bool = True
    """Whether the event of the trial's status is on the bus (``sweep.trial.started`` for a
    running trial, ``sweep.trial.stopped`` for a stopped or failed one). False from the
    compare-and-set that changed the status until it is published: a replica that dies in
    between leaves it to whichever replica advances the sweep next."""


class SweepRecord(BaseModel):
    """A sweep in the ``sweeps`` bucket, keyed by its pipeline id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sweep_id: str
    spec: SweepSpec
    job: TrainJobSpec
    """The pipeline's training stage on the staged dataset: each trial trains this with its
    hyperparameters laid over ``job.hyperparameters``."""
    status: SweepStatus = "running"
    trials: list[Trial]
    best: int | None = None
    created: datetime
    updated: datetime
    announced: bool = True
    """False from the sweep's end until ``sweep.completed`` is on the bus and the pipeline's
    train stage is written."""
    cancelled: str | None = None
    """Why the sweep was cancelled (``sweep.cancel.requested``): no trial starts any more, and
    it ends without a best trial once its running trials ended."""

    def trial_job(self, trial: Trial) -> TrainJobSpec:
        hyperparameters = {**self.job.hyperparameters, **trial.params}
        return self.job.model_copy(update={"hyperparameters": hyperparameters})

    def trial_of(self, run_id: str) -> Trial | None:
        return next((trial for trial in self.trials if trial.run_id == run_id), None)

    def count(self, status: TrialStatus) -> int:
        return sum(1 for trial in self.trials if trial.status == status)

    @property
    def best_trial(self) -> Trial | None:
        return None if self.best is None else self.trials[self.best]


class TrialHistory(BaseModel):
    """A trial's objective as its progress reports gave it (the monitor appends, median
    stopping reads), under ``trial.<sweep>.<index>`` in the ``sweeps`` bucket. A diverged
    trial's NaN or infinity is kept (JSON has none: stored as the strings "NaN", "Infinity")."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")

    points: list[tuple[int, float]] = Field(default_factory=list)

    def with_point(self, step: int, value: float) -> TrialHistory:
        points = [*self.points, (step, value)]
        if len(points) > MAX_HISTORY_POINTS:
            points = [*points[:-1:2], points[-1]]
        return TrialHistory(points=points)


def trial_run_id(sweep_id: str, index: int) -> str:
    """The run id of trial ``index``: the same from every replica, so launching it twice
    launches one run."""
    return f"{sweep_id}.trial-{index}"


def trial_run_id_refusal(sweep_id: str, spec: SweepSpec) -> str | None:
    """Why the sweep's trials could not be runs under its id, or None: a run id names its
    model version (letters, digits, '.', '_' and '-', at most 64), and the longest is the
    last trial's."""
    longest = trial_run_id(sweep_id, spec.max_trials - 1)
    if is_run_id(longest):
        return None
    return (
        f"the pipeline id {sweep_id!r} is too long or has characters a run id cannot: its "
        f"trials' runs would be named up to {longest!r} (letters, digits, '.', '_' and '-', "
        f"at most {MAX_RUN_ID}); submit under a shorter name or pipeline id"
    )


class Refusal(NamedTuple):
    """Why a submission is refused: ``pipeline.rejected``'s code and reason."""

    code: str
    reason: str


def submission_refusal(pipeline_id: str, spec: PipelineSpec) -> Refusal | None:
    """Why the pipeline cannot run under ``pipeline_id``, or None: what ingest refuses a
    submission for (``pipeline.rejected``), the client refuses before publishing it, and the
    monitor starts no clock for. A sweep that cannot run (:func:`sweep_refusal`, or trials'
    run ids it cannot name) is ``invalid_sweep``; a pipeline id its training run cannot be
    named after is ``invalid_pipeline_id``."""
    if spec.sweep is not None:
        problem = sweep_refusal(spec.sweep) or trial_run_id_refusal(pipeline_id, spec.sweep)
        return None if problem is None else Refusal("invalid_sweep", f"invalid sweep: {problem}")
    run_id = train_run_id(pipeline_id)
    if is_run_id(run_id):
        return None
    return Refusal(
        "invalid_pipeline_id",
        f"the pipeline id {pipeline_id!r} is too long or has characters a run id cannot: its "
        f"training run would be {run_id!r} (letters, digits, '.', '_' and '-', at most "
        f"{MAX_RUN_ID}); submit under a shorter name or pipeline id",
    )


def new_sweep(sweep_id: str, spec: SweepSpec, job: TrainJobSpec, now: datetime) -> SweepRecord:
    """A sweep with its trials planned (grid or random), none started. A bayesian sweep plans
    none ahead: :func:`fill_slots` asks for each trial when a slot frees."""
    planned = (
        []
        if spec.algorithm == "bayesian"
        else [
            Trial(index=index, params=params, run_id=trial_run_id(sweep_id, index))
            for index, params in enumerate(trials(spec))
        ]
    )
    return SweepRecord(
        sweep_id=sweep_id, spec=spec, job=job, trials=planned, created=now, updated=now
    )


Suggest = Callable[["SweepRecord"], dict[str, Value]]
"""Hyperparameters for a bayesian sweep's next trial, from the trials so far (Optuna)."""


def fill_slots(record: SweepRecord, now: datetime, suggest: Suggest | None = None) -> SweepRecord:
    """Start pending trials, in order, until ``parallel`` run (unannounced); a bayesian sweep
    adds each trial as its slot frees, with ``suggest``'s hyperparameters (none without one:
    the sweep waits). A sweep that is over starts nothing. ``record`` itself when nothing
    starts."""
    free = record.spec.parallel - record.count("running")
    if record.status != "running" or record.cancelled is not None or free <= 0:
        return record
    updated = list(record.trials)
    for position, trial in enumerate(updated):
        if free == 0:
            break
        if trial.status == "pending":
            updated[position] = trial.model_copy(
                update={"status": "running", "started": now, "announced": False}
            )
            free -= 1
    bayesian = record.spec.algorithm == "bayesian"
    while free > 0 and bayesian and suggest is not None and len(updated) < record.spec.max_trials:
        index = len(updated)
        params = suggest(record.model_copy(update={"trials": updated}))
        updated.append(
            Trial(
                index=index,
                params=params,
                run_id=trial_run_id(record.sweep_id, index),
                status="running",
                started=now,
                announced=False,
            )
        )
        free -= 1
    if updated == record.trials:
        return record
    return record.model_copy(update={"trials": updated, "updated": now})


def end_trial(
    record: SweepRecord,
    index: int,
    now: datetime,
    *,
    objective: float | None,
    model_version: str | None = None,
    metrics: Mapping[str, float] | None = None,
    failure: str | None = None,
    cancelled: bool = False,
) -> SweepRecord:
    """The record after trial ``index``'s run ended: completed with ``objective`` (and its
    model), or (``failure``) stopped when the monitor had asked for it, else cancelled when the
    sweep's cancel ended the run (``cancelled``), else failed. A trial that already ended keeps
    its outcome (``record`` itself is returned)."""
    trial = record.trials[index]
    if trial.status in TRIAL_ENDED:
        return record
    if failure is None:
        change: dict[str, object] = {
            "status": "completed",
            "objective": objective,
            "model_version": model_version,
            "metrics": dict(metrics or {}),
        }
    else:
        status: TrialStatus
        if trial.stop_requested is not None:
            status, reason = "stopped", trial.stop_requested
        elif cancelled and record.cancelled is not None:  # the sweep's cancel ended its run
            status, reason = "cancelled", f"sweep cancelled: {record.cancelled}"
        else:  # on its own, the sweep cancelled or not
            status, reason = "failed", failure
        change = {
            "status": status,
            "objective": objective,
            "reason": None if reason is None else reason[:REASON_MAX],
            "announced": False,
        }
    updated = list(record.trials)
    updated[index] = trial.model_copy(update={**change, "ended": now})
    return record.model_copy(update={"trials": updated, "updated": now})


def conclude(record: SweepRecord, now: datetime) -> SweepRecord:
    """The sweep ended when no trial is pending or running (cancelled: none running):
    completed with the best completed trial, or failed when none completed or it was
    cancelled (unannounced). Otherwise ``record`` itself."""
    unplanned = record.spec.algorithm == "bayesian" and len(record.trials) < record.spec.max_trials
    if record.cancelled is not None:  # pending trials never run: only running ones are awaited
        unplanned = False
        waiting = record.count("running") > 0
    else:
        waiting = any(trial.status not in TRIAL_ENDED for trial in record.trials)
    if record.status != "running" or unplanned or waiting:
        return record
    results = {t.index: t.objective for t in record.trials if t.status == "completed"}
    winner = None if record.cancelled else best(results, record.spec.objective.direction)
    return record.model_copy(
        update={
            "status": "failed" if winner is None else "completed",
            "best": winner,
            "updated": now,
            "announced": False,
        }
    )


def cancel(record: SweepRecord, reason: str, now: datetime) -> SweepRecord:
    """The record after a cancel: a sweep that is over, or cancelled already, stays as it is
    (``record`` itself)."""
    if record.status != "running" or record.cancelled is not None:
        return record
    return record.model_copy(update={"cancelled": reason, "updated": now})


def completed_histories(record: SweepRecord, histories: Mapping[int, History]) -> list[History]:
    """The histories of the sweep's completed trials (what median stopping compares with)."""
    return [
        histories[t.index]
        for t in record.trials
        if t.status == "completed" and t.index in histories
    ]


def ranked(record: SweepRecord) -> list[Trial]:
    """The trials best first: the completed ones by their final objective, then the others by
    the last objective they reported (another quantity: a progress report's, not the final
    metric), then those without one, each group in trial order on ties."""
    sign = -1.0 if record.spec.objective.direction == "maximize" else 1.0

    def key(trial: Trial) -> tuple[int, float, int]:
        value = trial.objective
        if value is None or math.isnan(value):
            return (2, 0.0, trial.index)
        return (0 if trial.status == "completed" else 1, sign * value, trial.index)

    return sorted(record.trials, key=key)
