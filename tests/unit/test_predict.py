"""What `torchrelay predict` does with a model's metadata: reads its labels and input scaling
from the v2 metadata's parameters, checks and scales the input, and names the answer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from torchrelay.client import InputMismatch, ModelInfo, decode, prepare_input, scaling_line
from torchrelay.services.serve.server.protocol import model_parameters, read_model_parameters
from torchrelay.shared.storage.files import InputPreprocessing

SCALING = InputPreprocessing(scale=0.5, offset=-1, description="raw counts")


def metadata(**parameters: object) -> dict[str, object]:
    answer: dict[str, object] = {
        "name": "toy",
        "versions": ["r1"],
        "platform": "pytorch_torchscript",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}],
    }
    return answer | ({"parameters": parameters} if parameters else {})


def test_labels_and_scaling_travel_as_scalar_parameters_and_read_back() -> None:
    parameters = model_parameters(["cat", "dog, the big one", "eel"], SCALING)
    assert all(isinstance(v, str | float | bool) for v in parameters.values()), (
        "the protocol's parameter values are scalars"
    )
    assert json.loads(str(parameters["labels"])) == ["cat", "dog, the big one", "eel"]
    info = ModelInfo.from_metadata(metadata(**parameters))
    assert info.labels == ["cat", "dog, the big one", "eel"]
    assert info.preprocessing == SCALING
    assert model_parameters(None, None) == {}
    plain = ModelInfo.from_metadata(metadata())
    assert (plain.labels, plain.preprocessing) == (None, None)
    assert (plain.input_name, plain.datatype, plain.shape) == ("input", "FP32", (-1, 2))


@pytest.mark.parametrize(
    ("parameters", "problem"),
    [
        ({"labels": "cat"}, "not a JSON array"),
        ({"labels": json.dumps([1, 2])}, "not a list of names"),
        ({"preprocessing_scale": 0}, "preprocessing is malformed"),
    ],
)
def test_malformed_parameters_are_a_clear_error(
    parameters: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        read_model_parameters(parameters)


def test_the_input_is_scaled_as_declared_unless_raw() -> None:
    info = ModelInfo("toy", "input", "FP32", (-1, 2), ["a", "b", "c"], SCALING)
    sample = np.array([4, 6])
    assert prepare_input(sample, info, batched=False, raw=False).tolist() == [[1.0, 2.0]]
    assert prepare_input(sample, info, batched=False, raw=True).tolist() == [[4, 6]]
    batch = np.array([[0.0, 2.0], [4.0, 6.0]])
    assert prepare_input(batch, info, batched=True, raw=False).tolist() == [
        [-1.0, 0.0],
        [1.0, 2.0],
    ]
    assert scaling_line(SCALING) == "input scaled as the model declares: x * 0.5 - 1 (raw counts)"


def test_an_input_of_another_shape_says_what_the_model_takes() -> None:
    info = ModelInfo("toy", "input", "FP32", (-1, 1, 8, 8))
    with pytest.raises(InputMismatch, match=r"one sample of shape \[8, 8\]; model 'toy' takes "):
        prepare_input(np.zeros((8, 8)), info, batched=False, raw=False)
    with pytest.raises(InputMismatch, match=r"a batch of shape \[1, 8, 8\].*\[n, 1, 8, 8\]"):
        prepare_input(np.zeros((1, 8, 8)), info, batched=True, raw=False)


def answer(rows: list[list[float]]) -> dict[str, object]:
    flat = [value for row in rows for value in row]
    shape = [len(rows), len(rows[0])]
    return {"outputs": [{"name": "output", "datatype": "FP32", "shape": shape, "data": flat}]}


def test_logits_are_named_with_their_softmax_top_three() -> None:
    decoded = decode(answer([[0.0, 2.0, 6.0, -1.0], [3.0, 0.0, 0.0, 0.0]]), list("abcd"))
    assert decoded is not None
    assert decoded.scores == "softmax"
    first, second = decoded.predictions
    assert first.label == "c"
    assert [label for label, _ in first.top] == ["c", "b", "a"]
    total = math.exp(0) + math.exp(2) + math.exp(6) + math.exp(-1)
    assert first.top[0][1] == pytest.approx(math.exp(6) / total)
    assert second.label == "a"
    assert [label for label, _ in second.top] == ["a", "b", "c"], "ties keep output order"
    assert decoded.lines()[0] == "scores: softmax of the model's outputs (they look like logits)"
    assert decoded.lines()[1] == "input 0: c    top 3: c 0.979  b 0.018  a 0.002"
    shown = decoded.as_json()
    assert shown["scores"] == "softmax"
    assert shown["predictions"][0]["top"][0] == {"label": "c", "score": first.top[0][1]}


def test_probabilities_are_shown_as_they_are() -> None:
    decoded = decode(answer([[0.1, 0.7, 0.2]]), ["x", "y", "z"])
    assert decoded is not None
    assert decoded.scores == "probabilities"
    assert decoded.predictions[0].top == [("y", 0.7), ("z", 0.2), ("x", 0.1)]


def test_an_answer_that_is_not_one_score_per_label_is_not_named() -> None:
    assert decode(answer([[0.1, 0.9]]), ["x", "y", "z"]) is None
    assert decode({"outputs": []}, ["x"]) is None
