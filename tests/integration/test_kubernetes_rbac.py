"""The Roles in k8s/base grant exactly what the backends use: every verb each backend sends
to the API (recorded by the emulator while it schedules, describes, waits, cancels, adopts,
rolls out, rolls back and undeploys) is granted, and nothing granted goes unused."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import yaml

from tests.integration.test_kubernetes_serving import available, deployment_changed, work
from tests.integration.test_kubernetes_training import gpu_job
from tests.kube.emulator import running_emulator
from torchrelay.shared.cluster import NotReady, Status
from torchrelay.shared.cluster.kubernetes.api import connect
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.kubernetes.serving import KubernetesServingBackend
from torchrelay.shared.cluster.kubernetes.training import KubernetesBackend

RBAC = Path(__file__).parents[2] / "k8s" / "base" / "rbac.yaml"


def granted(role: str) -> set[tuple[str, str]]:
    (found,) = [
        doc for doc in yaml.safe_load_all(RBAC.read_text())
        if doc["kind"] == "Role" and doc["metadata"]["name"] == role
    ]  # fmt: skip
    return {
        (verb, resource)
        for rule in found["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


async def test_train_uses_exactly_the_verbs_its_role_grants() -> None:
    async with running_emulator() as emulator:
        options = KubeOptions(api_url=emulator.url)
        backend = KubernetesBackend(await connect(options), options)
        hasty = KubeOptions(api_url=emulator.url, pending_timeout_s=0.1)
        impatient = KubernetesBackend(await connect(hasty), hasty)
        try:
            failing = await backend.schedule(backend.dryrun(gpu_job(world_size=1)))
            waiting = asyncio.create_task(backend.wait(failing))
            (pod,) = emulator.start_job_pods(failing)
            await asyncio.sleep(0.3)  # the watches are open
            emulator.set_status("pods", pod, {"phase": "Failed"})
            await asyncio.wait_for(waiting, 10)  # its log tail read, then deleted
            pending = await impatient.schedule(impatient.dryrun(gpu_job(attempt=2)))
            await asyncio.wait_for(impatient.wait(pending), 15)  # no pod starts: events read
            cancelled = await backend.schedule(backend.dryrun(gpu_job(attempt=1)))
            assert await backend.describe(cancelled) is not None
            assert await backend.adopt(backend.dryrun(gpu_job(attempt=1))) == cancelled
            await backend.cancel(cancelled)
        finally:
            await backend.aclose()
            await impatient.aclose()
        assert emulator.verbs == granted("torchrelay-train")


async def test_serve_uses_exactly_the_verbs_its_role_grants(tmp_path: Path) -> None:
    async with running_emulator() as emulator:
        options = KubeOptions(api_url=emulator.url)
        backend = KubernetesServingBackend(
            await connect(options), options, storage_root=str(tmp_path), ready_timeout_s=1.0
        )
        try:
            v1 = await backend.schedule(backend.dryrun(work("v1", replicas=1)))
            ready = asyncio.create_task(backend.ready(v1))
            await deployment_changed(emulator, 1)
            available(emulator, 1, 1)
            await asyncio.wait_for(ready, 5)
            await backend.promote(v1)
            assert await backend.describe(v1) is not None
            assert await backend.adopt(backend.dryrun(work("v1", replicas=1))) == v1
            waiting = asyncio.create_task(backend.wait(v1))
            v2 = await backend.schedule(backend.dryrun(work("v2", replicas=1, replacing=v1)))
            assert (await asyncio.wait_for(waiting, 5)).status is Status.CANCELLED
            with contextlib.suppress(NotReady):  # v2 never gets ready: rolled back
                await backend.ready(v2)
            emulator.remove("deployments", "model-digits")
            first = await backend.schedule(backend.dryrun(work("v1", replicas=1)))
            with contextlib.suppress(NotReady):  # a first version never ready: deleted
                await backend.ready(first)
            await backend.undeploy("digits", first)  # the Deployment and the Service go
        finally:
            await backend.aclose()
        assert emulator.verbs == granted("torchrelay-serve")
