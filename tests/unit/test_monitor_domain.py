"""The monitor keeps metric labels bounded and decides what a failed attempt leads to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from torchrelay.services.monitor.domain import (
    EXTERNAL,
    PIPELINE_ENDINGS,
    UNKNOWN,
    Recovery,
    RunWatch,
    after_failure,
    backoff_s,
    can_restart,
    cancelled_for_stall,
    dead_letter_category,
    pipeline_end,
    progress_counts,
    progress_due,
    progressed,
    restart_wait_s,
    source_label,
    stall_reason,
    stalled,
    start_moves_watch,
    type_label,
    watch_at_failure,
)
from torchrelay.shared.events import (
    DatasetRejected,
    ModelDeployed,
    ModelRolloutFailed,
    TrainCompleted,
    TrainFailed,
)
from torchrelay.shared.events.data import (
    DatasetRejectedData,
    ModelDeployedData,
    ModelRolloutFailedData,
    TrainCompletedData,
    TrainFailedData,
)


def test_sources_of_our_services_are_named() -> None:
    assert source_label("/torchrelay/ingest") == "ingest"
    assert source_label("/torchrelay/train/worker/3") == "train"


def test_any_other_source_is_external() -> None:
    for source in ("/another/system", "https://ci.example/jobs/42", "/torchrelay/unknown", "x"):
        assert source_label(source) == EXTERNAL


def test_unknown_types_collapse_into_one_label() -> None:
    known = frozenset({"io.torchrelay.dataset.staged.v1"})
    assert type_label("io.torchrelay.dataset.staged.v1", known) == "io.torchrelay.dataset.staged.v1"
    assert type_label("whatever-a-publisher-sent", known) == UNKNOWN
    assert type_label(None, known) == UNKNOWN


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = [backoff_s(n, base_s=2, cap_s=10) for n in (1, 2, 3, 4, 5)]
    assert delays == [2, 4, 8, 10, 10]


def watch(**fields: object) -> RunWatch:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    base: dict[str, object] = {
        "run_id": "r1",
        "attempt": 0,
        "max_restarts": 2,
        "state": "running",
        "started_at": start,
        "attempt_started_at": start,
    }
    return RunWatch.model_validate({**base, **fields})


def test_the_stall_clock_starts_at_the_first_progress_not_at_the_start() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    limits = {"after_s": 60, "start_after_s": 3600}
    # Pods pending, images pulling, ranks joining: no progress yet, and no stall for an hour.
    assert not stalled(watch(), start + timedelta(minutes=10), **limits)
    assert not stalled(watch(), start + timedelta(seconds=3599), **limits)
    assert stalled(watch(), start + timedelta(seconds=3601), **limits)
    # Once it reports, a silence of after_s is a stall.
    reporting = watch(last_progress_at=start + timedelta(minutes=20))
    assert not stalled(reporting, start + timedelta(minutes=20, seconds=59), **limits)
    assert stalled(reporting, start + timedelta(minutes=21, seconds=1), **limits)
    assert not stalled(watch(state="ended"), start + timedelta(hours=2), **limits)


def test_a_stall_says_whether_the_attempt_ever_reported() -> None:
    limits = {"after_s": 60, "start_after_s": 3600}
    assert stall_reason(watch(), **limits) == "no progress within 3600s of its start"
    reported = watch(last_progress_at=datetime(2026, 1, 1, 0, 5, tzinfo=UTC))
    assert stall_reason(reported, **limits) == "no progress for 60s"


def test_only_progress_of_the_watched_attempt_moves_its_stall_clock() -> None:
    started = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    current = watch(attempt=1, attempt_started_at=started)
    assert progress_counts(current, started + timedelta(seconds=30))
    assert progress_counts(current, started - timedelta(seconds=2)), "a node's clock may lag"
    late = started - timedelta(minutes=3)  # the attempt before, delivered after this start
    assert not progress_counts(current, late)
    assert not progress_counts(watch(state="stalled"), started)
    assert not progress_counts(None, started)


def test_progress_is_written_once_per_interval_and_never_back_in_time() -> None:
    started = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    assert progress_due(watch(attempt_started_at=started), started, every_s=5), "the first"
    reported = watch(attempt_started_at=started, last_progress_at=started)
    assert not progress_due(reported, started + timedelta(seconds=4.9), every_s=5)
    assert progress_due(reported, started + timedelta(seconds=5), every_s=5)
    assert not progress_due(reported, started - timedelta(seconds=1), every_s=5), "a late one"
    assert not progress_due(watch(state="stalled"), started, every_s=5)
    assert not progress_due(None, started, every_s=5)


def test_restarts_are_bounded() -> None:
    assert can_restart(watch(attempt=1, max_restarts=2))
    assert not can_restart(watch(attempt=2, max_restarts=2))


def test_dead_letter_reasons_fall_into_three_labels() -> None:
    assert dead_letter_category("payload is not JSON: x") == "malformed"
    assert dead_letter_category("io.torchrelay.x.v1 failed validation: data: y") == "malformed"
    assert dead_letter_category("gave up after 5 deliveries; last error E") == "exhausted"
    assert dead_letter_category("PermanentError: bad path") == "refused"


def _event(kind: type[Any], data: object) -> Any:
    return kind(source="/t", subject="s", pipelineid="p", data=data)


DEPLOYED = _event(
    ModelDeployed, ModelDeployedData(model_name="m", version="v", endpoint="http://e")
)
TRAINED = _event(
    TrainCompleted,
    TrainCompletedData(run_id="r", model_name="m", model_version="v", path="m/v", metrics={}),
)
RETRIED = _event(TrainFailed, TrainFailedData(run_id="r", attempt=0, reason="x", final=False))
GAVE_UP = _event(TrainFailed, TrainFailedData(run_id="r", attempt=3, reason="x", final=True))
REJECTED = _event(
    DatasetRejected, DatasetRejectedData(request_id="q", code="missing_path", reason="x")
)
NOT_ROLLED = _event(
    ModelRolloutFailed, ModelRolloutFailedData(model_name="m", version="v", reason="x")
)


@pytest.mark.parametrize(
    ("event", "last_stage", "ended"),
    [
        (DEPLOYED, "deploy", "succeeded"),
        (TRAINED, "train", "succeeded"),
        (TRAINED, "deploy", None),
        (RETRIED, "deploy", None),
        (GAVE_UP, "deploy", "failed"),
        (REJECTED, "deploy", "failed"),
        (NOT_ROLLED, "deploy", "failed"),
    ],
)
def test_a_pipeline_ends_with_its_last_stage_or_its_first_final_failure(
    event: Any, last_stage: str, ended: str | None
) -> None:
    assert pipeline_end(event, last_stage) == ended
    # The monitor reads the pipeline's clock only for these types: an ending is among them.
    assert ended is None or isinstance(event, PIPELINE_ENDINGS)


# --- what a train.failed leads to ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "attempt", "final", "recovery"),
    [
        ("running", 0, False, Recovery.RESTART),
        ("running", 0, True, Recovery.END),
        ("stalled", 0, False, Recovery.RESTART),  # the monitor's restart cancel: the run goes on
        ("stalled", 0, True, Recovery.END),  # a user's cancel got there first: it ends the run
        ("ended", 0, True, Recovery.IGNORE),  # our own give-up coming back, or a redelivery
        ("ended", 0, False, Recovery.IGNORE),
    ],
)
def test_a_failure_restarts_ends_or_is_already_accounted_for(
    state: str, attempt: int, final: bool, recovery: Recovery
) -> None:
    assert after_failure(watch(state=state), attempt=attempt, final=final) is recovery


def test_a_stalled_attempt_with_no_restart_left_is_given_up_whatever_its_finality() -> None:
    last = watch(state="stalled", attempt=2, max_restarts=2)
    assert after_failure(last, attempt=2, final=True) is Recovery.GIVE_UP
    assert after_failure(last, attempt=2, final=False) is Recovery.GIVE_UP


def test_a_late_failure_of_an_attempt_already_followed_up_changes_nothing() -> None:
    assert after_failure(watch(attempt=3), attempt=2, final=False) is Recovery.IGNORE
    assert after_failure(watch(attempt=3), attempt=2, final=True) is Recovery.IGNORE


def test_only_a_start_of_a_later_attempt_moves_the_watch() -> None:
    assert start_moves_watch(None, 0)
    assert start_moves_watch(watch(attempt=1), 2)
    assert not start_moves_watch(watch(attempt=2), 2), "a redelivery keeps its progress"
    assert not start_moves_watch(watch(attempt=2), 1), "a late start does not rewind it"
    assert not start_moves_watch(watch(state="ended", attempt=2), 2)


def test_a_failure_handled_before_its_start_moves_the_watch_to_its_attempt() -> None:
    behind = watch(state="stalled", attempt=1)
    moved = watch_at_failure(behind, 2)
    assert moved is not None
    assert (moved.attempt, moved.state) == (2, "running")
    assert after_failure(moved, attempt=2, final=False) is Recovery.RESTART
    assert watch_at_failure(behind, 1) is behind
    assert watch_at_failure(None, 1) is None
    ended = watch(state="ended", attempt=1)
    assert watch_at_failure(ended, 2) is ended


def test_a_run_the_monitor_never_saw_start_ends_with_its_failure() -> None:
    assert after_failure(None, attempt=0, final=True) is Recovery.END


def test_only_the_attempt_that_stalled_counts_as_cancelled_for_it() -> None:
    assert cancelled_for_stall(watch(state="stalled", attempt=1), 1)
    assert not cancelled_for_stall(watch(state="stalled", attempt=1), 0)
    assert not cancelled_for_stall(watch(state="running", attempt=1), 1)
    assert not cancelled_for_stall(None, 0)


def test_a_restart_is_due_its_backoff_after_the_failure_whoever_looks() -> None:
    failed_at = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)

    def wait(seconds_later: float, attempt: int = 1) -> float:
        now = failed_at + timedelta(seconds=seconds_later)
        return restart_wait_s(failed_at, now, attempt, base_s=2.0, cap_s=60.0)

    assert wait(0) == 2.0
    assert wait(1.5) == 0.5
    assert wait(2.0) == 0.0
    assert wait(30) == 0.0, "late is due, never negative"
    assert wait(0, attempt=3) == 8.0
    assert wait(0, attempt=10) == 60.0, "capped"


def test_an_attempt_that_trained_before_it_failed_is_restarted_at_once() -> None:
    failed_at = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)
    trained = watch(last_progress_at=failed_at - timedelta(seconds=1))
    crashed = watch()
    assert progressed(trained)
    assert not progressed(crashed)

    def wait(of: RunWatch, attempt: int) -> float:
        return restart_wait_s(
            failed_at, failed_at, attempt, base_s=2.0, cap_s=60.0, progressed=progressed(of)
        )

    assert wait(trained, 1) == 0.0
    assert wait(trained, 3) == 0.0, "every attempt that trained: restarts stay bounded"
    assert wait(crashed, 1) == 2.0, "a crash loop still backs off"


def test_progress_of_an_earlier_attempt_does_not_hurry_a_later_ones_restart() -> None:
    behind = watch(attempt=1, last_progress_at=datetime(2026, 1, 1, 0, 5, tzinfo=UTC))
    moved = watch_at_failure(behind, 2)
    assert moved is not None
    assert not progressed(moved)
