"""Rank 0's progress reports as events: a run that diverges keeps reporting (its NaN loss as
null), so the monitor sees it, and median stopping can stop it, instead of the step failing."""

from __future__ import annotations

import math

from torchrelay.services.train.worker.report import report_event
from torchrelay.shared.cluster.worker_spec import WorkerSpec
from torchrelay.shared.events import TrainCheckpointed, TrainProgressed, decode
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec
from torchrelay.shared.sweeps import objective_value

SPEC = WorkerSpec(
    run_id="sweep-1.trial-3",
    attempt=0,
    rank=0,
    world_size=1,
    rendezvous="file:///unused",
    backend="gloo",
    job=TrainJobSpec(
        dataset=DatasetRef(name="digits", version="v1"),
        entrypoint="torchrelay.services.train.examples.digits:train",
        model_name="digits",
    ),
    storage_root="/unused",
    dataset_path="datasets/digits/v1",
    pipeline_id="sweep-1",
)


def progress(loss: float, **metrics: float) -> dict[str, object]:
    return {"step": 40, "epoch": 1, "loss": loss, "samples_per_s": 900.0, "metrics": metrics}


def test_a_finite_report_is_carried_as_it_is_with_its_pipeline() -> None:
    event = report_event(SPEC, "progress", progress(0.25, accuracy=0.9))
    assert isinstance(event, TrainProgressed)
    assert (event.data.loss, event.data.metrics) == (0.25, {"accuracy": 0.9})
    assert (event.subject, event.pipelineid) == ("sweep-1.trial-3", "sweep-1")


def test_a_diverged_loss_and_metric_are_reported_as_null_and_survive_the_bus() -> None:
    event = report_event(SPEC, "progress", progress(math.nan, accuracy=math.inf, top5=0.5))
    decoded = decode(event.to_json())
    assert isinstance(decoded, TrainProgressed)
    assert decoded.data.loss is None
    assert decoded.data.metrics == {"accuracy": None, "top5": 0.5}
    # ... which a sweep reads as the worst objective there is.
    assert math.isnan(objective_value("loss", loss=None, metrics={}) or 0.0)
    nan = objective_value("accuracy", loss=0.1, metrics=decoded.data.metrics)
    assert nan is not None
    assert math.isnan(nan)
    assert objective_value("f1", loss=0.1, metrics=decoded.data.metrics) is None


def test_a_checkpoint_report_names_its_path() -> None:
    event = report_event(SPEC, "checkpointed", {"step": 40, "path": "runs/r/checkpoints/x"})
    assert isinstance(event, TrainCheckpointed)
    assert event.data.path == "runs/r/checkpoints/x"
