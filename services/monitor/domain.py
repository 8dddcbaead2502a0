"""Pure rules of the monitor: keeping metric labels bounded, when to restart a run, and when
to stop a sweep's trial early."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from torchrelay.shared.events import (
    AnyEvent,
    DatasetRejected,
    ModelDeployed,
    ModelRolloutFailed,
    SweepCompleted,
    TrainCompleted,
    TrainFailed,
)
from torchrelay.shared.sweep_state import (
    TRIAL_STATUSES,
    SweepRecord,
    Trial,
    TrialHistory,
    TrialStatus,
    trial_run_id,
)
from torchrelay.shared.sweeps import History, best, should_stop

SERVICES = frozenset({"ingest", "train", "serve", "monitor", "cli"})
EXTERNAL = "external"
UNKNOWN = "unknown"


def source_label(source: str) -> str:
    """The producing service for ``/torchrelay/<service>[/...]``, else ``external``.

    Sources are free-form URIs chosen by publishers; labelling by them verbatim would let any
    publisher create unbounded time series.
    """
    parts = source.strip("/").split("/")
    if len(parts) >= 2 and parts[0] == "torchrelay" and parts[1] in SERVICES:
        return parts[1]
    return EXTERNAL


def type_label(event_type: str | None, known: frozenset[str]) -> str:
    """An event type if torchrelay knows it, else ``unknown`` (malformed payloads)."""
    return event_type if event_type in known else UNKNOWN


# --- recovery ---------------------------------------------------------------------------------

RunState = Literal["running", "stalled", "ended"]
PROGRESS_CLOCK_SKEW = timedelta(seconds=5)
"""How far a rank's node's clock may lag the train service's."""


class RunWatch(BaseModel):
    """What the monitor knows of a run, in the ``monitor`` bucket (shared by its replicas)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    attempt: int
    max_restarts: int
    state: RunState
    started_at: datetime
    attempt_started_at: datetime
    last_progress_at: datetime | None = None
    pipeline_id: str | None = None


class Stamp(BaseModel):
    """When a stage began (an ingest request, a rollout, a pipeline), to time it when it ends."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at: datetime
    last_stage: str | None = None
    """For a pipeline: the stage whose success ends it (train when it does not deploy)."""
    sweep: bool = False
    """For a pipeline: whether it trains a sweep (its trials' runs do not end it)."""


def backoff_s(next_attempt: int, *, base_s: float, cap_s: float) -> float:
    """Exponential backoff before restart ``next_attempt`` (1, 2, ...): base, 2x base, ..."""
    return float(min(cap_s, base_s * 2 ** max(next_attempt - 1, 0)))


def restart_wait_s(
    failed_at: datetime,
    now: datetime,
    next_attempt: int,
    *,
    base_s: float,
    cap_s: float,
    progressed: bool = False,
) -> float:
    """Seconds until restart ``next_attempt`` of a run whose attempt failed at ``failed_at``
    is due (0 once it is). Counted from the failure event's own time, so every replica and
    every redelivery of that event agrees on when.

    An attempt that ``progressed`` (reported training progress before it failed) is restarted
    at once: the backoff is there for crash loops, attempts that fail before they train, and
    one that trained and then lost a rank is not one. Waiting would only add to the time its
    job stands still; its restarts stay bounded by ``max_restarts``."""
    if progressed:
        return 0.0
    due_in = backoff_s(next_attempt, base_s=base_s, cap_s=cap_s)
    return max(0.0, due_in - (now - failed_at).total_seconds())


def stalled(watch: RunWatch, now: datetime, *, after_s: float, start_after_s: float) -> bool:
    """A running attempt that has reported no progress for ``after_s`` since its last report,
    or none at all within ``start_after_s`` of its start.

    The stall clock starts at the first progress report, not at the start: a start takes as
    long as the backend needs to place every rank (pods pending for nodes, images pulling, a
    queue), which the backend bounds and explains itself, and rank 0 reports only once every
    rank has joined its group. ``start_after_s`` only catches an attempt that never reports.
    """
    if watch.state != "running":
        return False
    if watch.last_progress_at is None:
        return (now - watch.attempt_started_at).total_seconds() > start_after_s
    return (now - watch.last_progress_at).total_seconds() > after_s


