"""The serve service with its Kubernetes backend: a real service process, a real nats-server
and the API emulator over HTTP. The same events as with local model servers come out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.integration.processes import ServiceProcess
from tests.integration.test_kubernetes_serving import NAME, available, deployment_changed
from tests.integration.watching import Watcher, watching
from tests.kube.emulator import KubeEmulator, running_emulator
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.events import ModelDeployed, ModelDeployRequested, ModelRolloutFailed
from torchrelay.shared.events.data import ModelDeployRequestedData

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
async def emulator() -> AsyncIterator[KubeEmulator]:
    async with running_emulator() as running:
        yield running


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    async with watching(nats_url, "test-k8s-serve", [ModelDeployed, ModelRolloutFailed]) as pair:
        yield pair


@pytest.fixture
def serve(nats_url: str, emulator: KubeEmulator, tmp_path: Path) -> Iterator[ServiceProcess]:
    for version in ("v1", "v2"):
        folder = tmp_path / "storage" / "models" / "digits" / version
        folder.mkdir(parents=True)
        (folder / "model.json").write_text(json.dumps({"version": version}))
    process = ServiceProcess(
        ["-m", "torchrelay", "service", "serve", "--nats-url", nats_url, "--http-port", "0"],
        tmp_path / "serve.log",
        env={
            "TORCHRELAY_STORAGE_ROOT": str(tmp_path / "storage"),
            "TORCHRELAY_SERVE_BACKEND": "kubernetes",
            "TORCHRELAY_SERVE_READY_TIMEOUT_S": "3",
            "TORCHRELAY_KUBE_API_URL": emulator.url,
            "TORCHRELAY_SHUTDOWN_GRACE_S": "2",
            "TORCHRELAY_SHUTDOWN_DEADLINE_S": "5",
        },
    )
    yield process
    process.stop()


def deploy(version: str) -> ModelDeployRequested:
    return ModelDeployRequested(
        source="/tests",
        subject="digits",
        data=ModelDeployRequestedData(model_name="digits", version=version, replicas=2),
    )


async def test_a_deployment_is_deployed_once_available_and_a_broken_version_is_rolled_back(
    bus: tuple[JetStreamBus, Watcher], serve: ServiceProcess, emulator: KubeEmulator
) -> None:
    publisher, watcher = bus
    await serve.wait_ready()
    await publisher.publish(deploy("v1"))
    await deployment_changed(emulator, 1)
    available(emulator, 1, 2)

    event = await watcher.one(ModelDeployed, version="v1", timeout_s=20)
    assert event.data.endpoint == "http://model-digits.torchrelay.svc:8080/v2/models/digits"

    await publisher.publish(deploy("v2"))  # its pods never become available

    failure = await watcher.one(ModelRolloutFailed, version="v2", timeout_s=30)
    assert failure.data.reason.startswith("version v2 was not available within 3s")
    assert failure.data.serving_version == "v1"
    current = emulator.get("deployments", NAME)
    assert current is not None
    args = current["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[1].endswith("/models/digits/v1"), "rolled back"
