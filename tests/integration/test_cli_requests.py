"""`cancel`, `deploy`, `rollback`, `undeploy` and `status --follow` through the real CLI
process against a real nats-server: each checks what the platform records before it publishes
a request, and refuses with one line and exit 1 when there is nothing to do (issue 15, item 3)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats
import pytest

from tests.integration.processes import cli
from tests.integration.watching import Watcher, watching
from torchrelay.services.ingest.handlers import VersionRecord, version_key
from torchrelay.services.serve.domain import DeploymentRecord
from torchrelay.services.train.domain import ModelRecord, model_key
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.events import (
    ModelDeployRequested,
    ModelRollbackRequested,
    ModelUndeployRequested,
    PipelineSubmitted,
    SweepCancelRequested,
    TrainCancelRequested,
)
from torchrelay.shared.events.data import DatasetRef, PipelineSpec, TrainJobSpec
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key, with_stage
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.state import KvState, State, key_part
from torchrelay.shared.sweep_state import (
    SweepRecord,
    end_trial,
    fill_slots,
    new_sweep,
    sweep_key,
)
from torchrelay.shared.testing import assert_eventually

pytestmark = [pytest.mark.timeout(90)]
SPEC = PipelineSpec.model_validate(
    {
        "name": "digits",
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": {"entrypoint": "m:train", "model_name": "digits"},
    }
)


def torchrelay(nats_url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return cli(*argv, "--nats-url", nats_url)


@pytest.fixture
async def state(nats_url: str) -> AsyncIterator[State]:
    nc = await nats.connect(nats_url)
    try:
        yield await KvState.open(nc.jetstream())
    finally:
        await nc.close()


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    kinds = [
        TrainCancelRequested,
        ModelDeployRequested,
        ModelRollbackRequested,
        ModelUndeployRequested,
        PipelineSubmitted,
        SweepCancelRequested,
    ]
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
    blank = torchrelay(nats_url, "cancel", "p-train", "--reason", "")
    assert (blank.returncode, blank.stderr.strip()) == (
        2,
        "torchrelay: reason: String should have at least 1 character",
    )
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
    assert "Invalid value for '--replicas'" in zero.stderr

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


async def test_undeploy_asks_serve_to_take_down_only_a_model_that_is_deployed(
    nats_url: str, state: State, bus: tuple[JetStreamBus, Watcher]
) -> None:
    _, watcher = bus
    deployments = state.store("deployments", DeploymentRecord)
    serving = DeploymentRecord(
        model="served", active_version="v3", status="deployed", updated=datetime.now(UTC)
    )
    await deployments.put(key_part("served"), serving)
    gone = serving.model_copy(
        update={
            "model": "gone",
            "status": "undeployed",
            "active_version": None,
            "previous_version": "v2",
        }
    )
    await deployments.put(key_part("gone"), gone)

    asked = torchrelay(nats_url, "undeploy", "served", "--reason", "replaced")
    assert asked.returncode == 0, asked.stderr
    assert "undeploy of served (v3 serves) requested" in asked.stdout
    event = await watcher.one(ModelUndeployRequested, model_name="served")
    assert (event.data.reason, event.subject) == ("replaced", "served")

    for model, says in [
        ("nope", "model 'nope' is not deployed: nothing to undeploy"),
        (
            "gone",
            "model 'gone' was undeployed: nothing to undeploy; "
            "`torchrelay deploy gone v2` brings it back",
        ),
    ]:
        refused = torchrelay(nats_url, "undeploy", model)
        assert (refused.returncode, refused.stderr.strip()) == (1, f"torchrelay: {says}")
    long = torchrelay(nats_url, "undeploy", "served", "--reason", "x" * 513)
    assert (long.returncode, long.stderr.strip()) == (
        1,
        "torchrelay: the reason has 513 characters: say why in 1 to 512",
    )
    assert len(watcher.of(ModelUndeployRequested)) == 1, "nothing else was asked"


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


async def test_status_of_a_sweep_shows_its_trials_best_first_and_cancel_stops_the_sweep(
    nats_url: str, state: State, bus: tuple[JetStreamBus, Watcher]
) -> None:
    sweep = {
        "space": {"lr": {"type": "choice", "values": [0.3, 0.03, 0.003]}},
        "algorithm": "grid",
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "max_trials": 3,
        "parallel": 2,
    }
    spec = SPEC.model_validate({**SPEC.model_dump(mode="json"), "sweep": sweep})
    now = datetime.now(UTC)
    record = PipelineRecord(pipeline_id="p-sweep", spec=spec, submitted=now)
    record = with_stage(record, "ingest", "succeeded", now)
    record = with_stage(record, "train", "running", now, detail={"sweep": "p-sweep"})
    await state.store("pipelines", PipelineRecord).put(pipeline_key("p-sweep"), record)
    assert spec.sweep is not None
    job = TrainJobSpec(
        dataset=DatasetRef(name="digits", version="v1"), **SPEC.training.model_dump()
    )
    planned = fill_slots(new_sweep("p-sweep", spec.sweep, job, now), now)
    trials = end_trial(planned, 0, now, objective=None, failure="loss is nan")
    trials = end_trial(trials, 1, now, objective=0.96, model_version="m1")
    await state.store("sweeps", SweepRecord).put(sweep_key("p-sweep"), trials)

    shown = torchrelay(nats_url, "status", "p-sweep")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("sweep p-sweep"))) :]
    assert table[0].startswith("sweep p-sweep: running, grid, 3 of 3 trials planned")
    assert table[1].split() == ["TRIAL", "STATUS", "LR", "ACCURACY", "(MAXIMIZE)", "RUN", "REASON"]
    assert [row.split()[:4] for row in table[2:5]] == [
        ["1*", "completed", "0.03", "0.96"],
        ["0", "failed", "0.3", "p-sweep.trial-0"],
        ["2", "pending", "0.003", "p-sweep.trial-2"],
    ]
    as_json = json.loads(torchrelay(nats_url, "status", "p-sweep", "--json").stdout)
    assert [t["index"] for t in as_json["sweep"]["trials"]] == [1, 0, 2]
    assert as_json["sweep"]["leading"] == 1

    await a_pipeline(state, "p-plain", ("ingest", "succeeded"), ("train", "running"))
    plain = torchrelay(nats_url, "status", "p-plain")
    assert plain.returncode == 0, plain.stderr
    assert "sweep" not in plain.stdout.lower()
    assert "sweep" not in json.loads(torchrelay(nats_url, "status", "p-plain", "--json").stdout)

    cancelled = torchrelay(nats_url, "cancel", "p-sweep", "--reason", "enough")
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancel of sweep p-sweep requested" in cancelled.stdout
    _, watcher = bus
    event = await watcher.one(SweepCancelRequested, sweep_id="p-sweep")
    assert (event.data.reason, event.pipelineid) == ("enough", "p-sweep")


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


async def test_retry_submits_a_failed_pipelines_spec_again_under_a_new_id(
    nats_url: str, state: State, bus: tuple[JetStreamBus, Watcher]
) -> None:
    _, watcher = bus
    await a_pipeline(state, "p-failed", ("ingest", "succeeded"), ("train", "failed"))
    await a_pipeline(state, "p-busy", ("ingest", "running"))
    retried = torchrelay(nats_url, "retry", "p-failed")
    assert retried.returncode == 0, retried.stderr
    new_id = retried.stdout.split()[1]
    assert new_id.startswith("digits-")
    assert new_id != "p-failed"
    await assert_eventually(
        lambda: [e for e in watcher.of(PipelineSubmitted) if e.pipelineid == new_id]
    )
    (event,) = [e for e in watcher.of(PipelineSubmitted) if e.pipelineid == new_id]
    assert event.data.spec == SPEC
    for ident, says in [
        ("p-busy", "pipeline p-busy running, it did not fail: nothing to retry"),
        ("nope", "no pipeline nope"),
    ]:
        refused = torchrelay(nats_url, "retry", ident)
        assert (refused.returncode, refused.stderr.strip()) == (1, f"torchrelay: {says}")


async def test_models_and_datasets_list_what_was_trained_and_staged(
    nats_url: str, state: State
) -> None:
    await state.store("models", ModelRecord).put(
        model_key("listed", "v7"),
        ModelRecord(
            name="listed",
            version="v7",
            path="models/listed/v7",
            metrics={"accuracy": 0.97},
            run_id="r7",
            dataset="blobs@d1",
            created=datetime.now(UTC),
        ),
    )
    await state.store("datasets", VersionRecord).put(
        version_key("listed-data", "d1"),
        VersionRecord(
            name="listed-data",
            version="d1",
            format="csv",
            path="datasets/listed-data/d1",
            files=1,
            size_bytes=27510,
            source="upload:blobs.csv",
            created=datetime.now(UTC),
        ),
    )
    models = torchrelay(nats_url, "models", "--json")
    assert models.returncode == 0, models.stderr
    assert {"model": "listed@v7", "metrics": "accuracy=0.97"}.items() <= next(
        row for row in json.loads(models.stdout) if row["model"] == "listed@v7"
    ).items()
    datasets = torchrelay(nats_url, "datasets")
    assert datasets.returncode == 0, datasets.stderr
    row = next(line for line in datasets.stdout.splitlines() if "listed-data" in line)
    assert row.split()[:5] == ["listed-data", "d1", "csv", "1", "27510"]


async def test_events_shows_the_last_ones_of_a_pipeline_and_follows_new_ones(
    nats_url: str, bus: tuple[JetStreamBus, Watcher]
) -> None:
    publisher, _ = bus
    for index in range(3):
        for pipeline in ("ev-a", "ev-b"):
            await publisher.publish(submitted(pipeline, index))
    shown = torchrelay(nats_url, "events", "--pipeline", "ev-a", "--last", "2")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 2
    assert [line.split()[2:4] for line in lines] == [["pipeline.submitted", "ev-a"]] * 2

    follow = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "torchrelay", "events", "--follow", "--last", "0"),
        *("--pipeline", "ev-b", "--nats-url", nats_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert follow.stdout is not None
    await asyncio.sleep(2)  # subscribed by now; a later event is followed either way
    await publisher.publish(submitted("ev-a", 9))
    await publisher.publish(submitted("ev-b", 9))
    line = await asyncio.wait_for(follow.stdout.readline(), 30)
    assert line.split()[2:4] == [b"pipeline.submitted", b"ev-b"]
    follow.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(follow.communicate(), 30)
    assert follow.returncode == 130
    assert b"Traceback" not in err


def submitted(pipeline_id: str, index: int) -> PipelineSubmitted:
    spec = SPEC.model_copy(update={"name": f"events-{index}"})
    return PipelineSubmitted(
        source="/tests", subject=spec.name, pipelineid=pipeline_id, data={"spec": spec}
    )