def progress_counts(watch: RunWatch | None, at: datetime) -> bool:
    """Whether a progress report made ``at`` is news of the watched attempt: not of an ended
    or cancelled one, nor of an earlier attempt delivered late (made before this one began,
    give or take the clocks of the nodes the ranks run on)."""
    return (
        watch is not None
        and watch.state == "running"
        and at >= watch.attempt_started_at - PROGRESS_CLOCK_SKEW
    )


def progress_due(watch: RunWatch | None, at: datetime, every_s: float) -> bool:
    """Whether a progress report made ``at`` is to be written to the watch: news of the
    watched attempt (:func:`progress_counts`) and ``every_s`` or more after the last one
    written (never earlier: a late report does not move the clock back). The reports between
    change nothing a stall check reads, by more than ``every_s``."""
    if watch is None or not progress_counts(watch, at):
        return False
    last = watch.last_progress_at
    return last is None or (at - last).total_seconds() >= every_s


def stall_reason(watch: RunWatch, *, after_s: float, start_after_s: float) -> str:
    """Why an attempt was taken for stalled, as the restart or the final failure says it."""
    if watch.last_progress_at is None:
        return f"no progress within {start_after_s:g}s of its start"
    return f"no progress for {after_s:g}s"


def can_restart(watch: RunWatch) -> bool:
    return watch.attempt < watch.max_restarts


class Recovery(enum.StrEnum):
    """What the monitor does about a ``train.failed``."""

    RESTART = "restart"
    """Ask for the next attempt (the failure was not final)."""
    GIVE_UP = "give_up"
    """The attempt cancelled for stalling has no restart left: end the run and report why."""
    END = "end"
    """The failure was final: the run is over, nothing more to ask."""
    IGNORE = "ignore"
    """The run ended already: a redelivery, or the monitor's own final report coming back."""


def start_moves_watch(current: RunWatch | None, attempt: int) -> bool:
    """Whether a ``train.started`` of ``attempt`` changes the watch: only one of a later
    attempt than the watched one does. Replicas and redeliveries handle the events of one run
    out of order, and a late or repeated start must not rewind the watch (nor revive it)."""
    return current is None or attempt > current.attempt


def watch_at_failure(current: RunWatch | None, attempt: int) -> RunWatch | None:
    """The watch as of a failure of ``attempt``: a failure handled before its attempt's start
    moves the watch to that attempt, so the restart it leads to is the next one."""
    if current is not None and current.state != "ended" and current.attempt < attempt:
        # The progress it holds was an earlier attempt's: of this one nothing is known.
        return current.model_copy(
            update={"attempt": attempt, "state": "running", "last_progress_at": None}
        )
    return current


def progressed(watch: RunWatch) -> bool:
    """Whether the watched attempt reported progress (the watch of each attempt starts
    without any: see :func:`start_moves_watch`)."""
    return watch.last_progress_at is not None


def cancelled_for_stall(watch: RunWatch | None, attempt: int) -> bool:
    """Whether ``attempt`` is the one the monitor cancelled because it stalled."""
    return watch is not None and watch.state == "stalled" and attempt == watch.attempt


def after_failure(watch: RunWatch | None, *, attempt: int, final: bool) -> Recovery:
    """What a ``train.failed`` of ``attempt`` (``final`` or not) leads to, given the watch.

    A run that ended is ended once: it is given up (and counted) once. A final failure is
    never restarted, not even a stalled attempt's (its cancel came from a user too).
    """
    if watch is None:
        return Recovery.END
    if watch.state == "ended" or attempt < watch.attempt:
        return Recovery.IGNORE  # over, or a late failure of an attempt already followed up
    if cancelled_for_stall(watch, attempt) and not can_restart(watch):
        return Recovery.GIVE_UP
    return Recovery.END if final else Recovery.RESTART


def dead_letter_category(reason: str) -> str:
    """A bounded label for a dead letter's free-text reason."""
    if reason.startswith(("payload ", "unknown event type")) or " failed validation" in reason:
        return "malformed"
    if reason.startswith(("gave up after", "exhausted")):
        return "exhausted"
    return "refused"


