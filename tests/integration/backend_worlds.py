"""The worlds around the backends, for the backend contract suite.

A backend observes: it starts work, then reads what became of it. Each world here makes that
happen for one backend, so that the same contract tests run against all of them:

- local training: real worker processes running :func:`tests.integration.gated_trainers.gated`,
  which the world tells to finish or to fail a rank (through the run's gate file);
- Kubernetes training: the API emulator, where the world plays the Job controller and the
  kubelet (pods Running, Succeeded, Failed);
- local serving: real model servers on a real (untrained) digits model;
- Kubernetes serving: the API emulator, where a small Deployment controller makes each new
  template's pods (podIP 127.0.0.1, Ready) and marks the rollout done, or, for the version
  :data:`BROKEN`, leaves one pod in CrashLoopBackOff. A real model server listens on the
  options' ``server_port``, so the URLs ``ready`` returns answer inference.

Every backend a world hands out is closed with the world.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol, cast

import aiohttp

from tests.integration.gated_trainers import GATE, run_folder, started_file
from tests.integration.training import workers_of
from tests.kube.emulator import KubeEmulator
from torchrelay.shared.cluster import ModelVersion, ServingBackend, TrainingBackend, WorkerJob
from torchrelay.shared.cluster.kubernetes.api import connect
from torchrelay.shared.cluster.kubernetes.manifests import (
    VERSION_LABEL,
    job_name,
    model_endpoint,
    model_object_name,
    version_label,
)
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.kubernetes.outcome import rollout_state
from torchrelay.shared.cluster.kubernetes.serving import KubernetesServingBackend
from torchrelay.shared.cluster.kubernetes.training import KubernetesBackend
from torchrelay.shared.cluster.local import LocalBackend
from torchrelay.shared.cluster.local_serving import LocalServingBackend
from torchrelay.shared.cluster.registry import ServerOptions
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec
from torchrelay.shared.testing import assert_eventually

NAMESPACE = "torchrelay"
MODEL = "digits"
BROKEN = "broken"
"""The version that never gets ready: locally its weights do not load; on Kubernetes its pod
crash-loops."""
GATED = "tests.integration.gated_trainers:gated"
KUBE_READY_TIMEOUT_S = 2.0
"""Short: a version that never gets ready waits this long in ``ready``."""
Object = dict[str, Any]


def unique(prefix: str) -> str:
    """Run ids unique across test sessions sharing this machine (workers are found by run id)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def infer_body() -> Object:
    tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
    return {"inputs": [tensor]}


