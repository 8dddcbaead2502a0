"""The sweep record's transitions: what a compare-and-set applies when a sweep advances."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from torchrelay.shared.events.data import DatasetRef, TrainJobSpec
from torchrelay.shared.sweep_state import (
    MAX_HISTORY_POINTS,
    SweepRecord,
    TrialHistory,
    cancel,
    conclude,
    end_trial,
    fill_slots,
    new_sweep,
    ranked,
)
from torchrelay.shared.sweeps import SweepSpec

NOW = datetime(2026, 12, 3, tzinfo=UTC)
JOB = TrainJobSpec(
    dataset=DatasetRef(name="digits", version="v1"),
    entrypoint="example:train",
    model_name="digits",
    hyperparameters={"epochs": 3, "lr": 1.0},
)


def planned(**fields: object) -> SweepRecord:
    spec = SweepSpec.model_validate(
        {
            "space": {"lr": {"type": "choice", "values": [0.1, 0.01, 0.001, 0.0001]}},
            "algorithm": "grid",
            "objective": {"metric": "accuracy", "direction": "maximize"},
            "max_trials": 4,
            "parallel": 2,
            **fields,
        }
    )
    return new_sweep("s1", spec, JOB, NOW)


def test_a_new_sweep_plans_every_trial_with_its_own_run_and_starts_none() -> None:
    record = planned()
    assert [t.run_id for t in record.trials] == [f"s1.trial-{i}" for i in range(4)]
    assert {t.status for t in record.trials} == {"pending"}
    assert record.trial_job(record.trials[2]).hyperparameters == {"epochs": 3, "lr": 0.001}


def test_free_slots_start_pending_trials_in_order_unannounced() -> None:
    record = fill_slots(planned(), NOW)
    assert [t.status for t in record.trials] == ["running", "running", "pending", "pending"]
    assert [t.announced for t in record.trials[:2]] == [False, False]
    assert fill_slots(record, NOW) is record, "no free slot: nothing changes"


def test_a_trial_that_ends_frees_its_slot_for_the_next() -> None:
    record = fill_slots(planned(), NOW)
    record = fill_slots(end_trial(record, 0, NOW, objective=0.9, model_version="s1.trial-0"), NOW)
    assert [t.status for t in record.trials] == ["completed", "running", "running", "pending"]


def test_an_ended_trial_keeps_its_outcome() -> None:
    record = end_trial(fill_slots(planned(), NOW), 0, NOW, objective=0.9)
    assert end_trial(record, 0, NOW, objective=None, failure="late") is record


def test_a_failure_is_a_stop_when_the_monitor_asked_for_one() -> None:
    record = fill_slots(planned(), NOW)
    trials = list(record.trials)
    trials[1] = trials[1].model_copy(update={"stop_requested": "median stopping: worse"})
    record = record.model_copy(update={"trials": trials})
    record = end_trial(record, 0, NOW, objective=None, failure="exit code 1")
    record = end_trial(record, 1, NOW, objective=0.2, failure="cancelled by request")
    assert [(t.status, t.reason) for t in record.trials[:2]] == [
        ("failed", "exit code 1"),
        ("stopped", "median stopping: worse"),
    ]
    assert record.trials[1].objective == 0.2
    assert not record.trials[1].announced, "its sweep.trial.stopped is still to publish"


def test_the_sweep_ends_with_the_best_completed_trial_once_every_trial_ended() -> None:
    record = fill_slots(planned(), NOW)
    results = {0: 0.5, 1: 0.97, 2: 0.9}
    for index, value in results.items():
        record = fill_slots(end_trial(record, index, NOW, objective=value), NOW)
        assert conclude(record, NOW) is record, "a trial is still to end"
    record = end_trial(record, 3, NOW, objective=None, failure="diverged")
    ended = conclude(record, NOW)
    assert (ended.status, ended.best, ended.announced) == ("completed", 1, False)
    assert [t.index for t in ranked(ended)] == [1, 2, 0, 3]


def test_a_sweep_whose_trials_all_failed_fails() -> None:
    record = fill_slots(planned(max_trials=2, parallel=2), NOW)
    for index in (0, 1):
        record = end_trial(record, index, NOW, objective=None, failure="crashed")
    ended = conclude(record, NOW)
    assert (ended.status, ended.best) == ("failed", None)


def test_a_bayesian_sweep_adds_each_trial_as_a_slot_frees_up_to_max_trials() -> None:
    record = planned(
        algorithm="bayesian",
        space={"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}},
        max_trials=3,
        parallel=2,
    )
    assert record.trials == []
    asked: list[int] = []

    def suggest(current: SweepRecord) -> dict[str, float | int | str | bool]:
        asked.append(len(current.trials))
        return {"lr": 0.01 * (len(current.trials) + 1)}

    record = fill_slots(record, NOW, suggest)
    assert [t.params for t in record.trials] == [{"lr": 0.01}, {"lr": 0.02}]
    record = fill_slots(end_trial(record, 0, NOW, objective=0.8), NOW, suggest)
    assert asked == [0, 1, 2]
    assert len(record.trials) == 3
    record = end_trial(record, 1, NOW, objective=0.9)
    assert conclude(record, NOW) is record, "trial 2 runs"
    assert fill_slots(record, NOW, suggest) is record, "max_trials reached"
    ended = conclude(end_trial(record, 2, NOW, objective=0.7), NOW)
    assert ended.best == 1


def test_a_history_keeps_its_newest_point_and_stays_bounded() -> None:
    history = TrialHistory()
    for step in range(3 * MAX_HISTORY_POINTS):
        history = history.with_point(step, float(step))
    assert len(history.points) <= MAX_HISTORY_POINTS
    assert history.points[-1] == (3 * MAX_HISTORY_POINTS - 1, 3 * MAX_HISTORY_POINTS - 1.0)
    steps = [step for step, _ in history.points]
    assert steps == sorted(steps)
    diverged = TrialHistory().with_point(1, math.nan).with_point(2, math.inf)
    stored = TrialHistory.model_validate_json(diverged.model_dump_json())
    assert math.isnan(stored.points[0][1]), "a NaN is kept, through JSON too"
    assert stored.points[1] == (2, math.inf)


def test_a_cancelled_sweep_starts_nothing_and_ends_without_a_best_once_none_runs() -> None:
    record = fill_slots(planned(), NOW)
    record = end_trial(record, 0, NOW, objective=0.97, model_version="s1.trial-0")
    cancelled = cancel(record, "wrong data", NOW)
    assert cancel(cancelled, "again", NOW) is cancelled, "the first reason stands"
    assert fill_slots(cancelled, NOW) is cancelled, "no pending trial starts"
    assert conclude(cancelled, NOW) is cancelled, "trial 1 still runs"
    ended = end_trial(
        cancelled, 1, NOW, objective=None, failure="cancelled by request", cancelled=True
    )
    assert ended.trials[1].reason == "sweep cancelled: wrong data"
    over = conclude(ended, NOW)
    assert (over.status, over.best) == ("failed", None), "a cancel deploys nothing"
    assert [t.status for t in over.trials] == ["completed", "cancelled", "pending", "pending"]
    assert cancel(over, "late", NOW) is over, "an ended sweep stays as it ended"


def test_after_a_cancel_a_trial_whose_run_failed_on_its_own_is_failed_not_cancelled() -> None:
    record = cancel(fill_slots(planned(), NOW), "wrong data", NOW)
    record = end_trial(record, 0, NOW, objective=None, failure="cancelled", cancelled=True)
    record = end_trial(record, 1, NOW, objective=None, failure="rank 1 exited with code 1")
    assert [(t.status, t.reason) for t in record.trials[:2]] == [
        ("cancelled", "sweep cancelled: wrong data"),
        ("failed", "rank 1 exited with code 1"),
    ]


def test_a_trial_cancelled_while_its_sweep_is_not_fails_with_its_runs_reason() -> None:
    record = end_trial(
        fill_slots(planned(), NOW), 0, NOW, objective=None, failure="stalled", cancelled=True
    )
    assert (record.trials[0].status, record.trials[0].reason) == ("failed", "stalled")
    assert record.status == "running", "the sweep goes on without it"
