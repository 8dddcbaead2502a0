"""Serving on Kubernetes over real HTTP against the API emulator: a Deployment and a Service per
model, rollouts that are ready only when the new pods are all available, and a rollout whose
pods never get ready, rolled back with the reason. The test plays the Deployment controller.

What every serving backend does (replacing a version, cancel before promote, another replica's
view) is in the backend contract suite, tests/integration/test_backend_contract.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.kube.emulator import KubeEmulator, running_emulator
from torchrelay.shared.cluster import ModelVersion, NotReady, Phase, Status
from torchrelay.shared.cluster.kubernetes.api import connect
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.kubernetes.serving import KubernetesServingBackend
from torchrelay.shared.cluster.registry import ServerOptions
from torchrelay.shared.testing import assert_eventually

NAME = "model-digits"


@pytest.fixture
async def emulator() -> AsyncIterator[KubeEmulator]:
    async with running_emulator() as running:
        yield running


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    """The storage root the pods mount (the backend only names paths under it)."""
    return tmp_path


@pytest.fixture
async def backend(emulator: KubeEmulator, storage: Path) -> AsyncIterator[KubernetesServingBackend]:
    options = KubeOptions(api_url=emulator.url, namespace="torchrelay")
    backend = KubernetesServingBackend(
        await connect(options),
        options,
        storage_root=str(storage),
        server=ServerOptions(max_batch_size=64),
        ready_timeout_s=2.0,
    )
    yield backend
    await backend.aclose()


def work(version: str, replicas: int = 2, replacing: str | None = None) -> ModelVersion:
    return ModelVersion(model="digits", version=version, replicas=replicas, replacing=replacing)


async def deployment_changed(emulator: KubeEmulator, generation: int) -> dict[str, Any]:
    async def there() -> bool:
        found = emulator.get("deployments", NAME)
        return found is not None and found["metadata"]["generation"] == generation

    await assert_eventually(there, timeout_s=5)
    deployment = emulator.get("deployments", NAME)
    assert deployment is not None
    return deployment


def available(emulator: KubeEmulator, generation: int, replicas: int) -> None:
    """The Deployment controller: the new ReplicaSet is fully available, the old one gone."""
    emulator.set_status(
        "deployments",
        NAME,
        {
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "availableReplicas": replicas,
            "readyReplicas": replicas,
        },
    )


def args_of(deployment: dict[str, Any]) -> list[str]:
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def ready_pod(name: str, labels: dict[str, str], ip: str, *, ready: bool = True) -> dict[str, Any]:
    """A pod as the kubelet reports it: running at ``ip``, Ready or not."""
    return {
        "metadata": {"name": name, "labels": labels},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": str(ready)}],
        },
    }


async def deployed_v1(backend: KubernetesServingBackend, emulator: KubeEmulator) -> str:
    handle = await backend.schedule(backend.dryrun(work("v1")))
    ready = asyncio.create_task(backend.ready(handle))
    await deployment_changed(emulator, 1)
    available(emulator, 1, 2)
    await asyncio.wait_for(ready, 5)
    await backend.promote(handle)
    return handle


async def test_a_first_rollout_creates_a_deployment_and_the_models_stable_service(
    backend: KubernetesServingBackend, emulator: KubeEmulator, storage: Path
) -> None:
    handle = await backend.schedule(backend.dryrun(work("v1")))
    deployment = await deployment_changed(emulator, 1)
    ready = asyncio.create_task(backend.ready(handle))
    await asyncio.sleep(0.2)
    assert not ready.done(), "not before the pods are available"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    emulator.put("pods", ready_pod("model-digits-v1-a", labels, "10.0.0.7"))
    emulator.put("pods", ready_pod("model-digits-v1-b", labels, "10.0.0.8"))
    emulator.put("pods", ready_pod("model-digits-v1-c", labels, "10.0.0.9", ready=False))
    available(emulator, 1, 2)
    urls = await asyncio.wait_for(ready, 5)
    assert sorted(urls) == ["http://10.0.0.7:8080", "http://10.0.0.8:8080"], "ready pods only"
    endpoint = await backend.promote(handle)
    assert endpoint == "http://model-digits.torchrelay.svc:8080/v2/models/digits"

    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert spec["progressDeadlineSeconds"] == 2
    template = spec["template"]
    assert template["metadata"]["labels"]["torchrelay.io/version"] == "v1"
    assert template["metadata"]["annotations"]["torchrelay.io/version"] == "v1"
    (container,) = template["spec"]["containers"]
    assert container["args"][:6] == [
        "--model-dir", f"{storage}/models/digits/v1", "--host", "0.0.0.0", "--port", "8080"
    ]  # fmt: skip
    assert container["args"][6:] == ServerOptions(max_batch_size=64).args()
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert {m["name"]: m.get("readOnly") for m in container["volumeMounts"]}["storage"] is True
    service = emulator.get("services", NAME)
    assert service is not None
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    for obj in (deployment, service):
        manifest = {k: v for k, v in obj.items() if k != "status"}
        manifest["metadata"] = {
            k: v for k, v in obj["metadata"].items() if k in ("name", "namespace", "labels")
        }
        kubernetes_validate.validate(manifest, "1.32", strict=True)


async def test_a_new_version_replaces_the_template_and_waits_for_all_new_replicas(
    backend: KubernetesServingBackend, emulator: KubeEmulator
) -> None:
    old = await deployed_v1(backend, emulator)
    new = await backend.schedule(backend.dryrun(work("v2", replacing=old)))
    deployment = await deployment_changed(emulator, 2)
    assert "/models/digits/v2" in args_of(deployment)[1]
    ready = asyncio.create_task(backend.ready(new))
    # Half way: both new pods available, one old one still running.
    emulator.set_status(
        "deployments", NAME,
        {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2},
    )  # fmt: skip
    await asyncio.sleep(0.2)
    assert not ready.done()
    described = await backend.describe(new)
    assert described is not None
    assert (described.phase, described.detail) == (Phase.PENDING, "1 old replicas still running")
    assert await backend.describe(old) is None, "the Deployment no longer runs v1"
    available(emulator, 2, 2)
    await asyncio.wait_for(ready, 5)
    await backend.promote(new)
    described = await backend.describe(new)
    assert described is not None
    assert described.phase is Phase.RUNNING


async def test_a_version_whose_pods_never_get_ready_is_rolled_back_and_says_why(
    backend: KubernetesServingBackend, emulator: KubeEmulator
) -> None:
    old = await deployed_v1(backend, emulator)
    new = await backend.schedule(backend.dryrun(work("v2", replacing=old)))
    deployment = await deployment_changed(emulator, 2)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    emulator.put(
        "pods",
        {
            "metadata": {"name": "model-digits-v2-abc", "labels": labels},
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": "server", "ready": False, "restartCount": 3,
                     "state": {"waiting": {"reason": "CrashLoopBackOff"}}}
                ],
            },
        },
    )  # fmt: skip
    emulator.set_status(
        "deployments", NAME,
        {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1, "availableReplicas": 2},
    )  # fmt: skip
    with pytest.raises(NotReady) as failed:
        await asyncio.wait_for(backend.ready(new), 10)
    reason = str(failed.value)
    assert reason.startswith("version v2 was not available within 2s (1 of 2 replicas updated)")
    assert "pod model-digits-v2-abc is waiting: CrashLoopBackOff" in reason
    back = emulator.get("deployments", NAME)
    assert back is not None
    assert "/models/digits/v1" in args_of(back)[1], "the old template is back"
    assert back["spec"]["replicas"] == 2


async def test_a_first_version_that_never_gets_ready_leaves_no_deployment(
    backend: KubernetesServingBackend, emulator: KubeEmulator
) -> None:
    handle = await backend.schedule(backend.dryrun(work("v1")))
    with pytest.raises(NotReady, match="no pod of it was created"):
        await backend.ready(handle)
    assert emulator.get("deployments", NAME) is None
    assert emulator.get("services", NAME) is not None, "the endpoint stays for the next version"


async def test_a_version_is_adopted_only_while_the_deployment_runs_it(
    backend: KubernetesServingBackend, emulator: KubeEmulator
) -> None:
    assert await backend.adopt(backend.dryrun(work("v1"))) is None, "no Deployment yet"
    handle = await deployed_v1(backend, emulator)
    assert await backend.adopt(backend.dryrun(work("v1", replacing=handle))) == handle
    assert await backend.adopt(backend.dryrun(work("v2", replacing=handle))) is None


async def test_a_wait_ends_when_the_deployment_is_deleted(
    backend: KubernetesServingBackend, emulator: KubeEmulator
) -> None:
    handle = await deployed_v1(backend, emulator)
    waiting = asyncio.create_task(backend.wait(handle))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    emulator.remove("deployments", NAME)  # by hand, as an operator might
    ended = await asyncio.wait_for(waiting, 5)
    assert (ended.status, ended.reason) == (Status.CANCELLED, f"the deployment {NAME} was deleted")


async def test_rbac_denial_is_not_ready_and_says_so(
    backend: KubernetesServingBackend, emulator: KubeEmulator
) -> None:
    emulator.deny("create", "deployments")
    with pytest.raises(NotReady, match=r"refused to create deployments .*\(HTTP 403\)"):
        await backend.schedule(backend.dryrun(work("v1")))