async def infer(url: str) -> Object:
    """One inference at ``url`` (a model's ``.../infer``); the answer, or AssertionError."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(url, json=infer_body()) as response,
    ):
        answer: Object = await response.json(content_type=None)
        assert response.status == 200, f"{url} answered {response.status}: {answer}"
    assert answer["outputs"][0]["shape"] == [1, 10], answer
    return answer


async def refuses(url: str) -> bool:
    """Whether nothing listens at ``url`` any more."""
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/v2/health/live"):
            return False
    except aiohttp.ClientConnectionError:
        return True


class _Replicas:
    """The backends a world handed out (each one a replica of a service); closed with it."""

    def __init__(self) -> None:
        self._backends: list[TrainingBackend | ServingBackend[Any]] = []

    async def aclose(self) -> None:
        for backend in reversed(self._backends):
            await backend.aclose()


# --- training ------------------------------------------------------------------------------


class TrainingWorld(Protocol):
    name: str
    outlives_replica: bool
    """Whether work survives the backend instance (the replica) that scheduled it."""

    async def backend(self) -> TrainingBackend:
        """A new backend instance, as a service replica (or a restarted one) has."""
        ...

    def job(self, run_id: str, *, world_size: int = 2) -> WorkerJob: ...

    async def start(self, job: WorkerJob) -> None:
        """Until every rank of ``job`` runs."""
        ...

    async def complete(self, job: WorkerJob) -> None:
        """Every rank finishes well."""
        ...

    async def fail(self, job: WorkerJob, rank: int) -> None:
        """``rank`` fails with exit code 1; the others go on until they are stopped."""
        ...

    def leftovers(self, job: WorkerJob) -> list[str]:
        """What of ``job`` still exists (processes, cluster objects)."""
        ...

    def footprint(self) -> object:
        """Everything a backend could have touched (files, API requests), to compare."""
        ...

    async def aclose(self) -> None: ...


def _job(run_id: str, world_size: int, storage_root: str) -> WorkerJob:
    return WorkerJob(
        run_id=run_id,
        attempt=0,
        job=TrainJobSpec(
            dataset=DatasetRef(name="digits", version="v1"),
            entrypoint=GATED,
            world_size=world_size,
            model_name="tiny",
        ),
        dataset_path="datasets/digits/v1",
        storage_root=storage_root,
    )


def _files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


class LocalTraining(_Replicas):
    """Real worker processes; the gate file in the run's folder tells them what to do."""

    name = "local"
    outlives_replica = False

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    async def backend(self) -> TrainingBackend:
        backend = LocalBackend(max_world_size=4)
        self._backends.append(backend)
        return backend

    def job(self, run_id: str, *, world_size: int = 2) -> WorkerJob:
        return _job(unique(run_id), world_size, str(self.root))

    async def start(self, job: WorkerJob) -> None:
        ranks = range(job.job.world_size)
        await assert_eventually(
            lambda: all(started_file(self.root, job.run_id, r).exists() for r in ranks),
            timeout_s=60,
            interval_s=0.05,
            message=lambda: self._logs(job),
        )

    async def complete(self, job: WorkerJob) -> None:
        await asyncio.to_thread(self._gate, job, "go")

    async def fail(self, job: WorkerJob, rank: int) -> None:
        await asyncio.to_thread(self._gate, job, f"fail:{rank}")

    def leftovers(self, job: WorkerJob) -> list[str]:
        return [f"worker process {pid}" for pid in workers_of(job.run_id)]

    def footprint(self) -> object:
        return _files(self.root)

    def _gate(self, job: WorkerJob, order: str) -> None:
        """Written whole, then renamed: a rank never reads half an order."""
        folder = run_folder(self.root, job.run_id)
        partial = folder / f".{GATE}.partial"
        partial.write_text(order)
        partial.rename(folder / GATE)

    def _logs(self, job: WorkerJob) -> str:
        logs = run_folder(self.root, job.run_id) / "logs"
        texts = [f"{p.name}: {p.read_text()[-1500:]}" for p in sorted(logs.rglob("*.log"))]
        return "the ranks did not all start; " + (" | ".join(texts) or "no logs")


class KubeTraining(_Replicas):
    """The API emulator; the world plays the Job controller and the kubelet."""

    name = "kubernetes"
    outlives_replica = True

    def __init__(self, emulator: KubeEmulator) -> None:
        super().__init__()
        self.emulator = emulator
        self.options = KubeOptions(api_url=emulator.url, namespace=NAMESPACE)
        self._pods: dict[str, list[str]] = {}

    async def backend(self) -> TrainingBackend:
        backend = KubernetesBackend(await connect(self.options), self.options)
        self._backends.append(backend)
        return backend

    def job(self, run_id: str, *, world_size: int = 2) -> WorkerJob:
        return _job(unique(run_id), world_size, "/storage")

    async def start(self, job: WorkerJob) -> None:
        name = job_name(job.run_id, job.attempt)
        # The emulator's method named ``list`` confuses mypy about its own ``list[str]``.
        pods: list[str] = cast("list[str]", self.emulator.start_job_pods(name))
        self._pods[name] = pods
        for pod in pods:
            self.emulator.set_status(
                "pods", pod, {"phase": "Running", "containerStatuses": [_container("running")]}
            )
        self.emulator.set_status("jobs", name, {"active": len(pods), "ready": len(pods)})

    async def complete(self, job: WorkerJob) -> None:
        name = job_name(job.run_id, job.attempt)
        for pod in self._pods[name]:
            self.emulator.set_status(
                "pods",
                pod,
                {"phase": "Succeeded", "containerStatuses": [_container("terminated", 0)]},
            )
        self.emulator.set_status(
            "jobs",
            name,
            {
                "succeeded": len(self._pods[name]),
                "conditions": [{"type": "Complete", "status": "True"}],
            },
        )

    async def fail(self, job: WorkerJob, rank: int) -> None:
        pod = self._pods[job_name(job.run_id, job.attempt)][rank]
        self.emulator.set_status(
            "pods", pod, {"phase": "Failed", "containerStatuses": [_container("terminated", 1)]}
        )

    def leftovers(self, job: WorkerJob) -> list[str]:
        name = job_name(job.run_id, job.attempt)
        return [
            f"{plural}/{obj['metadata']['name']}"
            for plural in ("jobs", "pods", "services")
            for obj in self.emulator.list(plural)
            if obj["metadata"]["name"].startswith(name)
        ]

    def footprint(self) -> object:
        return len(self.emulator.requests), sorted(self.emulator.objects)


