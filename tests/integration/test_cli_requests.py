"""`cancel`, `deploy`, `rollback` and `status --follow` through the real CLI process against a
real nats-server: each checks what the platform records before it publishes a request, and
refuses with one line and exit 1 when there is nothing to do (issue 15, item 3)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats
import pytest

from tests.integration.watching import Watcher, watching
from torchrelay.services.serve.domain import DeploymentRecord
from torchrelay.services.train.domain import ModelRecord, model_key
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.events import (
    ModelDeployRequested,
    ModelRollbackRequested,
    TrainCancelRequested,
)
from torchrelay.shared.events.data import DatasetRef, PipelineSpec, TrainJobSpec
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key, with_stage
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.state import KvState, State, key_part

pytestmark = [pytest.mark.timeout(90)]
SPEC = PipelineSpec.model_validate(
    {
        "name": "digits",
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": {"entrypoint": "m:train", "model_name": "digits"},
    }
)


def torchrelay(nats_url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchrelay", *argv, "--nats-url", nats_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ),
    )


@pytest.fixture
async def state(nats_url: str) -> AsyncIterator[State]:
    nc = await nats.connect(nats_url)
    try:
        yield await KvState.open(nc.jetstream())
    finally:
        await nc.close()


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    kinds = [TrainCancelRequested, ModelDeployRequested, ModelRollbackRequested]
    async with watching(nats_url, "test-cli-requests", kinds) as pair:
        yield pair


async def a_pipeline(state: State, pipeline_id: str, *stages: tuple[str, str]) -> None:
    record = PipelineRecord(pipeline_id=pipeline_id, spec=SPEC, submitted=datetime.now(UTC))
    for stage, status in stages:
        record = with_stage(
            record, stage, status, datetime.now(UTC), detail={"run_id": f"{pipeline_id}.train"}
        )  # type: ignore[arg-type]
    await state.store("pipelines", PipelineRecord).put(pipeline_key(pipeline_id), record)


async def a_run(state: State, run_id: str, status: str) -> None:
    run = RunRecord(
        run_id=run_id,
        spec=TrainJobSpec(
            entrypoint="m:train",
            model_name="digits",
            dataset=DatasetRef(name="digits", version="v1"),
        ),
        dataset_path="datasets/digits/v1",
        status=status,  # type: ignore[arg-type]
        attempt=0,
        owner="train-a",
        pipeline_id=run_id.removesuffix(".train"),
        updated=datetime.now(UTC),
    )
    await state.store("runs", RunRecord).put(key_part(run_id), run)


async def following(pipeline_id: str, nats_url: str) -> asyncio.subprocess.Process:
    """`torchrelay status ID --follow`, running."""
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "torchrelay", "status", pipeline_id, "--follow"),
        *("--nats-url", nats_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def test_cancel_stops_a_training_pipeline_and_refuses_what_has_nothing_to_stop(
    nats_url: str, state: State, bus: tuple[JetStreamBus, Watcher]
) -> None:
    _, watcher = bus
    await a_pipeline(state, "p-train", ("ingest", "succeeded"), ("train", "running"))
    await a_run(state, "p-train.train", "running")
    await a_pipeline(state, "p-ingest", ("ingest", "running"))
    await a_pipeline(state, "p-done", ("ingest", "succeeded"), ("train", "failed"))
    await a_run(state, "lone-run", "succeeded")

    cancelled = torchrelay(nats_url, "cancel", "p-train", "--reason", "wrong data")
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancel of run p-train.train requested" in cancelled.stdout
    event = await watcher.one(TrainCancelRequested, run_id="p-train.train")
    assert (event.data.reason, event.data.restart, event.pipelineid) == (
        "wrong data",
        False,
        "p-train",
    )

    for ident, says in [
        ("nope", "no pipeline or run named 'nope'"),
        (
            "p-ingest",
            "pipeline p-ingest is in its ingest stage, not training: only training is "
            "cancelled (it ends with the pipeline failed)",
        ),
        ("p-done", "pipeline p-done already ended (failed): nothing to cancel"),
        ("lone-run", "run lone-run already ended (succeeded): nothing to cancel"),
    ]:
        refused = torchrelay(nats_url, "cancel", ident)
        assert (refused.returncode, refused.stderr.strip()) == (1, f"torchrelay: {says}")
    assert len(watcher.of(TrainCancelRequested)) == 1, "nothing else was asked"


async def test_deploy_and_rollback_ask_serve_for_what_exists(
    nats_url: str, state: State, bus: tuple[JetStreamBus, Watcher]
) -> None:
    _, watcher = bus
    models = state.store("models", ModelRecord)
    for version in ("v1", "v2"):
        await models.put(
            model_key("blobs", version),
            ModelRecord(
                name="blobs",
                version=version,
                path=f"models/blobs/{version}",
                metrics={},
                run_id=version,
                dataset="blobs@d1",
                created=datetime.now(UTC),
            ),
        )
    deployed = torchrelay(nats_url, "deploy", "blobs", "v2", "--replicas", "2")
    assert deployed.returncode == 0, deployed.stderr
    event = await watcher.one(ModelDeployRequested, model_name="blobs")
    assert (event.data.version, event.data.replicas) == ("v2", 2)

    unknown = torchrelay(nats_url, "deploy", "blobs", "v9")
    assert unknown.returncode == 1
    assert (
        unknown.stderr.strip()
        == "torchrelay: no version 'v9' of model 'blobs' (its versions: v1, v2)"
    )
    zero = torchrelay(nats_url, "deploy", "blobs", "v1", "--replicas", "0")
    assert zero.returncode == 2
    assert "0 is not between 1 and 64" in zero.stderr

    not_deployed = torchrelay(nats_url, "rollback", "blobs")
    assert not_deployed.returncode == 1
    assert "model 'blobs' is not deployed" in not_deployed.stderr
    deployments = state.store("deployments", DeploymentRecord)
    first = DeploymentRecord(
        model="blobs", active_version="v1", status="deployed", updated=datetime.now(UTC)
    )
    await deployments.put(key_part("blobs"), first)
    only_one = torchrelay(nats_url, "rollback", "blobs")
    assert only_one.returncode == 1
    assert "serves its first version (v1): name the version to go to with --to" in only_one.stderr
    await deployments.put(
        key_part("blobs"),
        first.model_copy(update={"active_version": "v2", "previous_version": "v1"}),
    )
    rolled = torchrelay(nats_url, "rollback", "blobs")
    assert rolled.returncode == 0, rolled.stderr
    event = await watcher.one(ModelRollbackRequested, model_name="blobs")
    assert event.data.to_version is None
    assert len(watcher.of(ModelDeployRequested)) == 1


async def test_status_follow_reattaches_to_a_pipeline_until_it_ends(
    nats_url: str, state: State
) -> None:
    await a_pipeline(state, "p-follow", ("ingest", "succeeded"), ("train", "running"))
    follow = await following("p-follow", nats_url)
    await asyncio.sleep(2)  # following by now (or soon): the end is seen either way
    pipelines = state.store("pipelines", PipelineRecord)
    current = await pipelines.get(pipeline_key("p-follow"))
    assert current is not None
    ended = with_stage(current.value, "train", "succeeded", datetime.now(UTC))
    ended = with_stage(ended, "deploy", "skipped", datetime.now(UTC))
    await pipelines.put(pipeline_key("p-follow"), ended)
    out, err = await asyncio.wait_for(follow.communicate(), 30)
    assert follow.returncode == 0, err.decode()
    assert "p-follow: succeeded" in out.decode()

    unknown = torchrelay(nats_url, "status", "nope", "--follow")
    assert (unknown.returncode, unknown.stderr.strip()) == (1, "torchrelay: no pipeline nope")


async def test_ctrl_c_on_status_follow_says_the_pipeline_goes_on(
    nats_url: str, state: State
) -> None:
    await a_pipeline(state, "p-long", ("ingest", "running"))
    follow = await following("p-long", nats_url)
    assert follow.stdout is not None
    first = await asyncio.wait_for(follow.stdout.readline(), 30)  # the stage it is in
    assert b"ingest" in first
    follow.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(follow.communicate(), 30)
    assert follow.returncode == 130
    said = err.decode()
    assert "stopped following p-long; the pipeline goes on" in said
    assert "Traceback" not in said
