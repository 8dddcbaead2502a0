"""Following a pipeline: bars on a terminal (a stage each, training by epoch), lines elsewhere."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from rich.console import Console
from rich.progress import Progress, TextColumn

from torchrelay.cli.progress import BarReport, planned_epochs
from torchrelay.client import LineReport
from torchrelay.shared.events.data import PipelineSpec
from torchrelay.shared.pipelines import PipelineRecord, with_stage

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def spec(hyperparameters: dict[str, object]) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": "digits",
            "dataset": {"name": "digits", "source": "sklearn:digits"},
            "training": {
                "entrypoint": "m:f",
                "model_name": "digits",
                "hyperparameters": hyperparameters,
            },
        }
    )


@pytest.mark.parametrize(
    ("hyperparameters", "expected"),
    [
        ({"epochs": 30}, 30),
        ({}, None),  # the bar counts steps instead
        ({"epochs": "30"}, None),
        ({"epochs": 0}, None),
        ({"epochs": True}, None),
    ],
)
def test_the_training_bar_is_as_long_as_the_epochs_the_spec_names(
    hyperparameters: dict[str, object], expected: int | None
) -> None:
    assert planned_epochs(spec(hyperparameters)) == expected


def bars() -> Progress:
    """A progress display that draws nothing: the tests read its tasks."""
    console = Console(file=io.StringIO(), force_terminal=False)
    return Progress(TextColumn("{task.description} {task.fields[note]}"), console=console)


def test_bars_follow_the_stages_and_fill_training_by_epoch() -> None:
    progress = bars()
    report = BarReport(progress, epochs=10)
    staging, training, rollout = progress.tasks
    record = PipelineRecord(pipeline_id="p1", spec=spec({"epochs": 10}), submitted=NOW)
    report.record(record)
    assert [t.fields["note"] for t in progress.tasks] == ["pending"] * 3

    record = with_stage(record, "ingest", "running", NOW)
    report.record(record)
    assert staging.started
    assert staging.total is None  # staging has no length: a spinner
    report.progress({"step": 5, "epoch": 1, "loss": 2.0, "samples_per_s": 10})
    assert training.completed == 0, "progress before training runs is not shown"

    record = with_stage(record, "ingest", "succeeded", NOW, detail={"version": "d1"})
    record = with_stage(record, "train", "running", NOW)
    report.record(record)
    assert (staging.completed, staging.total) == (1, 1), "a stage of no length fills when done"
    assert staging.fields["note"] == "succeeded version=d1"
    assert training.total == 10

    report.progress({"step": 40, "epoch": 4, "loss": 0.51234, "samples_per_s": 1234.4})
    assert training.completed == 4
    assert training.fields["note"] == "step 40  loss 0.5123  1234 samples/s"
    report.progress({"step": 400, "epoch": 12, "loss": 0.1, "samples_per_s": 1})
    assert training.completed == 10, "never past the end"

    record = with_stage(record, "train", "failed", NOW, reason="rank 1 raised ValueError")
    report.record(record)
    assert training.fields["note"] == "failed rank 1 raised ValueError"
    assert training.stop_time is not None, "a failed stage stops its clock"
    assert rollout.fields["note"] == "pending"


def test_without_a_known_length_training_shows_its_latest_step() -> None:
    progress = bars()
    report = BarReport(progress, epochs=None)
    record = PipelineRecord(pipeline_id="p1", spec=spec({}), submitted=NOW)
    report.record(with_stage(record, "train", "running", NOW))
    report.progress({"step": 7, "epoch": 0, "loss": 1.5, "samples_per_s": 3})
    training = progress.tasks[1]
    assert (training.total, training.completed) == (None, 0)
    assert training.fields["note"] == "step 7  loss 1.5000  3 samples/s"


def test_lines_say_each_stage_change_once() -> None:
    said: list[str] = []
    report = LineReport(said.append)
    record = PipelineRecord(pipeline_id="p1", spec=spec({}), submitted=NOW)
    record = with_stage(record, "ingest", "running", NOW)
    report.record(record)
    report.record(record)  # the same record again (a redelivered write) says nothing new
    record = with_stage(record, "ingest", "succeeded", NOW, detail={"version": "d1"})
    report.record(record)
    assert said == [
        "  ingest  running   ",
        "  train   pending   ",
        "  deploy  pending   ",
        "  ingest  succeeded version=d1",
    ]
