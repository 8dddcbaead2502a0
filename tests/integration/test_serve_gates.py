"""Promotion gates through serve's pipeline handler: only a model that passes its pipeline's
gate goes live; a refused one ends the deploy stage skipped and the serving version stays. Over
the in-memory state and JetStream KV (whose leases serialise two replicas' rollouts), with
real model servers."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from tests.integration.models import train_digits
from torchrelay.services.serve.handlers import Deployer, ServeMetrics
from torchrelay.shared.bus.server import NatsServer
from torchrelay.shared.cluster.local_serving import LocalServingBackend
from torchrelay.shared.cluster.registry import ServerOptions
from torchrelay.shared.events import (
    AnyEvent,
    ModelDeployed,
    ModelDeployRequested,
    ModelRolloutStarted,
    TrainCompleted,
)
from torchrelay.shared.events.data import (
    ModelDeployRequestedData,
    PipelineSpec,
    TrainCompletedData,
)
from torchrelay.shared.pipelines import PipelineRecord, StageStatus, pipeline_key
from torchrelay.shared.state import KvState, MemoryState, State
from torchrelay.shared.state.presence import Presence
from torchrelay.shared.testing import assert_eventually
from torchrelay.shared.testing.fixtures import wipe_jetstream

pytestmark = pytest.mark.timeout(240)

METRICS = {
    "good": {"accuracy": 0.9525, "loss": 0.2},
    "worse": {"accuracy": 0.9475, "loss": 0.21},
    "better": {"accuracy": 0.97, "loss": 0.15},
    "best": {"accuracy": 0.98, "loss": 0.1},
    "poor": {"accuracy": 0.82, "loss": 0.6},
}
"""The versions on storage and what each reports (in its model.json and its train.completed)."""
REFUSALS = "torchrelay_serve_gate_refusals_total"


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained digits model, copied under each version of METRICS with those metrics."""
    root = tmp_path_factory.mktemp("storage")
    trained = asyncio.run(train_digits(root, "trained", epochs=1))
    for version, metrics in METRICS.items():
        folder = trained.parent / version
        shutil.copytree(trained, folder)
        description = json.loads((folder / "model.json").read_text())
        description.update(version=version, metrics=metrics)
        (folder / "model.json").write_text(json.dumps(description))
    return root


@pytest.fixture(params=["memory", "nats"])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[State]:
    if request.param == "memory":
        yield MemoryState()
        return
    server: NatsServer = request.getfixturevalue("nats_server")
    await wipe_jetstream(server.url)  # a fresh deployments bucket: nothing serves yet
    nc = await nats.connect(server.url)
    try:
        yield await KvState.open(nc.jetstream())
    finally:
        await nc.close()


class Replica:
    """One serve replica: its deployer, what it published and its metrics."""

    deployer: Deployer

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events: list[AnyEvent] = []

    async def publish(self, event: AnyEvent) -> bool:
        self.events.append(event)
        return True

    def of(self, kind: type[AnyEvent], version: str | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and (version is None or e.data.version == version)
        ]

    def refusals(self) -> float:
        return self.registry.get_sample_value(REFUSALS, {"model": "digits"}) or 0.0


@pytest.fixture
async def replicas(state: State, storage: Path) -> AsyncIterator[list[Replica]]:
    """Two serve replicas sharing one state (and so the rollout lease of each model)."""
    made: list[Replica] = []
    for _ in range(2):
        replica = Replica()
        presence = Presence(state.leases, "serve", f"serve-{uuid.uuid4().hex[:6]}")
        await presence.announce()
        replica.deployer = Deployer(
            backend=LocalServingBackend(
                storage, options=ServerOptions(drain_s=1), ready_timeout_s=60
            ),
            storage_root=storage,
            smoke_timeout_s=30,
            state=state,
            publish=replica.publish,
            presence=presence,
            source="/torchrelay/serve",
            replicas=1,
            metrics=ServeMetrics(replica.registry),
        )
        made.append(replica)
    try:
        yield made
    finally:
        for replica in made:
            await replica.deployer.aclose()


