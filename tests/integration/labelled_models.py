"""A tiny model exported through the training SDK with labels and input scaling, and the
context a rank exporting it has (no dataset is read, so none is staged)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from torchrelay.sdk import InputPreprocessing, TrainingContext
from torchrelay.shared.cluster.worker_spec import WorkerSpec
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec

LABELS = ["cat", "dog", "eel"]
SCALING = InputPreprocessing(scale=1 / 16, offset=-1, description="counts 0..32")


def toy_context(root: Path, model: str = "toy", run_id: str = "r1") -> TrainingContext:
    spec = WorkerSpec(
        run_id=run_id,
        attempt=0,
        rank=0,
        world_size=1,
        rendezvous="file:///unused",
        backend="gloo",
        job=TrainJobSpec(
            dataset=DatasetRef(name="toy", version="v1"),
            entrypoint="torchrelay.services.train.examples.digits:train",
            world_size=1,
            model_name=model,
        ),
        storage_root=str(root),
        dataset_path="datasets/toy/v1",
    )
    return TrainingContext(spec, lambda kind, fields: None)


def toy_model() -> nn.Linear:
    """Logits = the first three inputs, plus 5 for the last class: scaling the input changes
    which class wins (raw [16, 48, 32, 0] -> dog; scaled [0, 2, 1, -1] -> eel)."""
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(3, 4))
        linear.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    return linear


def export_toy(root: Path, model: str = "toy", run_id: str = "r1") -> Path:
    """The toy model exported as ``models/<model>/<run_id>``, labelled and scaled."""
    ctx = toy_context(root, model, run_id)
    ctx.export(
        toy_model(),
        example_input=torch.zeros(1, 4),
        metrics={"accuracy": 1.0},
        labels=LABELS,
        preprocessing=SCALING,
    )
    return ctx.layout.model(model, run_id)
