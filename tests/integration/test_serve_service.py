"""The serve service as a real process: gated rollouts onto a stable endpoint, rollback."""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import stat
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests.integration.models import train_digits
from tests.integration.processes import ServiceProcess, serve_service
from tests.integration.watching import Watcher, watching
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.events import (
    ModelDeployed,
    ModelDeployRequested,
    ModelRollbackRequested,
    ModelRolloutFailed,
    ModelRolloutStarted,
    TrainCompleted,
)
from torchrelay.shared.events.data import (
    ModelDeployRequestedData,
    ModelRollbackRequestedData,
    PipelineSpec,
    TrainCompletedData,
)
from torchrelay.shared.pipelines import FINISHED, PipelineRecord, StageStatus, pipeline_key
from torchrelay.shared.state import KvState, Store
from torchrelay.shared.testing import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
GATED = {"good": 0.9525, "worse": 0.9475}


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("storage")

    async def prepare() -> None:
        await train_digits(root, "first", epochs=2, seed=1)
        await train_digits(root, "second", epochs=2, seed=2)

    asyncio.run(prepare())
    models = root / "models" / "digits"
    shutil.copytree(models / "first", models / "broken")
    (models / "broken" / "model.pt").write_bytes(b"not a model")
    shutil.copytree(models / "first", models / "liar")
    description = json.loads((models / "liar" / "model.json").read_text())
    description["outputs"][0]["shape"] = [-1, 5]
    description.pop("labels", None)  # it lies about its outputs only, consistently
    description["version"] = "liar"
    (models / "liar" / "model.json").write_text(json.dumps(description))
    for version, accuracy in GATED.items():  # the first model, reporting chosen accuracies
        shutil.copytree(models / "first", models / version)
        description = json.loads((models / version / "model.json").read_text())
        description.update(version=version, metrics={"accuracy": accuracy})
        (models / version / "model.json").write_text(json.dumps(description))
    return root


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    kinds = [ModelRolloutStarted, ModelDeployed, ModelRolloutFailed]
    async with watching(nats_url, "test-serve-watch", kinds) as pair:
        yield pair


@pytest.fixture
def serve(nats_url: str, storage: Path, tmp_path: Path) -> Iterator[ServiceProcess]:
    process = serve_service(nats_url, storage, tmp_path / "serve.log", drain_s=3)
    yield process
    process.stop()
    assert model_servers(storage) == [], "stopping serve stops its model servers"
    assert admin_sockets(storage) == set(), "and no admin socket is left behind"


def model_servers(storage: Path) -> list[int]:
    """Live model server processes serving from this storage (read from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "torchrelay.services.serve.server" in command and str(storage) in command:
                found.append(int(proc.name))
    return found


def admin_sockets(storage: Path) -> set[Path]:
    """The model servers' admin sockets (control only: serve-on, retire)."""
    return set((storage / "serving" / "_admin").glob("*.sock"))


def deploy(version: str, replicas: int = 1) -> ModelDeployRequested:
    return ModelDeployRequested(
        source="/tests",
        data=ModelDeployRequestedData(model_name="digits", version=version, replicas=replicas),
    )


def infer_body() -> dict[str, object]:
    data = np.zeros((1, 1, 8, 8), dtype=np.float32).ravel().tolist()
    return {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}]}


async def deployed(watcher: Watcher, version: str, count: int = 1) -> str:
    await assert_eventually(
        lambda: len(watcher.of(ModelDeployed, version=version)) >= count, timeout_s=90
    )
    return str(watcher.of(ModelDeployed, version=version)[-1].data.endpoint)


async def served_version(endpoint: str) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{endpoint}/infer", json=infer_body()) as r,
    ):
        assert r.status == 200, await r.text()
        return str((await r.json())["model_version"])