async def pipeline(state: State, gate: dict[str, object] | None) -> str:
    """A pipeline whose ingest and train stages are done, deploying with ``gate``."""
    spec = PipelineSpec.model_validate(
        {
            "name": "gated",
            "dataset": {"name": "digits", "source": "sklearn:digits"},
            "training": {"entrypoint": "m:f", "model_name": "digits"},
            "deploy": {"replicas": 1, "gate": gate},
        }
    )
    pipeline_id = f"p-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    done = StageStatus(status="succeeded", started=now, ended=now)
    record = PipelineRecord(
        pipeline_id=pipeline_id,
        spec=spec,
        submitted=now,
        stages={"ingest": done, "train": done, "deploy": StageStatus()},
    )
    await state.store("pipelines", PipelineRecord).create(pipeline_key(pipeline_id), record)
    return pipeline_id


def trained(pipeline_id: str, version: str, **metrics: float) -> TrainCompleted:
    return TrainCompleted(
        source="/tests",
        pipelineid=pipeline_id,
        data=TrainCompletedData(
            run_id=f"run-{version}",
            model_name="digits",
            model_version=version,
            path=f"models/digits/{version}",
            metrics=metrics or METRICS[version],
        ),
    )


async def deploy_stage(state: State, pipeline_id: str) -> StageStatus:
    stored = await state.store("pipelines", PipelineRecord).get(pipeline_key(pipeline_id))
    assert stored is not None
    return stored.value.stages["deploy"]


async def serving(replica: Replica) -> str | None:
    record = await replica.deployer.deployments.get("digits")
    return None if record is None else record.value.active_version


async def served_version(endpoint: str) -> str:
    tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{endpoint}/infer", json={"inputs": [tensor]}) as response,
    ):
        assert response.status == 200, await response.text()
        return str((await response.json())["model_version"])


async def _only(endpoint: str, version: str) -> bool:
    return all([await served_version(endpoint) == version for _ in range(10)])


GATE = {"metric": "accuracy", "min": 0.9, "better_than_serving": True}


@pytest.mark.slow
async def test_only_a_better_model_replaces_the_serving_one(
    state: State, replicas: list[Replica]
) -> None:
    serve = replicas[0]
    first = await pipeline(state, GATE)
    await serve.deployer.on_trained(trained(first, "good"))
    stage = await deploy_stage(state, first)
    assert stage.status == "succeeded", stage.reason
    assert stage.detail["gate"] == "passed"
    assert stage.detail["gate_note"] == "nothing serves yet: better_than_serving passes"
    endpoint = str(stage.detail["endpoint"])
    assert await served_version(endpoint) == "good"

    worse = await pipeline(state, GATE)
    with capture_logs() as logs:
        await serve.deployer.on_trained(trained(worse, "worse"))
    stage = await deploy_stage(state, worse)
    assert stage.status == "skipped"
    assert stage.reason == "accuracy 0.9475 is not better than 0.9525 of the serving version good"
    assert stage.detail == {
        "version": "worse",
        "gate": "refused",
        "gate_metric": "accuracy",
        "candidate_value": 0.9475,
        "serving_version": "good",
        "serving_value": 0.9525,
    }
    assert [e["event"] for e in logs if e["event"].startswith("model.gate")] == [
        "model.gate_refused"
    ]
    assert serve.of(ModelRolloutStarted, "worse") == []
    assert serve.of(ModelDeployed, "worse") == []
    assert await serving(serve) == "good"
    assert await served_version(endpoint) == "good"
    assert serve.refusals() == 1

    # The same train.completed again (a redelivery) changes nothing, nor counts twice.
    await serve.deployer.on_trained(trained(worse, "worse"))
    assert await deploy_stage(state, worse) == stage
    assert serve.refusals() == 1

    better = await pipeline(state, GATE)
    await serve.deployer.on_trained(trained(better, "better"))
    stage = await deploy_stage(state, better)
    assert stage.status == "succeeded", stage.reason
    assert stage.detail["gate"] == "passed"
    assert (stage.detail["serving_version"], stage.detail["serving_value"]) == ("good", 0.9525)
    assert stage.detail["candidate_value"] == 0.97
    assert stage.detail["endpoint"] == endpoint, "the model keeps its stable endpoint"
    assert await serving(serve) == "better"
    # The old version drains its open connections first: then only the new one answers.
    await assert_eventually(lambda: _only(endpoint, "better"), timeout_s=15)
    assert len(serve.of(ModelRolloutStarted)) == 2


