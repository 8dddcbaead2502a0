"""What `torchrelay submit --wait` says when a pipeline fails: the stage, its reason and, for
training, the exception the code raised with the end of its traceback."""

from __future__ import annotations

from datetime import UTC, datetime

from torchrelay.client import failure_report
from torchrelay.shared.events.data import PipelineSpec, TrainFailedData
from torchrelay.shared.pipelines import PipelineRecord, train_run_id, with_stage
from torchrelay.shared.runs import RunRecord

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
SPEC = PipelineSpec.model_validate(
    {
        "name": "digits",
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": {"entrypoint": "digits:train", "model_name": "digits"},
    }
)
REASON = (
    "the training function raised ValueError: bad column 'z' before its first step (rank 0): "
    "not restarted, it would fail again"
)
TRACEBACK = [
    "Traceback (most recent call last):",
    '  File "/code/digits.py", line 7, in train',
    "    raise ValueError(\"bad column 'z'\")",
    "ValueError: bad column 'z'",
]


def failed_at_train(reason: str = REASON) -> PipelineRecord:
    record = PipelineRecord(pipeline_id="p1", spec=SPEC, submitted=NOW)
    record = with_stage(record, "ingest", "succeeded", NOW, detail={"version": "d1"})
    record = with_stage(record, "train", "failed", NOW, reason=reason)
    return record.model_copy(update={"status": "failed"})


def run_with(outcome: TrainFailedData | None) -> RunRecord:
    return RunRecord.model_validate(
        {
            "run_id": train_run_id("p1"),
            "spec": {
                "dataset": {"name": "digits", "version": "d1"},
                "entrypoint": "digits:train",
                "model_name": "digits",
            },
            "dataset_path": "datasets/digits/d1",
            "status": "failed",
            "attempt": 0,
            "owner": "train-a",
            "updated": NOW,
            "outcome": outcome,
        }
    )


def test_a_training_exception_is_shown_with_its_traceback() -> None:
    outcome = TrainFailedData(
        run_id="p1.train",
        reason=REASON,
        rank=0,
        exit_code=1,
        log_tail=TRACEBACK,
        final=True,
        error_type="ValueError",
        error_message="bad column 'z'",
    )
    assert failure_report(failed_at_train(), run_with(outcome)) == [
        f"pipeline p1 failed at its train stage: {REASON}",
        "  ValueError: bad column 'z'",
        "  traceback (rank 0, attempt 0), last lines:",
        *(f"    {line}" for line in TRACEBACK),
    ]


def test_a_long_message_is_cut_to_its_first_lines() -> None:
    outcome = TrainFailedData(
        run_id="p1.train",
        reason=REASON,
        final=True,
        error_type="pandas.errors.ParserError",
        error_message="\n".join(f"line {i}" for i in range(30)),
    )
    report = failure_report(failed_at_train(), run_with(outcome))
    assert report[1:] == [
        "  pandas.errors.ParserError: line 0",
        *(f"    line {i}" for i in range(1, 10)),
        "    ...",
    ]


def test_a_killed_rank_shows_its_last_log_lines() -> None:
    outcome = TrainFailedData(
        run_id="p1.train",
        reason="rank 1 was killed by SIGKILL",
        attempt=3,
        rank=1,
        signal="SIGKILL",
        log_tail=['{"event": "checkpoint.saved"}'],
        final=True,
    )
    report = failure_report(failed_at_train("rank 1 was killed by SIGKILL"), run_with(outcome))
    assert report == [
        "pipeline p1 failed at its train stage: rank 1 was killed by SIGKILL",
        "  last log lines (rank 1, attempt 3):",
        '    {"event": "checkpoint.saved"}',
    ]


def test_without_a_run_record_the_stages_reason_is_all() -> None:
    assert failure_report(failed_at_train(), None) == [
        f"pipeline p1 failed at its train stage: {REASON}"
    ]
    assert failure_report(failed_at_train(), run_with(None)) == [
        f"pipeline p1 failed at its train stage: {REASON}"
    ]


def test_another_stages_failure_shows_only_its_reason() -> None:
    record = PipelineRecord(pipeline_id="p1", spec=SPEC, submitted=NOW)
    record = with_stage(record, "ingest", "failed", NOW, reason="no such file: digits.csv")
    record = record.model_copy(update={"status": "failed"})
    assert failure_report(record, None) == [
        "pipeline p1 failed at its ingest stage: no such file: digits.csv"
    ]


def test_a_pipeline_that_failed_with_no_failed_stage_says_so() -> None:
    record = PipelineRecord(pipeline_id="p1", spec=SPEC, submitted=NOW, status="failed")
    assert failure_report(record, None) == ["pipeline p1 failed: no stage says why"]