async def test_a_rollout_under_steady_load_loses_no_request(
    bus: tuple[JetStreamBus, Watcher], serve: ServiceProcess
) -> None:
    publisher, watcher = bus
    await serve.wait_ready()
    await publisher.publish(deploy("first"))
    endpoint = await deployed(watcher, "first")
    assert endpoint.endswith("/v2/models/digits")
    assert await served_version(endpoint) == "first"

    outcomes: collections.Counter[str] = collections.Counter()
    versions: list[str] = []
    stop = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as http:
            while not stop.is_set():
                try:
                    async with http.post(f"{endpoint}/infer", json=infer_body()) as r:
                        answer = await r.json()
                        outcomes[str(r.status)] += 1
                        if r.status == 200:
                            versions.append(answer["model_version"])
                except aiohttp.ClientError as exc:
                    outcomes[type(exc).__name__] += 1

    clients = [asyncio.create_task(client()) for _ in range(4)]
    await asyncio.sleep(0.5)
    await publisher.publish(deploy("second"))
    await deployed(watcher, "second")
    await asyncio.sleep(4.0)  # past the old version's drain
    stop.set()
    await asyncio.gather(*clients)
    assert set(outcomes) == {"200"}, f"errors during the rollout: {outcomes}"
    assert versions[0] == "first"
    assert versions[-1] == "second"
    switch = versions.index("second")
    assert set(versions[switch + 50 :]) <= {"second"}, "once switched, traffic stays on the new one"
    assert outcomes["200"] > 100


@pytest.mark.parametrize(
    ("bad", "reason"),
    [("broken", "did not start"), ("liar", "smoke output has shape"), ("missing", "no model")],
)
async def test_a_version_that_fails_never_takes_traffic(
    bus: tuple[JetStreamBus, Watcher], serve: ServiceProcess, bad: str, reason: str
) -> None:
    publisher, watcher = bus
    await serve.wait_ready()
    await publisher.publish(deploy("first"))
    endpoint = await deployed(watcher, "first")
    await publisher.publish(deploy(bad))
    await assert_eventually(lambda: watcher.of(ModelRolloutFailed, version=bad), timeout_s=90)
    failed = watcher.of(ModelRolloutFailed, version=bad)[0].data
    assert reason in failed.reason
    assert failed.serving_version == "first"
    for _ in range(20):
        assert await served_version(endpoint) == "first"


async def test_rollback_restores_the_previous_version(
    bus: tuple[JetStreamBus, Watcher], serve: ServiceProcess
) -> None:
    publisher, watcher = bus
    await serve.wait_ready()
    await publisher.publish(deploy("first"))
    await deployed(watcher, "first")
    await publisher.publish(deploy("second"))
    endpoint = await deployed(watcher, "second")
    await publisher.publish(
        ModelRollbackRequested(
            source="/tests", data=ModelRollbackRequestedData(model_name="digits")
        )
    )
    await deployed(watcher, "first", count=2)
    await assert_eventually(lambda: _is_version(endpoint, "first"), timeout_s=10)


async def test_the_service_port_routes_to_every_deployed_model(
    bus: tuple[JetStreamBus, Watcher], serve: ServiceProcess
) -> None:
    publisher, watcher = bus
    port = await serve.wait_ready()
    routed = f"http://127.0.0.1:{port}/v2/models/digits"
    async with aiohttp.ClientSession() as http, http.get(routed) as response:
        assert response.status == 404, "not deployed yet"
    await publisher.publish(deploy("first"))
    await deployed(watcher, "first")
    assert await served_version(routed) == "first"
    await publisher.publish(deploy("second"))
    await deployed(watcher, "second")
    await assert_eventually(lambda: _is_version(routed, "second"), timeout_s=10)
    async with aiohttp.ClientSession() as http, http.get(routed) as response:
        assert (await response.json())["versions"] == ["second"]


async def _is_version(endpoint: str, version: str) -> bool:
    return all([await served_version(endpoint) == version for _ in range(10)])


