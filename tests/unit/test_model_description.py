"""A model describes itself in model.json: the class names of its outputs (labels) and how a
raw input is scaled into it (preprocessing). Both are optional, so files written before them
still load; labels that do not fit the output are refused."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from torchrelay.shared.events.data import DatasetRef
from torchrelay.shared.storage import CorruptFile, ModelDescription, ModelLineage, TensorSignature
from torchrelay.shared.storage.files import InputPreprocessing, label_problem


def description(output_shape: tuple[int, ...] = (-1, 3), **fields: object) -> ModelDescription:
    return ModelDescription.model_validate(
        {
            "name": "toy",
            "version": "r1",
            "format": "torchscript",
            "inputs": [TensorSignature(name="input", datatype="FP32", shape=(-1, 4))],
            "outputs": [TensorSignature(name="output", datatype="FP32", shape=output_shape)],
            "metrics": {},
            "lineage": ModelLineage(
                dataset=DatasetRef(name="toy", version="v1"),
                run_id="r1",
                attempt=0,
                entrypoint="mine.train:train",
                steps=3,
            ),
            "created": datetime(2026, 1, 1, tzinfo=UTC),
            **fields,
        }
    )


def test_labels_and_preprocessing_round_trip_through_model_json(tmp_path: Path) -> None:
    scaling = InputPreprocessing(scale=1 / 255, offset=-0.5, description="pixels 0..255")
    description(labels=["cat", "dog", "eel"], preprocessing=scaling).write(tmp_path / "m.json")
    read = ModelDescription.read(tmp_path / "m.json")
    assert read.labels == ("cat", "dog", "eel")
    assert read.preprocessing == scaling
    assert json.loads((tmp_path / "m.json").read_text())["preprocessing"] == {
        "scale": 1 / 255,
        "offset": -0.5,
        "description": "pixels 0..255",
    }


def test_a_model_that_declares_neither_writes_the_model_json_of_before(tmp_path: Path) -> None:
    description().write(tmp_path / "m.json")
    written = json.loads((tmp_path / "m.json").read_text())
    assert "labels" not in written, "readers from before these fields read the file"
    assert "preprocessing" not in written
    read = ModelDescription.read(tmp_path / "m.json")
    assert read.labels is None
    assert read.preprocessing is None
    description(labels=["a", "b", "c"]).write(tmp_path / "m.json")
    assert "preprocessing" not in json.loads((tmp_path / "m.json").read_text())


def test_labels_must_name_every_output_value(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"2 labels for an output of 3 values per sample"):
        description(labels=["cat", "dog"])
    written = json.loads(description().model_dump_json()) | {"labels": ["a"]}
    (tmp_path / "m.json").write_text(json.dumps(written))
    with pytest.raises(CorruptFile, match=r"1 labels for an output of 3 values"):
        ModelDescription.read(tmp_path / "m.json")


def test_an_output_without_a_last_dimension_takes_any_labels() -> None:
    assert label_problem(["low", "high"], (-1,)) is None
    assert label_problem(["low", "high"], (-1, -1)) is None
    assert description((-1,), labels=["low", "high"]).labels == ("low", "high")


def test_preprocessing_scales_raw_inputs_and_refuses_what_cannot_be_meant() -> None:
    scaling = InputPreprocessing(scale=1 / 16)
    assert scaling.apply(np.array([0.0, 8.0, 16.0])).tolist() == [0.0, 0.5, 1.0]
    assert InputPreprocessing().apply(3.0) == 3.0, "the default is the identity"
    with pytest.raises(ValidationError, match=r"scale 0 would turn every input"):
        InputPreprocessing(scale=0)
    with pytest.raises(ValidationError, match=r"finite number"):
        InputPreprocessing(offset=math.nan)
    with pytest.raises(ValidationError, match=r"Extra inputs"):
        InputPreprocessing.model_validate({"scale": 2, "mean": 0.5})
