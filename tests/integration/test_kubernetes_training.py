"""The Kubernetes training backend over real HTTP against a stateful API emulator: the objects
it creates, how it reads pods and Jobs (the test plays kubelet and the Job controller), watches
that drop or expire, repeated creates, and RBAC refusals."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import kubernetes_validate
import pytest

from tests.kube.emulator import KubeEmulator, running_emulator
from torchrelay.shared.cluster.kubernetes.api import Refused, connect
from torchrelay.shared.cluster.kubernetes.manifests import job_name
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.kubernetes.training import KubernetesBackend
from torchrelay.shared.cluster.port import Ended, Status, WorkerJob
from torchrelay.shared.errors import PermanentError
from torchrelay.shared.events.data import TrainJobSpec
from torchrelay.shared.testing import assert_eventually

K8S_VERSION = "1.32"
NS = "torchrelay"


def gpu_job(run_id: str = "pipe-1.train", attempt: int = 0, world_size: int = 4) -> WorkerJob:
    spec = TrainJobSpec.model_validate(
        {
            "entrypoint": "torchrelay.services.train.examples.digits:train",
            "model_name": "digits",
            "world_size": world_size,
            "dataset": {"name": "digits", "version": "v1"},
            "resources": {"cpu": 4, "memory_mb": 16384, "gpu": 1},
            "placement": {
                "node_selector": {"pool": "gpu"},
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ],
            },
        }
    )
    return WorkerJob(
        run_id=run_id,
        attempt=attempt,
        job=spec,
        dataset_path="datasets/digits/v1",
        storage_root="/storage",
        nats_url="nats://nats.torchrelay.svc:4222",
        pipeline_id="pipe-1",
    )


@pytest.fixture
async def emulator() -> AsyncIterator[KubeEmulator]:
    async with running_emulator() as running:
        yield running


@pytest.fixture
async def backend(emulator: KubeEmulator) -> AsyncIterator[KubernetesBackend]:
    options = KubeOptions(
        api_url=emulator.url, namespace=NS, queue="gpu-queue", unschedulable_timeout_s=0.5
    )
    backend = KubernetesBackend(await connect(options), options)
    yield backend
    await backend.aclose()


def container_terminated(code: int, reason: str) -> dict[str, object]:
    return {"name": "worker", "state": {"terminated": {"exitCode": code, "reason": reason}}}


async def test_a_world_size_4_gpu_job_is_an_indexed_job_with_a_headless_service(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    handle = await backend.schedule(backend.dryrun(gpu_job()))
    job = emulator.get("jobs", handle)
    service = emulator.get("services", handle)
    assert job is not None
    assert service is not None
    assert handle == job_name("pipe-1.train", 0)
    assert len(f"{handle}-3") <= 63

    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 0, "restarts are the monitor's, from checkpoints"
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/part-of"] == "torchrelay"
    assert labels["app.kubernetes.io/component"] == "training"
    assert labels["torchrelay.io/attempt"] == "0"
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["annotations"]["torchrelay.io/run-id"] == "pipe-1.train"

    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == handle, "pods resolve as <job>-<index>.<service>"
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "torchrelay.services.train.worker"]
    assert container["resources"]["requests"] == {
        "cpu": "4", "memory": "16384Mi", "nvidia.com/gpu": "1"
    }  # fmt: skip
    assert container["resources"]["limits"] == {"memory": "16384Mi", "nvidia.com/gpu": "1"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["storage"] == "/storage"
    assert mounts["dshm"] == "/dev/shm"  # noqa: S108
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["storage"]["persistentVolumeClaim"] == {"claimName": "torchrelay-storage"}
    env = {e["name"]: e["value"] for e in container["env"]}
    worker = json.loads(env["TORCHRELAY_WORKER"])
    assert worker["backend"] == "nccl", "GPUs requested: nccl"
    assert worker["world_size"] == 4
    assert worker["rendezvous"] == f"tcp://{handle}-0.{handle}.{NS}.svc:29500"
    assert env["OMP_NUM_THREADS"] == "4"

    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {
        "torchrelay.io/run": labels["torchrelay.io/run"], "torchrelay.io/attempt": "0"
    }  # fmt: skip
    (owner,) = service["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Job", handle, job["metadata"]["uid"])

    for obj in (backend.dryrun(gpu_job()).job, service):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


async def test_a_cpu_job_uses_gloo_and_requests_no_gpu(backend: KubernetesBackend) -> None:
    job = gpu_job()
    cpu = job.model_copy(
        update={
            "job": job.job.model_copy(
                update={"resources": job.job.resources.model_copy(update={"gpu": 0})}
            )
        }
    )
    manifest = backend.dryrun(cpu).job
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert json.loads(env["TORCHRELAY_WORKER"])["backend"] == "gloo"


async def test_a_stage_with_its_own_image_runs_its_workers_in_it(
    backend: KubernetesBackend,
) -> None:
    job = gpu_job()
    own = job.model_copy(
        update={
            "job": job.job.model_copy(
                update={
                    "image": "registry.example/team/trainer:1.4",
                    "workspace": "0123456789abcdef",
                }
            )
        }
    )
    default = backend.dryrun(job).job["spec"]["template"]["spec"]["containers"][0]
    container = backend.dryrun(own).job["spec"]["template"]["spec"]["containers"][0]
    assert default["image"] == KubeOptions().worker_image
    assert container["image"] == "registry.example/team/trainer:1.4"
    worker = json.loads({e["name"]: e["value"] for e in container["env"]}["TORCHRELAY_WORKER"])
    assert worker["job"]["workspace"] == "0123456789abcdef"  # imported from the shared storage
    kubernetes_validate.validate(backend.dryrun(own).job, K8S_VERSION, strict=True)


async def test_one_failed_pod_fails_the_attempt_naming_it_and_removes_the_job(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    handle = await backend.schedule(backend.dryrun(gpu_job()))
    waiting = asyncio.create_task(backend.wait(handle))
    pods = emulator.start_job_pods(handle)
    for pod in pods:
        emulator.set_status("pods", pod, {"phase": "Running"})
    await asyncio.sleep(0.2)
    assert not waiting.done()
    emulator.set_status(
        "pods",
        pods[2],
        {"phase": "Failed", "containerStatuses": [container_terminated(137, "OOMKilled")]},
    )
    ended = await asyncio.wait_for(waiting, 10)
    assert ended.status is Status.FAILED
    assert ended.rank == 2
    assert ended.exit_code == 137
    assert ended.signal == "SIGKILL"
    assert f"pod {pods[2]} (rank 2) failed: OOMKilled (exit 137, SIGKILL)" == ended.reason
    assert emulator.get("jobs", handle) is None, "the other ranks are stopped"
    assert emulator.get("services", handle) is None, "owned by the job: collected with it"
    assert emulator.list("pods") == []


async def test_all_pods_succeeded_and_the_job_complete_is_success(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    handle = await backend.schedule(backend.dryrun(gpu_job(world_size=2)))
    waiting = asyncio.create_task(backend.wait(handle))
    for pod in emulator.start_job_pods(handle):
        emulator.set_status("pods", pod, {"phase": "Succeeded"})
    emulator.set_status(
        "jobs", handle, {"succeeded": 2, "conditions": [{"type": "Complete", "status": "True"}]}
    )
    assert await asyncio.wait_for(waiting, 10) == Ended(Status.SUCCEEDED, "every rank finished")


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (
            {"phase": "Pending", "containerStatuses": [{"name": "worker", "state": {"waiting": {
                "reason": "ImagePullBackOff", "message": "pull access denied"}}}]},
            "cannot start: ImagePullBackOff: pull access denied",
        ),
        (
            {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
             "reason": "Unschedulable", "lastTransitionTime": "2026-01-01T00:00:00Z",
             "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]},
            "is Unschedulable for",
        ),
        (
            {"phase": "Failed", "containerStatuses": [container_terminated(1, "Error")]},
            "failed: Error (exit 1)",
        ),
    ],
)  # fmt: skip
async def test_a_pod_that_cannot_run_fails_the_attempt_with_the_reason(
    backend: KubernetesBackend, emulator: KubeEmulator, status: dict[str, object], reason: str
) -> None:
    handle = await backend.schedule(backend.dryrun(gpu_job(world_size=2)))
    waiting = asyncio.create_task(backend.wait(handle))
    pods = emulator.start_job_pods(handle)
    emulator.set_status("pods", pods[1], status)
    ended = await asyncio.wait_for(waiting, 15)
    assert ended.status is Status.FAILED
    assert reason in ended.reason
    assert ended.reason.startswith(f"pod {pods[1]} (rank 1)")


async def test_a_dropped_watch_resumes_and_a_410_relists_without_missing_a_change(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    handle = await backend.schedule(backend.dryrun(gpu_job(world_size=2)))
    waiting = asyncio.create_task(backend.wait(handle))
    pods = emulator.start_job_pods(handle)
    await asyncio.sleep(0.3)
    lists_before = emulator.lists("pods")

    emulator.drop_watches()  # and a change while nobody watches
    emulator.set_status("pods", pods[0], {"phase": "Running"})
    await asyncio.sleep(0.5)
    assert emulator.lists("pods") == lists_before, "resumed from its resourceVersion"
    resumed = [
        q for m, p, q in emulator.requests if p.endswith("/pods") and q.get("resourceVersion")
    ]
    assert len(resumed) >= 2

    emulator.compact()  # the history is gone: resuming answers 410 Gone
    emulator.drop_watches()
    emulator.set_status(
        "pods",
        pods[1],
        {"phase": "Failed", "containerStatuses": [container_terminated(2, "Error")]},
    )
    ended = await asyncio.wait_for(waiting, 10)
    assert emulator.lists("pods") == lists_before + 1, "relisted after 410 Gone"
    assert ended.rank == 1
    assert "exit 2" in ended.reason


async def test_a_repeated_create_is_the_same_attempt(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    request = backend.dryrun(gpu_job())
    assert await backend.schedule(request) == await backend.schedule(request)
    assert len(emulator.list("jobs")) == 1
    assert len(emulator.list("services")) == 1
    # A foreign job squatting on the name is not ours to adopt.
    other = backend.dryrun(gpu_job(attempt=1))
    squatter = json.loads(json.dumps(other.job))
    squatter["metadata"]["labels"]["torchrelay.io/run"] = "someone-else"
    emulator.put("jobs", squatter)
    with pytest.raises(PermanentError, match="a different job named"):
        await backend.schedule(other)


async def test_an_attempt_is_adopted_only_while_its_job_exists(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    request = backend.dryrun(gpu_job())
    assert await backend.adopt(request) is None
    await backend.schedule(request)
    assert await backend.adopt(request) == request.handle


async def test_cancel_deletes_the_job_and_ends_the_wait_as_cancelled(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    handle = await backend.schedule(backend.dryrun(gpu_job(world_size=2)))
    waiting = asyncio.create_task(backend.wait(handle))
    emulator.start_job_pods(handle)
    await asyncio.sleep(0.2)
    await backend.cancel(handle)
    assert (await asyncio.wait_for(waiting, 10)).status is Status.CANCELLED
    assert emulator.list("jobs") == emulator.list("pods") == emulator.list("services") == []


async def test_any_replica_cancels_a_job_and_a_job_already_gone_is_fine(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    handle = await backend.schedule(backend.dryrun(gpu_job(world_size=2)))
    emulator.start_job_pods(handle)
    options = KubeOptions(api_url=emulator.url, namespace=NS, queue="gpu-queue")
    other = KubernetesBackend(await connect(options), options)  # a replica that never saw it
    try:
        await other.cancel(handle)
        # A foreground delete: the pods and the Service go first, then the Job.
        await assert_eventually(
            lambda: (
                emulator.list("jobs") == emulator.list("pods") == emulator.list("services") == []
            )
        )
        await other.cancel(handle)  # idempotent: the 404 is success
        await backend.cancel(job_name("never-scheduled", 0))
    finally:
        await other.aclose()


async def test_rbac_denial_is_a_clear_refusal(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    emulator.deny("create", "jobs")
    with pytest.raises(Refused) as refused:
        await backend.schedule(backend.dryrun(gpu_job()))
    message = str(refused.value)
    assert "refused to create jobs in namespace torchrelay (HTTP 403)" in message
    assert 'cannot create resource "jobs" in API group "batch"' in message


async def test_a_watch_denied_by_rbac_ends_the_wait(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    handle = await backend.schedule(backend.dryrun(gpu_job(world_size=1)))
    emulator.deny("list", "pods")
    with pytest.raises(Refused, match="refused to list pods"):
        await asyncio.wait_for(backend.wait(handle), 10)
