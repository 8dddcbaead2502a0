"""The monitor's rules for sweeps: which runs can be trials, what a report adds to a trial's
history, when a trial is stopped (once), and what the metrics show of a sweep."""

from __future__ import annotations

import pytest

from tests.sweep_factories import HISTORIES, sweep_record
from torchrelay.services.monitor.domain import (
    STOP_REASON_MAX,
    best_objective,
    may_be_trial,
    request_stop,
    running_trial,
    stop_reason,
    trial_counts,
    with_report,
)
from torchrelay.services.monitor.sweeps import stop_event_id
from torchrelay.shared.sweep_state import TrialHistory, end_trial

COMPLETED = [HISTORIES[0], HISTORIES[1], HISTORIES[2]]


@pytest.mark.parametrize(
    ("run_id", "pipeline_id", "expected"),
    [
        ("s.trial-0", "s", True),
        ("s.trial-12", "s", True),
        ("a.b.trial-3", "a.b", True),
        ("s.trial-", "s", False),
        ("s.trial-x", "s", False),
        ("s.trial-\u00b2", "s", False),  # a digit to str.isdigit, not an index
        ("t.trial-0", "s", False),
        ("s-run", "s", False),
        ("s", "s", False),
    ],
)
def test_only_a_run_named_as_a_trial_of_the_pipeline_may_be_one(
    run_id: str, pipeline_id: str, expected: bool
) -> None:
    assert may_be_trial(run_id, pipeline_id) is expected


def test_only_a_running_trial_of_a_running_sweep_counts() -> None:
    record = sweep_record("s")
    assert running_trial(record, "s.trial-3") == record.trials[3]
    assert running_trial(record, "s.trial-0") is None, "completed"
    assert running_trial(record, "s.trial-9") is None, "no such trial"
    assert running_trial(record.model_copy(update={"status": "completed"}), "s.trial-3") is None


def test_a_report_is_added_once() -> None:
    first = with_report(None, 10, 1.5)
    assert first == TrialHistory(points=[(10, 1.5)])
    assert with_report(first, 10, 1.5) is None, "the same report again adds nothing"
    again = with_report(first, 10, 1.4)  # the same step after a restart: both kept, in order
    assert again is not None
    assert again.points == [(10, 1.5), (10, 1.4)]


def test_a_trial_worse_than_the_median_after_warmup_is_stopped() -> None:
    reason = stop_reason(sweep_record("s"), [(0, 2.0), (20, 5.0)], COMPLETED)
    assert reason is not None
    assert "median stopping" in reason
    assert len(reason) <= STOP_REASON_MAX


@pytest.mark.parametrize(
    ("history", "completed", "why"),
    [
        ([(5, 50.0)], COMPLETED, "during warm-up"),
        ([(20, 5.0)], COMPLETED[:2], "fewer completed trials than min_trials"),
        ([(20, 0.7)], COMPLETED, "at the median"),
        ([(20, 0.65)], COMPLETED, "better than the median"),
        ([], COMPLETED, "no report yet"),
    ],
)
def test_a_trial_goes_on(
    history: list[tuple[int, float]], completed: list[list[tuple[int, float]]], why: str
) -> None:
    assert stop_reason(sweep_record("s"), history, completed) is None, why


def test_a_sweep_without_early_stopping_stops_nothing() -> None:
    record = sweep_record("s", early_stopping=False)
    assert stop_reason(record, [(20, 50.0)], COMPLETED) is None


def test_a_stop_is_written_once_and_only_into_a_running_trial() -> None:
    record = sweep_record("s")
    stopped = request_stop(record, "s.trial-3", "worse")
    assert stopped is not None
    assert stopped.trials[3].stop_requested == "worse"
    assert stopped.trials[3].status == "running", "the train service ends it when its run ends"
    assert stopped.trials[:3] == record.trials[:3]
    assert request_stop(stopped, "s.trial-3", "worse again") is None, "asked for already"
    assert request_stop(record, "s.trial-0", "worse") is None, "completed"
    assert request_stop(None, "s.trial-3", "worse") is None, "no sweep"


def test_the_cancel_of_an_early_stop_has_one_id_per_run() -> None:
    assert stop_event_id("s.trial-3") == stop_event_id("s.trial-3")
    assert stop_event_id("s.trial-3") != stop_event_id("s.trial-2")


def test_the_metrics_count_every_status_and_show_the_best_completed_objective() -> None:
    record = sweep_record("s")
    assert trial_counts(record) == {
        "pending": 0,
        "running": 1,
        "completed": 3,
        "stopped": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert best_objective(record) == 0.5
    assert best_objective(sweep_record("s", completed=0)) is None
    maximized = record.model_copy(
        update={
            "spec": record.spec.model_copy(
                update={
                    "objective": record.spec.objective.model_copy(update={"direction": "maximize"})
                }
            )
        }
    )
    assert best_objective(maximized) == 0.6


def test_a_stopped_trial_does_not_count_as_best() -> None:
    record = sweep_record("s", completed=0)
    record = request_stop(record, "s.trial-0", "worse") or record
    stopped = end_trial(record, 0, record.updated, objective=0.01, failure="cancelled")
    assert stopped.trials[0].status == "stopped"
    assert best_objective(stopped) is None
