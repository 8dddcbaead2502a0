"""Which ended attempt is its run's last word (``train.failed`` final): a user's cancel always
is; the monitor's cancel of a stalled attempt, like a crash, only with no restart left. And
what a finished run must be to become a model version."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from torchrelay.services.train.domain import (
    AttemptEnd,
    RunRecord,
    attempt_end,
    failure_is_final,
    orphan_is_final,
    result_refusal,
    run_id_refusal,
    settle_pause_s,
)
from torchrelay.shared.cluster import Ended, Status
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec
from torchrelay.shared.storage.files import RunResult, Throughput


@pytest.mark.parametrize("attempt", [0, 1, 2])
def test_a_cancel_by_a_user_ends_the_run(attempt: int) -> None:
    assert failure_is_final(attempt=attempt, max_restarts=2, cancelled=True, restart_cancel=False)


def test_the_monitors_cancel_of_a_stalled_attempt_with_restarts_left_is_not_final() -> None:
    assert not failure_is_final(attempt=0, max_restarts=2, cancelled=True, restart_cancel=True)
    assert not failure_is_final(attempt=1, max_restarts=2, cancelled=True, restart_cancel=True)


def test_the_monitors_cancel_of_the_last_attempt_is_final() -> None:
    assert failure_is_final(attempt=2, max_restarts=2, cancelled=True, restart_cancel=True)
    assert failure_is_final(attempt=0, max_restarts=0, cancelled=True, restart_cancel=True)


@pytest.mark.parametrize("restart_cancel", [False, True])
def test_a_crash_is_final_only_with_no_restart_left(restart_cancel: bool) -> None:
    # A restart cancel that raced with a crash changes nothing: the crash counts as one.
    def final(attempt: int) -> bool:
        return failure_is_final(
            attempt=attempt, max_restarts=1, cancelled=False, restart_cancel=restart_cancel
        )

    assert (final(0), final(1)) == (False, True)


def run(attempt: int, max_restarts: int = 2) -> RunRecord:
    spec = TrainJobSpec(
        dataset=DatasetRef(name="digits", version="v1"),
        entrypoint="torchrelay.services.train.examples.digits:train",
        model_name="digits",
        max_restarts=max_restarts,
    )
    return RunRecord(
        run_id="r1",
        spec=spec,
        dataset_path="datasets/digits/v1",
        status="running",
        attempt=attempt,
        owner="train-a",
        updated=datetime.now(UTC),
    )


def test_a_deleted_job_with_a_cancel_intent_ends_as_cancelled_not_failed() -> None:
    # Kubernetes reports a Job deleted by a cancel as a failure; the stored intent says why.
    crashed = Ended(Status.FAILED, "job deleted", log_tail=["last line"])
    end = attempt_end(run(0), crashed, "final")
    ended, final = end.ended, end.final
    assert (ended.status, ended.reason, ended.log_tail, final) == (
        Status.CANCELLED,
        "cancelled",
        ["last line"],
        True,
    )


def test_a_restart_cancel_ends_the_attempt_as_cancelled_and_keeps_the_run() -> None:
    end = attempt_end(run(0), Ended(Status.FAILED, "job deleted"), "restart")
    assert (end.ended.status, end.final) == (Status.CANCELLED, False)
    assert attempt_end(run(2), Ended(Status.CANCELLED, "cancelled"), "restart").final, (
        "no restart left"
    )


def test_without_an_intent_a_failure_stays_a_failure() -> None:
    failed = Ended(Status.FAILED, "rank 1 failed", rank=1, exit_code=1)
    assert attempt_end(run(0), failed, None) == AttemptEnd(failed, final=False)
    assert attempt_end(run(2), failed, None) == AttemptEnd(failed, final=True)


def test_an_orphaned_attempt_fails_like_a_crash() -> None:
    assert [orphan_is_final(run(a)) for a in (0, 1, 2)] == [False, False, True]


def test_settling_waits_longer_each_try_up_to_a_cap() -> None:
    pauses = [settle_pause_s(t, base_s=1.0, cap_s=30.0) for t in range(1, 8)]
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def result(**metrics: float) -> RunResult:
    return RunResult(
        model_name="digits",
        version="r1",
        path="models/digits/r1",
        metrics=metrics,
        steps=10,
        attempt=0,
        throughput=Throughput(samples_per_s=100.0, checkpoints=1, checkpoint_seconds=0.1),
    )


def test_a_result_with_finite_metrics_becomes_a_model() -> None:
    assert result_refusal(result(accuracy=0.9, loss=0.3)) is None


def test_a_result_with_a_nan_or_infinite_metric_is_refused_naming_them() -> None:
    refusal = result_refusal(result(accuracy=0.9, loss=math.nan, grad=math.inf))
    assert refusal is not None
    assert "non-finite metrics (grad, loss)" in refusal


@pytest.mark.parametrize("run_id", ["r1", "pipe-1.train", "A_b-2"])
def test_a_run_id_that_names_a_model_version_is_accepted(run_id: str) -> None:
    assert run_id_refusal(run_id) is None


@pytest.mark.parametrize("run_id", ["a:b", "-lead", "x" * 65, "a/b", ".hidden"])
def test_a_run_id_that_cannot_be_a_model_version_is_refused(run_id: str) -> None:
    refusal = run_id_refusal(run_id)
    assert refusal is not None
    assert refusal.startswith(f"run id {run_id!r} cannot name a model version")
