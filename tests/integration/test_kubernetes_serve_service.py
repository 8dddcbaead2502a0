"""The serve service as a real process with the Kubernetes serving backend, against the API
emulator over HTTP (with a Deployment controller in the test, and a real model server behind
the pods' address): the same events as with local model servers come out, the deployer's
smoke inference runs on the new pods, and an undeploy deletes what the rollout created."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.integration.backend_worlds import BROKEN, MODEL, KubeServing
from tests.integration.models import ModelServer
from tests.integration.processes import ServiceProcess
from tests.integration.test_undeploy import redeliver
from tests.integration.tiny_models import export_broken, export_digits, model_folder
from tests.integration.watching import Watcher, watching
from tests.kube.emulator import KubeEmulator, running_emulator
from torchrelay.services.serve.domain import DeploymentRecord
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.cluster.kubernetes.manifests import model_object_name
from torchrelay.shared.events import (
    ModelDeployed,
    ModelDeployRequested,
    ModelRolloutFailed,
    ModelUndeployed,
    ModelUndeployRequested,
)
from torchrelay.shared.events.data import ModelDeployRequestedData, ModelUndeployRequestedData
from torchrelay.shared.state import KvState, key_part
from torchrelay.shared.testing import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    root = tmp_path / "storage"
    export_digits(root, MODEL, "v1")
    export_digits(root, MODEL, "v2", seed=2)  # its pods' address reaches v1's server: 404
    export_broken(root, MODEL, BROKEN)
    return root


@pytest.fixture
def pods_port(storage: Path, tmp_path: Path) -> Iterator[int]:
    """A real model server of v1: what the emulated pods' address reaches."""
    server = ModelServer(model_folder(storage, MODEL, "v1"), tmp_path / "pods.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
async def cluster(storage: Path, pods_port: int) -> AsyncIterator[KubeEmulator]:
    async with running_emulator() as emulator, KubeServing(emulator, storage, pods_port):
        yield emulator


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    kinds = [ModelDeployed, ModelRolloutFailed, ModelUndeployed]
    async with watching(nats_url, "test-k8s-serve", kinds) as pair:
        yield pair


@pytest.fixture
def serve(
    nats_url: str, cluster: KubeEmulator, storage: Path, pods_port: int, tmp_path: Path
) -> Iterator[ServiceProcess]:
    process = ServiceProcess(
        ["-m", "torchrelay", "service", "serve", "--nats-url", nats_url, "--http-port", "0"],
        tmp_path / "serve.log",
        env={
            "TORCHRELAY_STORAGE_ROOT": str(storage),
            "TORCHRELAY_SERVE_BACKEND": "kubernetes",
            "TORCHRELAY_SERVE_READY_TIMEOUT_S": "3",
            "TORCHRELAY_KUBE_API_URL": cluster.url,
            "TORCHRELAY_KUBE_SERVER_PORT": str(pods_port),
            "TORCHRELAY_SHUTDOWN_GRACE_S": "2",
            "TORCHRELAY_SHUTDOWN_DEADLINE_S": "5",
        },
    )
    yield process
    process.stop()


def deploy(version: str) -> ModelDeployRequested:
    return ModelDeployRequested(
        source="/tests",
        subject=MODEL,
        data=ModelDeployRequestedData(model_name=MODEL, version=version, replicas=2),
    )


async def test_a_deployment_is_deployed_once_available_and_a_broken_version_is_rolled_back(
    bus: tuple[JetStreamBus, Watcher],
    serve: ServiceProcess,
    cluster: KubeEmulator,
    pods_port: int,
) -> None:
    publisher, watcher = bus
    await serve.wait_ready()
    await publisher.publish(deploy("v1"))
    event = await watcher.one(ModelDeployed, version="v1", timeout_s=30)
    assert event.data.endpoint == (
        f"http://model-digits.torchrelay.svc:{pods_port}/v2/models/digits"
    )

    await publisher.publish(deploy(BROKEN))  # its pod never gets ready

    failure = await watcher.one(ModelRolloutFailed, version=BROKEN, timeout_s=30)
    assert failure.data.reason.startswith(f"version {BROKEN} was not available within 3s")
    assert "CrashLoopBackOff" in failure.data.reason
    assert failure.data.serving_version == "v1"
    current = cluster.get("deployments", model_object_name(MODEL))
    assert current is not None
    args = current["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[1].endswith("/models/digits/v1"), "rolled back"


async def test_a_version_whose_pods_fail_the_smoke_inference_is_rolled_back(
    bus: tuple[JetStreamBus, Watcher], serve: ServiceProcess, cluster: KubeEmulator
) -> None:
    publisher, watcher = bus
    await serve.wait_ready()
    await publisher.publish(deploy("v1"))
    await watcher.one(ModelDeployed, version="v1", timeout_s=30)

    # v2's pods get ready, but what answers at their address is v1's server: the smoke
    # inference on /v2/models/digits/versions/v2/infer gets a 404, and v2 must not stay.
    await publisher.publish(deploy("v2"))
    failure = await watcher.one(ModelRolloutFailed, version="v2", timeout_s=30)
    assert failure.data.reason.startswith("the smoke inference answered HTTP 404")
    assert failure.data.serving_version == "v1"
    current = cluster.get("deployments", model_object_name(MODEL))
    assert current is not None
    args = current["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[1].endswith("/models/digits/v1"), "rolled back"


async def test_an_undeploy_deletes_the_models_deployment_and_service_once(
    nats_url: str,
    bus: tuple[JetStreamBus, Watcher],
    serve: ServiceProcess,
    cluster: KubeEmulator,
    pods_port: int,
) -> None:
    publisher, watcher = bus
    await serve.wait_ready()
    await publisher.publish(deploy("v1"))
    await watcher.one(ModelDeployed, version="v1", timeout_s=30)
    name = model_object_name(MODEL)
    assert cluster.get("services", name) is not None

    request = ModelUndeployRequested(
        source="/tests", subject=MODEL, data=ModelUndeployRequestedData(model_name=MODEL)
    )
    await publisher.publish(request)
    fact = await watcher.one(ModelUndeployed, model_name=MODEL, timeout_s=30)
    assert (fact.data.version, fact.data.reason) == ("v1", "undeployed by request")
    assert fact.data.endpoint == f"http://{name}.torchrelay.svc:{pods_port}/v2/models/{MODEL}"
    assert cluster.get("deployments", name) is None
    assert cluster.get("services", name) is None
    deployments = (await KvState.open(publisher.nc.jetstream())).store(
        "deployments", DeploymentRecord
    )
    record = await deployments.get(key_part(MODEL))
    assert record is not None
    assert (record.value.status, record.value.previous_version) == ("undeployed", "v1")

    await redeliver(nats_url, request)
    await publisher.publish(deploy("v1"))  # handled after the redelivery: one at a time
    await assert_eventually(lambda: len(watcher.of(ModelDeployed, version="v1")) == 2)
    assert len(watcher.of(ModelUndeployed)) == 1, "the redelivery changed nothing"
    assert cluster.get("deployments", name) is not None, "and a later deploy creates it anew"
    assert cluster.get("services", name) is not None
