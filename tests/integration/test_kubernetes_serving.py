"""Serving on Kubernetes over real HTTP against the API emulator: a Deployment and a Service per
model, rollouts that succeed only when the new pods are all available, and a rollout whose
pods never get ready, rolled back with the reason. The test plays the Deployment controller."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.kube.emulator import KubeEmulator, running_emulator
from torchrelay.services.serve.kube_rollouts import KubernetesRollouts
from torchrelay.services.serve.rollouts import Current, RolloutFailed
from torchrelay.shared.cluster.kubernetes.api import connect
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.testing import assert_eventually

NAME = "model-digits"


@pytest.fixture
async def emulator() -> AsyncIterator[KubeEmulator]:
    async with running_emulator() as running:
        yield running


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    for version in ("v1", "v2"):
        folder = tmp_path / "models" / "digits" / version
        folder.mkdir(parents=True)
        (folder / "model.json").write_text(json.dumps({"name": "digits", "version": version}))
    return tmp_path


@pytest.fixture
async def rollouts(emulator: KubeEmulator, storage: Path) -> AsyncIterator[KubernetesRollouts]:
    options = KubeOptions(api_url=emulator.url, namespace="torchrelay")
    rollouts = KubernetesRollouts(
        await connect(options),
        options,
        storage_root=str(storage),
        server_args=["--max-batch-size", "64"],
        ready_timeout_s=2.0,
    )
    yield rollouts
    await rollouts.aclose()


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


async def deployed_v1(rollouts: KubernetesRollouts, emulator: KubeEmulator) -> None:
    rolling = asyncio.create_task(rollouts.roll_out("digits", "v1", 2, Current()))
    await deployment_changed(emulator, 1)
    available(emulator, 1, 2)
    await asyncio.wait_for(rolling, 5)


async def test_a_first_rollout_creates_a_deployment_and_the_models_stable_service(
    rollouts: KubernetesRollouts, emulator: KubeEmulator, storage: Path
) -> None:
    rolling = asyncio.create_task(rollouts.roll_out("digits", "v1", 2, Current()))
    deployment = await deployment_changed(emulator, 1)
    await asyncio.sleep(0.2)
    assert not rolling.done(), "not before the pods are available"
    available(emulator, 1, 2)
    served = await asyncio.wait_for(rolling, 5)
    assert served.endpoint == "http://model-digits.torchrelay.svc:8080/v2/models/digits"

    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    template = spec["template"]
    assert template["metadata"]["labels"]["torchrelay.io/version"] == "v1"
    assert template["metadata"]["annotations"]["torchrelay.io/version"] == "v1"
    (container,) = template["spec"]["containers"]
    assert container["args"][:6] == [
        "--model-dir", f"{storage}/models/digits/v1", "--host", "0.0.0.0", "--port", "8080"
    ]  # fmt: skip
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
    rollouts: KubernetesRollouts, emulator: KubeEmulator
) -> None:
    await deployed_v1(rollouts, emulator)
    rolling = asyncio.create_task(rollouts.roll_out("digits", "v2", 2, Current("v1", 2)))
    deployment = await deployment_changed(emulator, 2)
    assert "/models/digits/v2" in args_of(deployment)[1]
    # Half way: one new pod available, one old one still running.
    emulator.set_status(
        "deployments", NAME,
        {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2},
    )  # fmt: skip
    await asyncio.sleep(0.2)
    assert not rolling.done()
    available(emulator, 2, 2)
    await asyncio.wait_for(rolling, 5)


async def test_a_version_whose_pods_never_get_ready_is_rolled_back_and_says_why(
    rollouts: KubernetesRollouts, emulator: KubeEmulator
) -> None:
    await deployed_v1(rollouts, emulator)
    rolling = asyncio.create_task(rollouts.roll_out("digits", "v2", 2, Current("v1", 2)))
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
    with pytest.raises(RolloutFailed) as failed:
        await asyncio.wait_for(rolling, 10)
    reason = str(failed.value)
    assert reason.startswith("version v2 was not available within 2s (1 of 2 replicas updated)")
    assert "pod model-digits-v2-abc is waiting: CrashLoopBackOff" in reason
    back = emulator.get("deployments", NAME)
    assert back is not None
    assert "/models/digits/v1" in args_of(back)[1], "the old template is back"


async def test_a_first_version_that_never_gets_ready_leaves_no_deployment(
    rollouts: KubernetesRollouts, emulator: KubeEmulator
) -> None:
    with pytest.raises(RolloutFailed, match="no pod of it was created"):
        await rollouts.roll_out("digits", "v1", 2, Current())
    assert emulator.get("deployments", NAME) is None


async def test_a_version_missing_from_storage_is_refused_before_any_object(
    rollouts: KubernetesRollouts, emulator: KubeEmulator
) -> None:
    with pytest.raises(RolloutFailed, match="no model digits version v9 on storage"):
        await rollouts.roll_out("digits", "v9", 2, Current())
    assert emulator.list("deployments") == []


async def test_rbac_denial_is_a_failed_rollout_that_says_so(
    rollouts: KubernetesRollouts, emulator: KubeEmulator
) -> None:
    emulator.deny("create", "deployments")
    with pytest.raises(RolloutFailed, match=r"refused to create deployments .*\(HTTP 403\)"):
        await rollouts.roll_out("digits", "v1", 2, Current())
