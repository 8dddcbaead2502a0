"""What a progress report and an export put into the run's TensorBoard history, by tag, and
where each attempt's history lives."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from torchrelay.services.train.worker.history import (
    export_scalars,
    learning_rates,
    progress_scalars,
)
from torchrelay.shared.errors import UnsafePath
from torchrelay.shared.storage.layout import Layout


def test_a_report_becomes_loss_throughput_learning_rate_and_the_codes_own_metrics() -> None:
    scalars = progress_scalars(
        loss=0.25, samples_per_s=1200.0, metrics={"accuracy": 0.9}, learning_rates=[1e-3]
    )
    assert scalars == {
        "train/loss": 0.25,
        "train/samples_per_s": 1200.0,
        "train/lr": 1e-3,
        "metrics/accuracy": 0.9,
    }


def test_an_optimizer_with_several_parameter_groups_has_a_learning_rate_per_group() -> None:
    scalars = progress_scalars(
        loss=1.0, samples_per_s=10.0, metrics={}, learning_rates=[1e-2, torch.tensor(1e-4)]
    )
    assert scalars["train/lr/group-0"] == 1e-2
    assert math.isclose(scalars["train/lr/group-1"], 1e-4, rel_tol=1e-6)
    assert "train/lr" not in scalars


def test_without_an_optimizer_there_is_no_learning_rate() -> None:
    assert learning_rates(None) == []
    scalars = progress_scalars(loss=1.0, samples_per_s=10.0, metrics={}, learning_rates=[])
    assert set(scalars) == {"train/loss", "train/samples_per_s"}


def test_learning_rates_are_read_from_each_parameter_group_as_it_is_now() -> None:
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(
        [{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.5}], lr=0.1
    )
    optimizer.param_groups[0]["lr"] = 0.05  # what a scheduler does
    assert learning_rates(optimizer) == [0.05, 0.5]


def test_values_that_are_not_numbers_are_left_out_and_a_diverging_loss_is_kept() -> None:
    scalars = progress_scalars(
        loss=torch.tensor(float("nan")),
        samples_per_s=5.0,
        metrics={"note": "text", "flag": True, "pair": torch.ones(2), "tensor": torch.tensor(2.0)},
        learning_rates=[None],
    )
    assert set(scalars) == {"train/loss", "train/samples_per_s", "metrics/tensor"}
    assert math.isnan(scalars["train/loss"])
    assert scalars["metrics/tensor"] == 2.0


def test_the_exported_metrics_are_tagged_as_such() -> None:
    assert export_scalars({"accuracy": 0.97, "f1": 0.9, "name": "best"}) == {
        "export/accuracy": 0.97,
        "export/f1": 0.9,
    }
    assert export_scalars({}) == {}


def test_each_attempt_has_its_own_history_folder_under_the_run() -> None:
    layout = Layout(Path("/storage"))
    assert layout.history("r1") == Path("/storage/runs/r1/tensorboard")
    assert layout.attempt_history("r1", 2) == Path("/storage/runs/r1/tensorboard/attempt-2")
    with pytest.raises(UnsafePath):
        layout.history("..")
    with pytest.raises(ValueError, match="attempt must be >= 0"):
        layout.attempt_history("r1", -1)