async def test_control_goes_through_admin_sockets_and_never_through_the_endpoint(
    bus: tuple[JetStreamBus, Watcher], serve: ServiceProcess, storage: Path
) -> None:
    publisher, watcher = bus
    await serve.wait_ready()
    await publisher.publish(deploy("first", replicas=2))
    endpoint = await deployed(watcher, "first")
    first = admin_sockets(storage)
    assert len(first) == 2, "one admin socket per server process"
    assert {stat.S_IMODE(path.stat().st_mode) for path in first} == {0o600}
    async with aiohttp.ClientSession() as http:
        for action in ("retire", "serve-on"):
            url = f"{endpoint.removesuffix('/v2/models/digits')}/admin/{action}"
            async with http.post(url, params={"port": "1"}) as response:
                assert response.status == 404, f"{url} answered {response.status}"
    for _ in range(10):
        assert await served_version(endpoint) == "first"

    await publisher.publish(deploy("second", replicas=2))
    await deployed(watcher, "second")
    # The same model retrained: swapped in place over the same sockets, by the same servers.
    assert admin_sockets(storage) == first
    assert await served_version(endpoint) == "second"

    await publisher.publish(deploy("liar", replicas=2))  # another signature: a full rollout
    await assert_eventually(lambda: watcher.of(ModelRolloutFailed, version="liar"), timeout_s=90)
    assert admin_sockets(storage) == first, "its servers were stopped, the serving ones stay"


async def test_a_pipeline_model_worse_than_the_serving_one_is_refused_by_its_gate(
    bus: tuple[JetStreamBus, Watcher], serve: ServiceProcess
) -> None:
    publisher, watcher = bus
    port = await serve.wait_ready()
    pipelines = (await KvState.open(publisher.nc.jetstream())).store("pipelines", PipelineRecord)
    gate = {"metric": "accuracy", "min": 0.9, "better_than_serving": True}

    await publisher.publish(trained(await gated_pipeline(pipelines, "p-good", gate), "good"))
    endpoint = await deployed(watcher, "good")
    assert (await deploy_ended(pipelines, "p-good")).status == "succeeded"

    await publisher.publish(trained(await gated_pipeline(pipelines, "p-worse", gate), "worse"))
    stage = await deploy_ended(pipelines, "p-worse")
    assert stage.status == "skipped"
    assert stage.reason == "accuracy 0.9475 is not better than 0.9525 of the serving version good"
    assert (stage.detail["candidate_value"], stage.detail["serving_value"]) == (0.9475, 0.9525)
    assert watcher.of(ModelRolloutStarted, version="worse") == []
    assert watcher.of(ModelDeployed, version="worse") == []
    assert await served_version(endpoint) == "good"
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        exported = await response.text()
    assert 'torchrelay_serve_gate_refusals_total{model="digits"} 1.0' in exported


async def gated_pipeline(
    pipelines: Store[PipelineRecord], pipeline_id: str, gate: dict[str, object]
) -> str:
    """A pipeline whose model is trained, deploying through ``gate``."""
    spec = PipelineSpec.model_validate(
        {
            "name": pipeline_id,
            "dataset": {"name": "digits", "source": "sklearn:digits"},
            "training": {"entrypoint": "m:f", "model_name": "digits"},
            "deploy": {"replicas": 1, "gate": gate},
        }
    )
    now = datetime.now(UTC)
    done = StageStatus(status="succeeded", started=now, ended=now)
    stages = {"ingest": done, "train": done, "deploy": StageStatus()}
    record = PipelineRecord(pipeline_id=pipeline_id, spec=spec, submitted=now, stages=stages)
    await pipelines.create(pipeline_key(pipeline_id), record)
    return pipeline_id


def trained(pipeline_id: str, version: str) -> TrainCompleted:
    return TrainCompleted(
        source="/tests",
        pipelineid=pipeline_id,
        data=TrainCompletedData(
            run_id=f"run-{version}",
            model_name="digits",
            model_version=version,
            path=f"models/digits/{version}",
            metrics={"accuracy": GATED[version]},
        ),
    )


async def deploy_ended(pipelines: Store[PipelineRecord], pipeline_id: str) -> StageStatus:
    async def ended() -> bool:
        item = await pipelines.get(pipeline_key(pipeline_id))
        return item is not None and item.value.stages["deploy"].status in FINISHED

    await assert_eventually(ended, timeout_s=90, message=f"{pipeline_id}'s deploy never ended")
    item = await pipelines.get(pipeline_key(pipeline_id))
    assert item is not None
    return item.value.stages["deploy"]
