"""The train service's pure rules: run ids and when a restart may happen."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from torchrelay.services.train.domain import RunRecord, restart_allowed, run_id_for
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec


def record(status: str, attempt: int, max_restarts: int = 2) -> RunRecord:
    return RunRecord(
        run_id="r1",
        spec=TrainJobSpec(
            dataset=DatasetRef(name="digits", version="v1"),
            entrypoint="pkg.mod:train",
            model_name="digits",
            max_restarts=max_restarts,
        ),
        dataset_path="datasets/digits/v1",
        status=status,  # type: ignore[arg-type]
        attempt=attempt,
        owner="train-0",
        updated=datetime.now(UTC),
    )


def test_a_requested_run_id_wins_else_it_derives_from_the_event() -> None:
    assert run_id_for("mine", "event-1") == "mine"
    assert run_id_for(None, "event-1") == run_id_for(None, "event-1")
    assert run_id_for(None, "event-1") != run_id_for(None, "event-2")


def test_a_failed_run_may_restart_to_its_next_attempt() -> None:
    assert restart_allowed(record("failed", 0), 1) is None
    assert restart_allowed(record("cancelled", 1), 2) is None


@pytest.mark.parametrize(
    ("status", "attempt", "wanted", "reason"),
    [
        ("running", 0, 1, "is running"),
        ("succeeded", 0, 1, "already succeeded"),
        ("failed", 1, 1, "is stale"),
        ("failed", 0, 2, "is stale"),
        ("failed", 2, 3, "used its 2 restarts"),
    ],
)
def test_restarts_that_must_not_happen(status: str, attempt: int, wanted: int, reason: str) -> None:
    refusal = restart_allowed(record(status, attempt), wanted)
    assert refusal is not None
    assert reason in refusal