PIPELINE_ENDINGS = (
    ModelDeployed,
    TrainCompleted,
    DatasetRejected,
    ModelRolloutFailed,
    TrainFailed,
    SweepCompleted,
)
"""The only event types :func:`pipeline_end` can take for an end: no other needs the clock."""


def pipeline_end(event: AnyEvent, last_stage: str | None, *, sweep: bool = False) -> str | None:
    """How a pipeline ended, if ``event`` ends it: "succeeded", "failed" or None. A sweep's
    pipeline ends at its sweep, not at a trial's run: with no completed trial, or with the
    best one when it does not deploy."""
    trained = isinstance(event, SweepCompleted) if sweep else isinstance(event, TrainCompleted)
    best = not isinstance(event, SweepCompleted) or event.data.best_trial is not None
    if isinstance(event, ModelDeployed) or (trained and best and last_stage == "train"):
        return "succeeded"
    failed = isinstance(event, DatasetRejected | ModelRolloutFailed) or (
        isinstance(event, SweepCompleted) and event.data.best_trial is None
    )
    failed_run = not sweep and isinstance(event, TrainFailed) and event.data.final
    return "failed" if failed or failed_run else None


# --- sweeps -----------------------------------------------------------------------------------

STOP_REASON_MAX = 512
"""The longest reason a cancel request carries."""


def may_be_trial(run_id: str, pipeline_id: str) -> bool:
    """Whether ``run_id`` can be a trial of the sweep ``pipeline_id``: the train service names
    every trial's run :func:`trial_run_id`. Necessary, not sufficient (any run may be named so):
    it only spares the runs of other pipelines a read of the ``sweeps`` bucket."""
    prefix = trial_run_id(pipeline_id, 0)[:-1]
    index = run_id[len(prefix) :]
    return run_id.startswith(prefix) and index.isascii() and index.isdigit()


def running_trial(record: SweepRecord, run_id: str) -> Trial | None:
    """The trial that ``run_id`` runs, while both the sweep and the trial run: the progress of
    anything else (a trial that ended, a sweep that is over) changes nothing."""
    trial = record.trial_of(run_id)
    if record.status != "running" or trial is None or trial.status != "running":
        return None
    return trial


def with_report(history: TrialHistory | None, step: int, value: float) -> TrialHistory | None:
    """The history with the objective reported at ``step``; None when it holds that point
    already (the same report delivered again, or handled by two replicas)."""
    current = history or TrialHistory()
    if any(s == step and _same(v, value) for s, v in current.points):
        return None
    return current.with_point(step, value)


def _same(a: float, b: float) -> bool:
    """Equal, NaN included (NaN != NaN, but a diverged report delivered twice is one)."""
    return a == b or (math.isnan(a) and math.isnan(b))


def stop_reason(record: SweepRecord, history: History, completed: Sequence[History]) -> str | None:
    """Why the trial with ``history`` should stop now by its sweep's early-stopping rule
    (None without a rule), cut to what a cancel request carries."""
    rule = record.spec.early_stopping
    if rule is None:
        return None
    reason = should_stop(history, completed, rule, record.spec.objective.direction)
    return None if reason is None else reason[:STOP_REASON_MAX]


def request_stop(record: SweepRecord | None, run_id: str, reason: str) -> SweepRecord | None:
    """The record with ``reason`` written into the trial of ``run_id`` (so the train service
    ends it as stopped, not failed); None when there is nothing to write: the trial is not
    running, or a stop was asked for already (by a redelivery or another replica)."""
    if record is None:
        return None
    trial = running_trial(record, run_id)
    if trial is None or trial.stop_requested is not None:
        return None
    trials = [
        t.model_copy(update={"stop_requested": reason}) if t.run_id == run_id else t
        for t in record.trials
    ]
    return record.model_copy(update={"trials": trials})


def trial_counts(record: SweepRecord) -> dict[TrialStatus, int]:
    """The sweep's trials by status, every status present (0 when none)."""
    return {status: record.count(status) for status in TRIAL_STATUSES}


def best_objective(record: SweepRecord) -> float | None:
    """The best final objective among the sweep's completed trials so far (None: none yet)."""
    results = {t.index: t.objective for t in record.trials if t.status == "completed"}
    winner = best(results, record.spec.objective.direction)
    return None if winner is None else results[winner]
