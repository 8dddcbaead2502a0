"""A model exported through the SDK describes itself: its labels and input scaling land in
model.json and the model server's v2 metadata; labels that do not fit the output are refused
before anything is written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import torch

from tests.integration.labelled_models import LABELS, SCALING, export_toy, toy_context, toy_model
from tests.integration.models import ModelServer
from torchrelay.services.train.worker.context import ExportRefused
from torchrelay.shared.storage import ModelDescription

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ModelServer]:
    server = ModelServer(export_toy(tmp_path / "storage"), tmp_path / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_labels_and_scaling_land_in_model_json(tmp_path: Path) -> None:
    folder = export_toy(tmp_path)
    description = ModelDescription.read(folder / "model.json")
    assert description.labels == tuple(LABELS)
    assert description.preprocessing == SCALING
    assert [tuple(o.shape) for o in description.outputs] == [(-1, 3)]


async def test_the_model_server_reports_them_in_its_v2_metadata(served: ModelServer) -> None:
    base = f"http://127.0.0.1:{served.port}/v2/models/toy"
    async with aiohttp.ClientSession() as http:
        for url in (base, f"{base}/versions/r1"):
            async with http.get(url) as response:
                assert response.status == 200
                metadata = await response.json()
            assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
            assert metadata["parameters"] == {
                "labels": '["cat", "dog", "eel"]',
                "preprocessing_scale": 0.0625,
                "preprocessing_offset": -1.0,
                "preprocessing_description": "counts 0..32",
            }


@pytest.mark.parametrize(
    ("labels", "error", "problem"),
    [
        (["cat", "dog"], ExportRefused, r"2 labels for an output of 3 values per sample"),
        ("cde", ExportRefused, r"labels must be a list of class names"),
        ([0, 1, 2], ExportRefused, r"labels must be a list of class names"),
    ],
)
def test_labels_that_do_not_name_the_outputs_are_refused_and_nothing_is_written(
    tmp_path: Path, labels: object, error: type[Exception], problem: str
) -> None:
    ctx = toy_context(tmp_path)
    with pytest.raises(error, match=problem):
        ctx.export(
            toy_model(),
            example_input=torch.zeros(1, 4),
            metrics={},
            labels=labels,  # type: ignore[arg-type]
        )
    assert not (tmp_path / "models").exists()
    assert ctx.exported is None
