"""model.json and result.json as typed contracts: round trips, files written before the types
existed, and clear errors for a missing, corrupt or invalid file."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from torchrelay.shared.errors import PermanentError
from torchrelay.shared.events.data import DatasetRef
from torchrelay.shared.storage import (
    CorruptFile,
    Layout,
    MissingFile,
    ModelDescription,
    ModelLineage,
    RunResult,
    TensorSignature,
    Throughput,
)
from torchrelay.shared.storage.files import MAX_FILE_BYTES

# Byte for byte what the trainer wrote before the contracts existed (json.dumps(..., indent=2)).
LEGACY_MODEL_JSON = """{
  "name": "digits",
  "version": "p1.train",
  "format": "torchscript",
  "model_class": null,
  "inputs": [
    {
      "name": "input",
      "datatype": "FP32",
      "shape": [
        -1,
        1,
        8,
        8
      ]
    }
  ],
  "outputs": [
    {
      "name": "output",
      "datatype": "FP32",
      "shape": [
        -1,
        10
      ]
    }
  ],
  "metrics": {
    "accuracy": 0.97
  },
  "lineage": {
    "dataset": {
      "name": "digits",
      "version": "3f2a"
    },
    "run_id": "p1.train",
    "attempt": 1,
    "entrypoint": "torchrelay.services.train.examples.digits:train",
    "steps": 660
  },
  "created": "2026-12-02T05:36:51.652921+00:00"
}"""
LEGACY_RESULT_JSON = (
    '{"model_name": "digits", "version": "p1.train", "path": "models/digits/p1.train", '
    '"metrics": {"accuracy": 0.97}, "steps": 660, "attempt": 1, '
    '"throughput": {"samples_per_s": 1234.5, "checkpoints": 33.0, "checkpoint_seconds": 0.8}}'
)


def description(**changes: object) -> ModelDescription:
    fields: dict[str, object] = {
        "name": "digits",
        "version": "r1",
        "format": "state_dict",
        "model_class": "tests.integration.trainers:Unscriptable",
        "inputs": (TensorSignature(name="input", datatype="FP32", shape=(-1, 4)),),
        "outputs": (TensorSignature(name="output", datatype="FP32", shape=(-1, 2)),),
        "metrics": {"accuracy": 0.5},
        "lineage": ModelLineage(
            dataset=DatasetRef(name="digits", version="abc"),
            run_id="r1",
            attempt=0,
            entrypoint="tests.integration.trainers:unscriptable",
            steps=3,
        ),
        "created": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        **changes,
    }
    return ModelDescription.model_validate(fields)


def result(**changes: object) -> RunResult:
    fields: dict[str, object] = {
        "model_name": "digits",
        "version": "r1",
        "path": "models/digits/r1",
        "metrics": {"accuracy": 0.5},
        "steps": 3,
        "attempt": 0,
        "throughput": Throughput(samples_per_s=10.0, checkpoints=1, checkpoint_seconds=0.1),
        **changes,
    }
    return RunResult.model_validate(fields)


def test_a_model_description_round_trips(tmp_path: Path) -> None:
    path = Layout(tmp_path).model_description("digits", "r1")
    written = description()
    written.write(path)
    assert ModelDescription.read(path) == written
    assert written.artifact == "weights.pt"
    assert [p.name for p in path.parent.iterdir()] == ["model.json"], "no temporary left"


def test_a_run_result_round_trips(tmp_path: Path) -> None:
    path = Layout(tmp_path).result("r1")
    result().write(path)
    assert RunResult.read(path) == result()


def test_files_written_before_the_contracts_still_read(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text(LEGACY_MODEL_JSON)
    (tmp_path / "result.json").write_text(LEGACY_RESULT_JSON)
    model = ModelDescription.read(tmp_path / "model.json")
    assert model.inputs[0].shape == (-1, 1, 8, 8)
    assert model.artifact == "model.pt"
    assert model.lineage.dataset == DatasetRef(name="digits", version="3f2a")
    assert model.created == datetime(2026, 12, 2, 5, 36, 51, 652921, tzinfo=UTC)
    run = RunResult.read(tmp_path / "result.json")
    assert run.throughput.checkpoints == 33
    assert run.path == Layout(tmp_path).model("digits", "p1.train").relative_to(tmp_path).as_posix()


def test_what_is_written_is_the_json_readers_of_raw_dicts_expect(tmp_path: Path) -> None:
    """The serve service still reads model.json as a dict: same keys, same shapes."""
    description().write(tmp_path / "model.json")
    legacy = json.loads(LEGACY_MODEL_JSON)
    written = json.loads((tmp_path / "model.json").read_text())
    assert list(written) == list(legacy)
    assert list(written["lineage"]) == list(legacy["lineage"])
    assert written["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    result().write(tmp_path / "result.json")
    assert list(json.loads((tmp_path / "result.json").read_text())) == list(
        json.loads(LEGACY_RESULT_JSON)
    )


def test_non_finite_metrics_stay_as_json_dumps_wrote_them(tmp_path: Path) -> None:
    description(metrics={"loss": math.nan}).write(tmp_path / "model.json")
    assert '"loss": NaN' in (tmp_path / "model.json").read_text()
    assert math.isnan(ModelDescription.read(tmp_path / "model.json").metrics["loss"])


def test_a_missing_file_says_so_and_names_it(tmp_path: Path) -> None:
    path = Layout(tmp_path).result("gone")
    with pytest.raises(MissingFile) as caught:
        RunResult.read(path)
    assert str(path) in str(caught.value)
    assert "no run result (result.json) here" in str(caught.value)
    assert isinstance(caught.value, CorruptFile)
    assert isinstance(caught.value, PermanentError), "retrying the same read cannot help"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "not valid JSON"),
        (LEGACY_MODEL_JSON[:200].encode(), "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "(top): Input should be an object"),
    ],
)
def test_a_corrupt_file_is_refused_with_the_reason(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "model.json"
    path.write_bytes(content)
    with pytest.raises(CorruptFile) as caught:
        ModelDescription.read(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert problem in caught.value.problem
    assert caught.value.path == path
    assert isinstance(caught.value, ValueError), "old `except ValueError` call sites still hold"


def test_a_folder_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "result.json").mkdir()
    with pytest.raises(CorruptFile, match="a folder, not a run result"):
        RunResult.read(tmp_path / "result.json")


def test_an_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_bytes(b" " * (MAX_FILE_BYTES + 1))
    with pytest.raises(CorruptFile, match="larger than"):
        ModelDescription.read(tmp_path / "model.json")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d.pop("lineage"), "lineage: Field required"),
        (lambda d: d["lineage"].pop("run_id"), "lineage.run_id: Field required"),
        (lambda d: d["inputs"][0].pop("datatype"), "inputs.0.datatype: Field required"),
        (lambda d: d["inputs"][0].update(shape=[-2, 4]), "inputs.0.shape.0"),
        (lambda d: d.update(inputs=[]), "inputs: Tuple should have at least 1 item"),
        (lambda d: d.update(format="onnx"), "format: Input should be 'torchscript'"),
        (lambda d: d.update(format="state_dict"), "state_dict needs model_class"),
        (lambda d: d.update(name="Not A Name"), "name: String should match pattern"),
        (lambda d: d.update(created="2026-01-01T00:00:00"), "created: Input should have timezone"),
        (lambda d: d.update(extra=1), "extra: Extra inputs are not permitted"),
    ],
)
def test_an_invalid_model_description_names_every_field_at_fault(
    tmp_path: Path, change: object, problem: str
) -> None:
    fields = json.loads(LEGACY_MODEL_JSON)
    change(fields)  # type: ignore[operator]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(CorruptFile) as caught:
        ModelDescription.read(path)
    assert problem in str(caught.value)
    assert "not a valid model description (model.json)" in str(caught.value)


def test_every_problem_is_listed_up_to_a_bound(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text('{"surprise": 1}')  # 8 fields missing, 1 unknown
    with pytest.raises(CorruptFile) as caught:
        ModelDescription.read(tmp_path / "model.json")
    message = str(caught.value)
    for field in ("name", "version", "format", "inputs", "outputs", "metrics", "lineage"):
        assert f"{field}: Field required" in message
    assert "and 1 more" in message


def test_a_result_must_point_at_its_own_model_folder(tmp_path: Path) -> None:
    fields = json.loads(LEGACY_RESULT_JSON)
    fields["path"] = "models/other/p1.train"
    (tmp_path / "result.json").write_text(json.dumps(fields))
    expected = re.escape("is not the model's folder 'models/digits/p1.train'")
    with pytest.raises(CorruptFile, match=expected):
        RunResult.read(tmp_path / "result.json")


def test_the_contracts_are_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        result().steps = 4  # type: ignore[misc]
