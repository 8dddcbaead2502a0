"""Sweeps on the whole local platform: a pipeline spec with a ``sweep:`` block, submitted as a
user does, trains its trials as runs on the staged digits, and deploys the best one."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import nats
import pytest

from tests.e2e.conftest import Up, stream_events
from tests.integration.training import workers_of
from torchrelay.platform import client_url

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DIGITS = "torchrelay.services.train.examples.digits:train"
LEARNING_RATES = [3.0, 0.3, 0.003, 0.00001]
"""Adam on the digits CNN: 3.0 and 0.3 blow the weights up, 1e-5 barely moves in 3 epochs,
3e-3 reaches about 0.95 accuracy: the known best of the four."""


def sweep_pipeline(name: str, **sweep: Any) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": {
            "entrypoint": DIGITS,
            "model_name": name,
            "world_size": 1,
            "checkpoint_every_steps": 10,
            "hyperparameters": {"epochs": 3},
        },
        "deploy": {"enabled": True, "gate": {"metric": "accuracy", "min": 0.8}},
        "sweep": {
            "space": {"lr": {"type": "choice", "values": LEARNING_RATES}},
            "algorithm": "grid",
            "objective": {"metric": "accuracy", "direction": "maximize"},
            "max_trials": 4,
            "parallel": 2,
            **sweep,
        },
    }


def sweep_events(up: Up, pipeline_id: str) -> list[dict[str, Any]]:
    """The events of one pipeline, in stream order."""
    url = client_url(up.folder / ".torchrelay", str(up.described["nats_url"]))

    async def read() -> list[dict[str, Any]]:
        nc = await nats.connect(url)
        try:
            return [event for _, event in await stream_events(nc)]
        finally:
            await nc.close()

    return [e for e in asyncio.run(read()) if e.get("pipelineid") == pipeline_id]


def of_type(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The data of the events of type ``name`` (any version)."""
    return [e["data"] for e in events if e["type"].rsplit(".v", 1)[0] == f"io.torchrelay.{name}"]


def test_a_grid_sweep_finds_the_best_learning_rate_and_a_killed_trial_counts_once(
    platform: Up,
) -> None:
    pipeline_id = platform.submit(sweep_pipeline("lr-grid"))
    # Trial 0 is among the first two: kill its rank once it checkpointed, mid-run.
    victim_run = f"{pipeline_id}.trial-0"
    checkpoints = platform.storage / "runs" / victim_run / "checkpoints"
    deadline = time.monotonic() + 180
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*.pt"))):
        assert time.monotonic() < deadline, "trial 0 never checkpointed"
        time.sleep(0.1)
    workers = workers_of(victim_run)
    assert workers, "trial 0 ended before its rank could be killed"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)

    report = platform.finish(pipeline_id, timeout=400)
    assert report["status"] == "succeeded", report
    train = report["stages"]["train"]
    assert train["detail"]["hyperparameters"] == {"lr": 0.003}
    assert train["detail"]["run_id"] == f"{pipeline_id}.trial-2"
    assert train["detail"]["metrics"]["accuracy"] >= 0.9
    assert report["stages"]["deploy"]["status"] == "succeeded"
    assert report["stages"]["deploy"]["detail"]["version"] == train["detail"]["version"]

    events = sweep_events(platform, pipeline_id)
    (started,) = of_type(events, "sweep.started")
    assert started["trials"] == 4
    assert sorted(t["trial"] for t in of_type(events, "sweep.trial.started")) == [0, 1, 2, 3]
    (completed,) = of_type(events, "sweep.completed")
    assert completed["best_trial"] == 2
    assert completed["hyperparameters"] == {"lr": 0.003}
    assert completed["completed"] + completed["stopped"] + completed["failed"] == 4
    # Each trial is one run: one completion each, whatever its restarts.
    runs = [e["run_id"] for e in of_type(events, "train.completed")]
    assert sorted(runs) == sorted(set(runs))
    assert len(of_type(events, "model.deployed")) == 1, "only the best trial is deployed"
    # The killed trial restarted from its checkpoint, and counts once.
    restarts = [e for e in of_type(events, "train.started") if e["run_id"] == victim_run]
    assert [e["attempt"] for e in restarts] == [0, 1]
    resumed = platform.storage / "runs" / victim_run / "logs" / "attempt-1" / "rank-0.log"
    assert '"resumed_from_step": null' not in resumed.read_text()
    assert '"resumed_from_step": ' in resumed.read_text()
    assert runs.count(victim_run) == 1


def test_median_stopping_stops_a_diverging_trial_before_it_ends(platform: Up) -> None:
    spec = sweep_pipeline(
        "lr-stop",
        # Three sound learning rates first (one at a time), then one that blows up.
        space={"lr": {"type": "choice", "values": [0.003, 0.002, 0.004, 50.0]}},
        objective={"metric": "loss", "direction": "minimize"},
        parallel=1,
        early_stopping={"rule": "median", "warmup_steps": 20, "min_trials": 3},
    )
    spec["training"]["hyperparameters"] = {"epochs": 6}  # 270 steps a trial
    spec["deploy"] = {"enabled": False}
    pipeline_id = platform.submit(spec)
    report = platform.finish(pipeline_id, timeout=400)
    assert report["status"] == "succeeded", report
    assert report["stages"]["train"]["detail"]["hyperparameters"]["lr"] != 50.0

    events = sweep_events(platform, pipeline_id)
    (stopped,) = of_type(events, "sweep.trial.stopped")
    assert (stopped["trial"], stopped["code"]) == (3, "early_stopped")
    assert "median stopping" in stopped["reason"]
    diverging = f"{pipeline_id}.trial-3"
    steps = [e["step"] for e in of_type(events, "train.progress") if e["run_id"] == diverging]
    assert steps, "the diverging trial reported progress"
    assert 20 <= max(steps) < 270, "stopped after its warm-up, well before its end"
    assert diverging not in [e["run_id"] for e in of_type(events, "train.completed")]
    (completed,) = of_type(events, "sweep.completed")
    assert (completed["completed"], completed["stopped"], completed["failed"]) == (3, 1, 0)