@pytest.mark.slow
async def test_two_replicas_never_judge_two_candidates_against_the_same_old_version(
    state: State, replicas: list[Replica]
) -> None:
    # Both candidates beat what serves; the lease makes the second one judged against the
    # first one's result, so the better of the two ends up serving whatever the order.
    await replicas[0].deployer.on_deploy_requested(
        ModelDeployRequested(
            source="/tests",
            data=ModelDeployRequestedData(model_name="digits", version="good", replicas=1),
        )
    )
    pipelines = {"better": await pipeline(state, GATE), "best": await pipeline(state, GATE)}
    await asyncio.gather(
        replicas[0].deployer.on_trained(trained(pipelines["better"], "better")),
        replicas[1].deployer.on_trained(trained(pipelines["best"], "best")),
    )
    stages = {version: await deploy_stage(state, p) for version, p in pipelines.items()}
    judged_against = sorted(str(stage.detail["serving_version"]) for stage in stages.values())
    assert "good" in judged_against, judged_against
    assert judged_against != ["good", "good"], "both candidates were judged against good"
    assert stages["best"].status == "succeeded", stages["best"].reason
    assert await serving(replicas[0]) == "best"
    if stages["better"].status == "skipped":  # best went first
        assert stages["better"].reason == (
            "accuracy 0.97 is not better than 0.98 of the serving version best"
        )
    else:
        assert stages["better"].status == "succeeded"
        assert stages["best"].detail["serving_version"] == "better"


@pytest.mark.parametrize(
    ("gate", "version", "reason"),
    [
        (
            {"metric": "f1", "min": 0.5},
            "good",
            "the model does not report metric 'f1' (it reports: accuracy, loss); "
            "the rollout is refused",
        ),
        (GATE, "poor", "accuracy 0.82 is below the gate's min 0.9"),
        (
            {"metric": "loss", "max": 0.3, "higher_is_better": False},
            "poor",
            "loss 0.6 is above the gate's max 0.3",
        ),
    ],
)
async def test_a_refused_first_model_never_starts_and_nothing_serves(
    state: State, replicas: list[Replica], gate: dict[str, object], version: str, reason: str
) -> None:
    serve = replicas[0]
    pipeline_id = await pipeline(state, gate)
    await serve.deployer.on_trained(trained(pipeline_id, version))
    stage = await deploy_stage(state, pipeline_id)
    assert stage.status == "skipped"
    assert stage.reason == reason
    assert stage.detail["gate"] == "refused"
    assert "serving_version" not in stage.detail
    assert serve.events == [], "no rollout was started, nothing was deployed"
    assert await serve.deployer.deployments.get("digits") is None
    assert serve.refusals() == 1
    stored = await state.store("pipelines", PipelineRecord).get(pipeline_key(pipeline_id))
    assert stored is not None
    assert stored.value.status == "succeeded", "a refused model is no failed pipeline"


async def test_a_pipeline_without_a_gate_is_not_judged(
    state: State, replicas: list[Replica]
) -> None:
    # A model that would fail any gate still goes live where the pipeline asks for none: here
    # it is missing from storage, so the rollout fails for that reason, not for a gate.
    serve = replicas[0]
    pipeline_id = await pipeline(state, None)
    await serve.deployer.on_trained(trained(pipeline_id, "missing", accuracy=0.1))
    stage = await deploy_stage(state, pipeline_id)
    assert stage.status == "failed"
    assert stage.reason is not None
    assert stage.reason.startswith("no model digits version missing on storage")
    assert "gate" not in stage.detail
    assert serve.refusals() == 0
