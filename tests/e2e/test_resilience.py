"""The platform outlives its own processes: a service killed mid-pipeline is started again by
`torchrelay up`, the work it held is taken over, and every stage still happens once. Two
replicas of every service share a batch of pipelines without doing anything twice."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Up, digits_pipeline, start_up, stop_up

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DONE_ONCE = (
    "io.torchrelay.pipeline.submitted.v1",
    "io.torchrelay.dataset.staged.v1",
    "io.torchrelay.train.completed.v1",
    "io.torchrelay.model.deployed.v1",
)


def assert_each_stage_done_once(up: Up, pipeline_id: str) -> None:
    report = up.status(pipeline_id)
    assert report["status"] == "succeeded", report
    assert report["stages"]["train"]["detail"]["metrics"]["accuracy"] >= 0.9
    counts = up.events()
    assert {kind: counts[(kind, pipeline_id)] for kind in DONE_ONCE} == dict.fromkeys(DONE_ONCE, 1)


def kill(up: Up, replica: str) -> int:
    pid = up.pid(replica)
    os.kill(pid, signal.SIGKILL)
    up.killed.add(replica)
    return pid


def wait_restarted(up: Up, replica: str, old_pid: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while up.pid(replica) == old_pid:
        assert time.monotonic() < deadline, f"{replica} was not started again"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    platform = start_up(tmp_path_factory.mktemp("resilience"))
    yield platform
    output = stop_up(platform)
    # Only what the tests that ran killed (any subset of this module may run).
    for replica in platform.killed:
        assert f"{replica} is back" in output, output


def test_ingest_killed_as_a_pipeline_arrives(up: Up) -> None:
    # Staging the digits takes a fraction of a second: the pipeline arrives while ingest is
    # dead, and waits in the stream for the replica that `up` starts again.
    old = kill(up, "ingest-0")
    pipeline_id = up.submit(digits_pipeline("after-ingest-died", epochs=10))
    wait_restarted(up, "ingest-0", old)
    up.finish(pipeline_id)
    assert_each_stage_done_once(up, pipeline_id)


def test_train_killed_while_its_workers_train(up: Up) -> None:
    pipeline_id = up.submit(digits_pipeline("after-train-died"))
    checkpoints = up.storage / "runs" / f"{pipeline_id}.train" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*.pt"))):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    old = kill(up, "train-0")
    wait_restarted(up, "train-0", old)
    up.finish(pipeline_id)
    assert_each_stage_done_once(up, pipeline_id)
    logs = up.storage / "runs" / f"{pipeline_id}.train" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["attempt-0", "attempt-1"]
    resumed = (logs / "attempt-1" / "rank-0.log").read_text()
    assert '"resumed_from_step": null' not in resumed, "attempt 1 resumed from a checkpoint"


def test_serve_killed_during_a_rollout(up: Up) -> None:
    # A model of its own: its first version is a full rollout (new servers, seconds), where a
    # retrained "digits" would swap into the running servers in milliseconds.
    spec = digits_pipeline("after-serve-died", epochs=10, model_name="digits-serve-killed")
    pipeline_id = up.submit(spec)
    up.wait_for(pipeline_id, "deploy", "running")
    old = kill(up, "serve-0")
    wait_restarted(up, "serve-0", old)
    up.finish(pipeline_id)
    assert_each_stage_done_once(up, pipeline_id)


def test_monitor_killed_while_a_run_trains(up: Up) -> None:
    pipeline_id = up.submit(digits_pipeline("after-monitor-died", epochs=10))
    up.wait_for(pipeline_id, "train", "running")
    old = kill(up, "monitor-0")
    wait_restarted(up, "monitor-0", old)
    up.finish(pipeline_id)
    assert_each_stage_done_once(up, pipeline_id)


def test_two_replicas_of_every_service_run_five_pipelines_each_once(tmp_path: Path) -> None:
    up = start_up(tmp_path, "--replicas", "2")
    try:
        assert set(up.described["services"]) == {
            f"{service}-{index}"
            for service in ("ingest", "train", "serve", "monitor")
            for index in (0, 1)
        }
        pipelines = [
            up.submit(digits_pipeline(f"batch-{n}", epochs=8, world_size=1)) for n in range(5)
        ]
        for pipeline_id in pipelines:
            up.finish(pipeline_id, timeout=400)
        for pipeline_id in pipelines:
            assert_each_stage_done_once(up, pipeline_id)
        # Five versions of one model rolled out one after another, across both replicas:
        # the last one serves on the model's single endpoint.
        endpoints = {up.status(p)["stages"]["deploy"]["detail"]["endpoint"] for p in pipelines}
        assert len(endpoints) == 1
    finally:
        stop_up(up)