def _container(state: str, code: int = 0) -> Object:
    if state == "running":
        return {"name": "worker", "ready": True, "state": {"running": {}}}
    reason = "Completed" if code == 0 else "Error"
    return {"name": "worker", "state": {"terminated": {"exitCode": code, "reason": reason}}}


# --- serving -------------------------------------------------------------------------------


class ServingWorld(Protocol):
    name: str
    outlives_replica: bool
    not_ready_because: str
    """What the reason of :data:`BROKEN`'s ``NotReady`` names."""

    async def backend(self) -> ServingBackend[Any]: ...

    async def serves(self, endpoint: str, version: str) -> None:
        """Until the model's stable ``endpoint`` serves ``version`` (AssertionError if not)."""
        ...

    async def retired(self, version: str, urls: list[str]) -> None:
        """Until the servers of ``version`` (that answered at ``urls``) are gone."""
        ...

    async def unserved(self, endpoint: str) -> None:
        """Until nothing of the model is left at its stable ``endpoint`` (it was undeployed)."""
        ...

    def footprint(self) -> object: ...

    async def aclose(self) -> None: ...


def version(name: str, *, replicas: int = 1, replacing: str | None = None) -> ModelVersion:
    return ModelVersion(model=MODEL, version=name, replicas=replicas, replacing=replacing)


class LocalServing(_Replicas):
    """Real model servers on this machine, over the models in ``root``."""

    name = "local"
    outlives_replica = False
    not_ready_because = "cannot load the model"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    async def backend(self) -> ServingBackend[Any]:
        backend = LocalServingBackend(
            self.root, options=ServerOptions(drain_s=1.0), ready_timeout_s=60.0
        )
        self._backends.append(backend)
        return backend

    async def serves(self, endpoint: str, version: str) -> None:
        """Real inference on the endpoint, until the version answering is ``version`` (a
        retired one may still finish what it had)."""
        seen: list[str] = []

        async def answered_by_it() -> bool:
            try:
                answer = await infer(f"{endpoint}/infer")
            except (aiohttp.ClientError, TimeoutError, AssertionError) as exc:
                seen.append(repr(exc))
                return False
            served = str(answer["model_version"])
            seen.append(served)
            return served == version

        await assert_eventually(
            answered_by_it, timeout_s=30, interval_s=0.1, message=lambda: f"answers: {seen[-3:]}"
        )

    async def retired(self, version: str, urls: list[str]) -> None:
        async def all_refuse() -> bool:
            return all([await refuses(url) for url in urls])

        await assert_eventually(all_refuse, timeout_s=30, interval_s=0.1)

    async def unserved(self, endpoint: str) -> None:
        """Nothing listens on the model's port any more."""
        base = endpoint.split("/v2/", 1)[0]
        await assert_eventually(lambda: refuses(base), timeout_s=30, interval_s=0.1)

    def footprint(self) -> object:
        return _files(self.root)


