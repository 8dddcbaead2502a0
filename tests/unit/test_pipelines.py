"""Pipeline records: stages only move forward, and a pipeline id names one spec for good."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from torchrelay.shared.events import EVENT_TYPES, PipelineRejected
from torchrelay.shared.events.data import PipelineRejectedData, PipelineSpec
from torchrelay.shared.pipelines import (
    PipelineRecord,
    StageState,
    Submission,
    conflict_reason,
    judge_submission,
    spec_differences,
    with_stage,
)

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(seconds=5)
T2 = T0 + timedelta(seconds=60)


def spec(**changes: Any) -> PipelineSpec:
    raw: dict[str, Any] = {
        "name": "digits-demo",
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": {
            "entrypoint": "m:f",
            "model_name": "digits",
            "hyperparameters": {"epochs": 30},
        },
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = raw
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return PipelineSpec.model_validate(raw)


def stored(*, by: str | None = "event-1", ingest: StageState = "pending") -> PipelineRecord:
    record = PipelineRecord(
        pipeline_id="nightly-42", spec=spec(), submitted=T0, submitted_event_id=by
    )
    if ingest == "pending":
        return record
    record = with_stage(record, "ingest", "running", T0)
    return record if ingest == "running" else with_stage(record, "ingest", ingest, T1)


# --- stages only move forward -----------------------------------------------------------------


def test_a_stage_moves_from_pending_to_running_to_an_outcome() -> None:
    record = PipelineRecord(pipeline_id="p", spec=spec(), submitted=T0)
    running = with_stage(record, "ingest", "running", T0, detail={"request": "r"})
    done = with_stage(running, "ingest", "succeeded", T1, detail={"version": "v1"})
    stage = done.stages["ingest"]
    assert (stage.status, stage.started, stage.ended) == ("succeeded", T0, T1)
    assert stage.detail == {"request": "r", "version": "v1"}


@pytest.mark.parametrize("finished", ["succeeded", "failed", "skipped"])
@pytest.mark.parametrize("backwards", ["running", "pending"])
def test_a_finished_stage_never_goes_back(finished: StageState, backwards: StageState) -> None:
    record = with_stage(
        PipelineRecord(pipeline_id="p", spec=spec(), submitted=T0),
        "train",
        finished,
        T1,
        detail={"model": "digits"},
        reason="why" if finished == "failed" else None,
    )
    again = with_stage(record, "train", backwards, T2, detail={"run_id": "x"}, reason="late")
    assert again is record, "no change at all: nothing for record_stage to write"


@pytest.mark.parametrize(("first", "second"), [("succeeded", "failed"), ("failed", "succeeded")])
def test_the_first_outcome_of_a_stage_stands(first: StageState, second: StageState) -> None:
    record = with_stage(
        PipelineRecord(pipeline_id="p", spec=spec(), submitted=T0), "deploy", first, T1
    )
    assert with_stage(record, "deploy", second, T2) is record


def test_a_finished_pipeline_stays_finished_when_a_stage_is_told_to_run_again() -> None:
    record = PipelineRecord(pipeline_id="p", spec=spec(), submitted=T0)
    for name in ("ingest", "train", "deploy"):
        record = with_stage(record, name, "running", T0)
        record = with_stage(record, name, "succeeded", T1)
    assert record.status == "succeeded"
    assert with_stage(record, "ingest", "running", T2).status == "succeeded"


# --- pipeline identity --------------------------------------------------------------------------


def test_a_submission_under_a_new_id_is_new() -> None:
    assert judge_submission(None, "event-1", spec()) is Submission.NEW


@pytest.mark.parametrize("ingest", ["pending", "running", "succeeded", "failed"])
def test_the_event_that_created_the_record_carries_on_when_redelivered(
    ingest: StageState,
) -> None:
    # e.g. the replica died after creating the record and before staging.
    assert judge_submission(stored(ingest=ingest), "event-1", spec()) is Submission.REDELIVERY


@pytest.mark.parametrize("ingest", ["pending", "running", "succeeded", "failed"])
def test_the_same_spec_under_an_existing_id_from_another_event_is_a_repeat(
    ingest: StageState,
) -> None:
    assert judge_submission(stored(ingest=ingest), "event-2", spec()) is Submission.REPEATED


@pytest.mark.parametrize("event_id", ["event-1", "event-2"])
def test_another_spec_under_an_existing_id_conflicts(event_id: str) -> None:
    other = spec(training__hyperparameters={"epochs": 5})
    assert judge_submission(stored(), event_id, other) is Submission.CONFLICTING


@pytest.mark.parametrize(
    ("ingest", "verdict"),
    [
        ("pending", Submission.REDELIVERY),
        ("running", Submission.REDELIVERY),
        ("succeeded", Submission.REPEATED),
        ("failed", Submission.REPEATED),
    ],
)
def test_a_record_written_before_event_ids_were_kept_carries_on_only_until_ingest_ends(
    ingest: StageState, verdict: Submission
) -> None:
    assert judge_submission(stored(by=None, ingest=ingest), "any", spec()) is verdict
    conflicting = judge_submission(stored(by=None, ingest=ingest), "any", spec(name="other"))
    assert conflicting is Submission.CONFLICTING


def test_a_record_written_before_event_ids_were_kept_still_reads() -> None:
    old = stored().model_dump(mode="json")
    del old["submitted_event_id"]
    assert PipelineRecord.model_validate(old).submitted_event_id is None


def test_spec_differences_name_the_fields_that_differ() -> None:
    other = spec(
        dataset__source="/data/digits.npz",
        training__hyperparameters={"epochs": 5, "lr": 0.1},
    )
    assert spec_differences(spec(), other) == [
        "dataset.source",
        "training.hyperparameters.epochs",
        "training.hyperparameters.lr",
    ]
    assert spec_differences(spec(), spec()) == []


def test_the_conflict_reason_says_what_differs_and_what_to_do() -> None:
    reason = conflict_reason(stored(), spec(dataset__source="/data/digits.npz"))
    assert "'nightly-42'" in reason
    assert "dataset.source" in reason
    assert "new pipelineid" in reason
    assert "unchanged" in reason


def test_the_conflict_reason_fits_the_event_however_much_differs() -> None:
    many = spec(training__hyperparameters={f"knob_{i:03d}": i for i in range(300)})
    reason = conflict_reason(stored(), many)
    assert "new pipelineid" in reason
    assert "and 293 more" in reason
    PipelineRejectedData(pipeline_id="nightly-42", code="conflicting_spec", reason=reason)


def test_the_refusal_event_has_its_own_type_and_subject() -> None:
    event = PipelineRejected(
        source="/torchrelay/ingest",
        pipelineid="nightly-42",
        causationid="event-2",
        data=PipelineRejectedData(
            pipeline_id="nightly-42", code="conflicting_spec", reason="another spec"
        ),
    )
    assert event.type == "io.torchrelay.pipeline.rejected.v1"
    assert PipelineRejected.nats_subject == "torchrelay.pipeline.rejected"
    assert EVENT_TYPES[event.type] is PipelineRejected
