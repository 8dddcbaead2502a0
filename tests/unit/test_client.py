"""What the CLI shows and sends, as pure functions: tables, lineage rows and input files."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from torchrelay.client import (
    Inventory,
    finished,
    lineage,
    load_input,
    refusal,
    render_log_line,
)
from torchrelay.services.serve.domain import DeploymentRecord
from torchrelay.services.train.domain import ModelRecord
from torchrelay.shared.events import PipelineSubmitted
from torchrelay.shared.events.data import (
    DatasetRef,
    PipelineSpec,
    PipelineSubmittedData,
    TrainJobSpec,
)
from torchrelay.shared.events.sweep import SweepSpec
from torchrelay.shared.pipelines import PipelineRecord, with_stage
from torchrelay.shared.runs import RunRecord

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
SPEC = PipelineSpec.model_validate(
    {
        "name": "digits-demo",
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": {"entrypoint": "m:f", "model_name": "digits"},
    }
)


def finished_pipeline() -> PipelineRecord:
    record = PipelineRecord(pipeline_id="p1", spec=SPEC, submitted=NOW)
    record = with_stage(
        record, "ingest", "succeeded", NOW, detail={"dataset": "digits", "version": "d1"}
    )
    record = with_stage(
        record, "train", "succeeded", NOW, detail={"model": "digits", "version": "m2"}
    )
    return with_stage(record, "deploy", "succeeded", NOW, detail={"endpoint": "http://e"})


def test_a_pipeline_row_links_dataset_run_model_and_endpoint() -> None:
    assert lineage(finished_pipeline()) == {
        "pipeline": "p1",
        "status": "succeeded",
        "submitted": "2026-11-28 12:00:00",
        "dataset": "digits@d1",
        "run": "p1.train",
        "model": "digits@m2",
        "endpoint": "http://e",
    }


def test_a_pipeline_that_failed_at_ingest_links_nothing() -> None:
    record = PipelineRecord(pipeline_id="p2", spec=SPEC, submitted=NOW)
    record = with_stage(record, "ingest", "failed", NOW, reason="no such file")
    row = lineage(record)
    assert (row["dataset"], row["run"], row["model"], row["endpoint"]) == ("", "", "", "")


def test_the_served_version_of_a_model_is_marked() -> None:
    job = TrainJobSpec(
        entrypoint="m:f", model_name="digits", dataset=DatasetRef(name="digits", version="d1")
    )
    run = RunRecord(
        run_id="p1.train", spec=job, dataset_path="datasets/digits/d1", status="succeeded",
        attempt=1, owner="train-a", pipeline_id="p1", model_version="m2", updated=NOW,
    )  # fmt: skip
    models = [
        ModelRecord(
            name="digits",
            version=v,
            path=f"models/digits/{v}",
            metrics={"accuracy": 0.97},
            run_id="p1.train",
            dataset="digits@d1",
            created=NOW,
        )
        for v in ("m1", "m2")
    ]
    deployment = DeploymentRecord(
        model="digits", active_version="m2", previous_version="m1", endpoint="http://e",
        status="deployed", owner="serve-a", updated=NOW,
    )  # fmt: skip
    rows = Inventory([finished_pipeline()], [run], models, [deployment]).rows()
    assert [(m["model"], m["serving"]) for m in rows["models"]] == [
        ("digits@m1", ""),
        ("digits@m2", "yes"),
    ]
    assert rows["runs"][0]["model"] == "digits@m2"
    assert rows["deployments"][0]["previous"] == "m1"


def test_an_input_comes_from_npy_or_a_json_list(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((2, 3), dtype=np.float32))
    (tmp_path / "x.json").write_text(json.dumps([[1, 2], [3, 4]]))
    assert load_input(tmp_path / "x.npy").shape == (2, 3)
    assert load_input(tmp_path / "x.json").tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("x.csv", "1,2", "give a .npy file or a .json list"),
        ("x.json", "{broken", "cannot read an input"),
        ("x.json", "[[1, 2], [3]]", "cannot read an input"),
        ("x.json", '"text"', "cannot read an input"),
        ("x.json", "3", "must be a numeric array"),
    ],
)
def test_an_unusable_input_file_is_a_clear_error(
    tmp_path: Path, name: str, content: str, problem: str
) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=problem):
        load_input(tmp_path / name)


def test_a_missing_input_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read an input"):
        load_input(tmp_path / "missing.npy")


def submission(spec: PipelineSpec, event_id: str) -> PipelineSubmitted:
    return PipelineSubmitted(
        id=event_id,
        source="/torchrelay/cli",
        pipelineid="p1",
        data=PipelineSubmittedData(spec=spec),
    )


def test_waiting_on_a_pipeline_id_that_holds_another_spec_ends_with_the_refusal() -> None:
    other = SPEC.model_copy(update={"name": "other-demo"})
    stored = PipelineRecord(
        pipeline_id="p1", spec=other, submitted=NOW, submitted_event_id="theirs"
    )
    refused = refusal(stored, submission(SPEC, "mine"))
    assert refused is not None
    assert (refused.pipeline_id, refused.code) == ("p1", "conflicting_spec")
    assert "(differs in name)" in refused.reason
    assert "new pipelineid" in refused.reason


@pytest.mark.parametrize("owner", ["mine", "theirs", None])
def test_waiting_follows_a_pipeline_with_the_same_spec_whoever_submitted_it(
    owner: str | None,
) -> None:
    stored = PipelineRecord(pipeline_id="p1", spec=SPEC, submitted=NOW, submitted_event_id=owner)
    assert refusal(stored, submission(SPEC, "mine")) is None


def test_waiting_stops_only_at_a_pipelines_end() -> None:
    record = PipelineRecord(pipeline_id="p4", spec=SPEC, submitted=NOW)
    record = with_stage(record, "ingest", "succeeded", NOW)
    record = with_stage(record, "train", "running", NOW)
    assert not finished(record), "a training run (restarted or not) is followed on"
    assert finished(finished_pipeline())
    assert finished(with_stage(record, "train", "failed", NOW, reason="no restarts left"))


def test_a_rank_log_event_reads_as_one_line_and_its_traceback_as_lines() -> None:
    progress = json.dumps(
        {
            "step": 10,
            "loss": 2.1559131145477295,
            "metrics": {},
            "event": "train.progress",
            "run_id": "r",
            "attempt": 0,
            "rank": 0,
            "level": "info",
            "timestamp": "2026-12-02T14:02:11.617126Z",
        }
    )
    assert render_log_line(progress + "\n") == (
        "14:02:11.617 info  train.progress step=10 loss=2.156 metrics={}"
    )
    failed = json.dumps(
        {
            "event": "worker.failed",
            "level": "error",
            "reason": "bad column 'z'",
            "timestamp": "2026-12-02T14:02:12.000001Z",
            "exception": 'Traceback (most recent call last):\n  File "m.py", line 3\n'
            "ValueError: bad",
        }
    )
    assert render_log_line(failed).splitlines() == [
        "14:02:12.000 error worker.failed reason=\"bad column 'z'\"",
        "    Traceback (most recent call last):",
        '      File "m.py", line 3',
        "    ValueError: bad",
    ]


@pytest.mark.parametrize("line", ["Traceback (most recent call last):\n", "[1, 2]\n", "{}\n"])
def test_text_that_is_no_log_event_is_left_as_it_is(line: str) -> None:
    assert render_log_line(line) == line.rstrip("\n")


def test_a_sweeps_run_is_its_best_trials_once_it_ended() -> None:
    sweep = {
        "space": {"lr": {"type": "choice", "values": [0.1, 0.01]}},
        "algorithm": "grid",
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "max_trials": 2,
    }
    spec = SPEC.model_copy(update={"sweep": SweepSpec.model_validate(sweep)})
    record = PipelineRecord(pipeline_id="p3", spec=spec, submitted=NOW)
    record = with_stage(record, "train", "running", NOW, detail={"sweep": "p3", "trials": 2})
    assert lineage(record)["run"] == "", "no run is the sweep's while its trials run"
    record = with_stage(
        record, "train", "succeeded", NOW,
        detail={"model": "digits", "version": "m1", "run_id": "p3.trial-1", "trial": 1},
    )  # fmt: skip
    assert (lineage(record)["run"], lineage(record)["model"]) == ("p3.trial-1", "digits@m1")