class KubeServing(_Replicas):
    """The API emulator with a Deployment controller; a real model server at
    ``127.0.0.1:<server_port>`` answers for every pod."""

    name = "kubernetes"
    outlives_replica = True
    not_ready_because = "CrashLoopBackOff"

    def __init__(self, emulator: KubeEmulator, storage_root: Path, server_port: int) -> None:
        super().__init__()
        self.emulator = emulator
        self.storage_root = storage_root
        self.options = KubeOptions(
            api_url=emulator.url, namespace=NAMESPACE, server_port=server_port
        )
        self._controller: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KubeServing:
        self._controller = asyncio.create_task(self._control(), name="test:deployment-controller")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
        if self._controller is not None:
            self._controller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._controller

    async def backend(self) -> ServingBackend[Any]:
        backend = KubernetesServingBackend(
            await connect(self.options),
            self.options,
            storage_root=str(self.storage_root),
            ready_timeout_s=KUBE_READY_TIMEOUT_S,
        )
        self._backends.append(backend)
        return backend

    async def serves(self, endpoint: str, version: str) -> None:
        """The endpoint is the model's Service, and its Deployment runs ``version``, rolled
        out."""
        name = model_object_name(MODEL)
        assert endpoint == model_endpoint(MODEL, self.options)
        service = self.emulator.get("services", name)
        assert service is not None, f"no Service {name}"

        def rolled_out() -> bool:
            deployment = self.emulator.get("deployments", name)
            return (
                deployment is not None
                and _template_version(deployment) == version_label(version)
                and rollout_state(deployment)[0] == "done"
                and service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
            )

        await assert_eventually(rolled_out, timeout_s=10)

    async def retired(self, version: str, urls: list[str]) -> None:
        """No pod of the version is left (the URLs are the one real server's: they stay)."""
        gone = version_label(version)
        await assert_eventually(
            lambda: not [p for p in self.emulator.list("pods") if _pod_version(p) == gone],
            timeout_s=10,
        )

    async def unserved(self, endpoint: str) -> None:
        """The model's Deployment and Service are deleted, and its pods with them."""
        assert endpoint == model_endpoint(MODEL, self.options)
        name = model_object_name(MODEL)
        await assert_eventually(
            lambda: (
                self.emulator.get("deployments", name) is None
                and self.emulator.get("services", name) is None
                and not [
                    p for p in self.emulator.list("pods") if p["metadata"]["name"].startswith(name)
                ]
            ),
            timeout_s=10,
        )

    def footprint(self) -> object:
        return len(self.emulator.requests), sorted(self.emulator.objects)

    async def _control(self) -> None:
        while True:
            for deployment in self.emulator.list("deployments"):
                self._reconcile(deployment)
            await asyncio.sleep(0.02)

    def _reconcile(self, deployment: Object) -> None:
        """The Deployment controller and the kubelet, for one Deployment's latest template."""
        generation = deployment["metadata"]["generation"]
        if (deployment.get("status") or {}).get("observedGeneration") == generation:
            return
        name = deployment["metadata"]["name"]
        template = deployment["spec"]["template"]
        wanted = int(deployment["spec"]["replicas"])
        new = template["metadata"]["labels"][VERSION_LABEL]
        owned = [
            p for p in self.emulator.list("pods") if _owner(p) == deployment["metadata"]["uid"]
        ]
        old = [p for p in owned if _pod_version(p) != new]
        if new == version_label(BROKEN):
            self._pod(deployment, f"{name}-{new}-0", ready=False)
            status = {
                "observedGeneration": generation,
                "replicas": len(old) + 1,
                "updatedReplicas": 1,
                "availableReplicas": len(old),
                "unavailableReplicas": 1,
            }
        else:
            for index in range(wanted):
                self._pod(deployment, f"{name}-{new}-{index}", ready=True)
            for pod in old:
                self.emulator.remove("pods", pod["metadata"]["name"])
            status = {
                "observedGeneration": generation,
                "replicas": wanted,
                "updatedReplicas": wanted,
                "availableReplicas": wanted,
                "readyReplicas": wanted,
            }
        self.emulator.set_status("deployments", name, status)

    def _pod(self, deployment: Object, name: str, *, ready: bool) -> None:
        if self.emulator.get("pods", name) is not None:
            return
        template = deployment["spec"]["template"]
        if ready:
            container = {"name": "server", "ready": True, "restartCount": 0,
                         "state": {"running": {}}}  # fmt: skip
        else:
            container = {"name": "server", "ready": False, "restartCount": 3,
                         "state": {"waiting": {"reason": "CrashLoopBackOff"}}}  # fmt: skip
        self.emulator.put(
            "pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "labels": dict(template["metadata"]["labels"]),
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": "Deployment",
                            "controller": True,
                            "name": deployment["metadata"]["name"],
                            "uid": deployment["metadata"]["uid"],
                        }
                    ],
                },
                "spec": template["spec"],
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "conditions": [{"type": "Ready", "status": str(ready)}],
                    "containerStatuses": [container],
                },
            },
        )


def _template_version(deployment: Object) -> str | None:
    found: str | None = deployment["spec"]["template"]["metadata"]["labels"].get(VERSION_LABEL)
    return found


def _pod_version(pod: Object) -> str | None:
    found: str | None = (pod["metadata"].get("labels") or {}).get(VERSION_LABEL)
    return found


def _owner(pod: Object) -> str | None:
    for reference in pod["metadata"].get("ownerReferences") or []:
        found: str | None = reference.get("uid")
        return found
    return None


def copy_models(source: Path, root: Path) -> Path:
    """A storage root of its own for one test, holding the models under ``source``."""
    shutil.copytree(source / "models", root / "models")
    return root
