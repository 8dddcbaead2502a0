"""The Kubernetes training backend over real HTTP against a stateful API emulator: the objects
it creates, how it reads pods and Jobs (the test plays kubelet and the Job controller), watches
that drop, expire or go silent, repeated creates, RBAC refusals, attempts whose ranks do not
start (and why), the first rank to fail and its log tail."""

from __future__ import annotations

import asyncio
import contextlib
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
    """The production pending timeout: nothing here outlasts it."""
    options = KubeOptions(api_url=emulator.url, namespace=NS, queue="gpu-queue", log_tail_lines=5)
    backend = KubernetesBackend(await connect(options), options)
    yield backend
    await backend.aclose()


@pytest.fixture
async def hasty(emulator: KubeEmulator) -> AsyncIterator[KubernetesBackend]:
    """Ranks that have not all started within half a second fail the attempt."""
    options = KubeOptions(api_url=emulator.url, namespace=NS, pending_timeout_s=0.5)
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
            "cannot pull its image: ImagePullBackOff: pull access denied",
        ),
        (
            {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
             "reason": "Unschedulable", "lastTransitionTime": "2026-01-01T00:00:00Z",
             "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]},
            "is Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        ),
        (
            {"phase": "Pending", "containerStatuses": [{"name": "worker", "state": {"waiting": {
                "reason": "InvalidImageName", "message": "couldn't parse image name"}}}]},
            "cannot start: InvalidImageName: couldn't parse image name",
        ),
        (
            {"phase": "Failed", "containerStatuses": [container_terminated(1, "Error")]},
            "failed: Error (exit 1)",
        ),
    ],
)  # fmt: skip
async def test_a_pod_that_cannot_run_fails_the_attempt_with_the_reason(
    hasty: KubernetesBackend, emulator: KubeEmulator, status: dict[str, object], reason: str
) -> None:
    handle = await hasty.schedule(hasty.dryrun(gpu_job(world_size=2)))
    waiting = asyncio.create_task(hasty.wait(handle))
    pods = emulator.start_job_pods(handle)
    emulator.set_status("pods", pods[1], status)
    ended = await asyncio.wait_for(waiting, 15)
    assert ended.status is Status.FAILED
    assert f"pod {pods[1]} (rank 1) {reason}" in ended.reason
    assert ended.rank == 1
    assert emulator.get("jobs", handle) is None, "nothing of the attempt is left"


async def test_a_pull_that_fails_once_is_retried_not_fatal(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    handle = await backend.schedule(backend.dryrun(gpu_job(world_size=2)))
    waiting = asyncio.create_task(backend.wait(handle))
    pods = emulator.start_job_pods(handle)
    pull_failed = {"name": "worker", "state": {"waiting": {
        "reason": "ErrImagePull", "message": "registry.example: i/o timeout"}}}  # fmt: skip
    emulator.set_status("pods", pods[0], {"phase": "Pending", "containerStatuses": [pull_failed]})
    await asyncio.sleep(0.3)  # the backend sees the failed pull
    assert not waiting.done()
    for pod in pods:  # the kubelet's next pull works
        emulator.set_status("pods", pod, {"phase": "Succeeded"})
    emulator.set_status(
        "jobs", handle, {"succeeded": 2, "conditions": [{"type": "Complete", "status": "True"}]}
    )
    assert await asyncio.wait_for(waiting, 10) == Ended(Status.SUCCEEDED, "every rank finished")


async def test_ranks_stuck_mounting_fail_the_attempt_after_the_pending_timeout_saying_why(
    hasty: KubernetesBackend, emulator: KubeEmulator
) -> None:
    handle = await hasty.schedule(hasty.dryrun(gpu_job(world_size=2)))
    waiting = asyncio.create_task(hasty.wait(handle))
    pods = emulator.start_job_pods(handle)
    emulator.set_status("pods", pods[0], {"phase": "Running"})
    creating = {"name": "worker", "state": {"waiting": {"reason": "ContainerCreating"}}}
    emulator.set_status("pods", pods[1], {"phase": "Pending", "containerStatuses": [creating]})
    stuck = emulator.get("pods", pods[1])
    assert stuck is not None
    emulator.add_event(
        stuck,
        "FailedMount",
        'MountVolume.SetUp failed for volume "storage": mount.nfs: Connection timed out',
        kind="Pod",
    )
    ended = await asyncio.wait_for(waiting, 15)
    assert ended.status is Status.FAILED
    assert ended.rank == 1
    assert ended.reason.startswith("the ranks did not all start within ")
    assert "(TORCHRELAY_KUBE_PENDING_TIMEOUT_S)" in ended.reason
    assert ended.reason.endswith(
        f"pod {pods[1]} (rank 1) cannot mount its volumes: FailedMount: MountVolume.SetUp "
        'failed for volume "storage": mount.nfs: Connection timed out'
    )
    assert emulator.get("jobs", handle) is None


async def test_pods_refused_by_a_quota_fail_the_attempt_with_the_jobs_event(
    hasty: KubernetesBackend, emulator: KubeEmulator
) -> None:
    handle = await hasty.schedule(hasty.dryrun(gpu_job(world_size=2)))
    waiting = asyncio.create_task(hasty.wait(handle))
    job = emulator.get("jobs", handle)
    assert job is not None
    quota = (
        f'pods "{handle}-0-x" is forbidden: exceeded quota: gpu, requested: nvidia.com/gpu=1, '
        "used: nvidia.com/gpu=8, limited: nvidia.com/gpu=8"
    )
    emulator.add_event(job, "FailedCreate", quota, kind="Job")
    ended = await asyncio.wait_for(waiting, 15)
    assert ended.status is Status.FAILED
    assert ended.reason.endswith(f"job {handle} has 2 of 2 pods not created: FailedCreate: {quota}")
    assert emulator.get("jobs", handle) is None


async def test_events_it_may_not_read_leave_the_pods_to_say_why_they_did_not_start(
    hasty: KubernetesBackend, emulator: KubeEmulator
) -> None:
    emulator.deny("list", "events")
    handle = await hasty.schedule(hasty.dryrun(gpu_job(world_size=1)))
    waiting = asyncio.create_task(hasty.wait(handle))
    (pod,) = emulator.start_job_pods(handle)
    pulling = {"name": "worker", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "manifest unknown"}}}  # fmt: skip
    emulator.set_status("pods", pod, {"phase": "Pending", "containerStatuses": [pulling]})
    ended = await asyncio.wait_for(waiting, 15)
    assert ended.reason.endswith(
        f"pod {pod} (rank 0) cannot pull its image: ImagePullBackOff: manifest unknown"
    )
    assert emulator.list("jobs") == emulator.list("pods") == emulator.list("services") == []


async def test_the_first_rank_to_fail_is_reported_with_its_log_tail_before_the_job_goes(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    handle = await backend.schedule(backend.dryrun(gpu_job(world_size=2)))
    pods = emulator.start_job_pods(handle)
    # Rank 1 ran out of memory first; rank 0 failed after, when it lost its peer.
    emulator.set_log(pods[1], "".join(f"step {n}\n" for n in range(100)) + "CUDA out of memory\n")
    emulator.set_log(pods[0], "RuntimeError: Connection closed by peer\n")
    for pod, code, reason, finished in (
        (pods[0], 1, "Error", "2026-11-28T12:00:09Z"),
        (pods[1], 137, "OOMKilled", "2026-11-28T12:00:02Z"),
    ):
        terminated = {"exitCode": code, "reason": reason, "finishedAt": finished}
        status = {"phase": "Failed", "containerStatuses": [
            {"name": "worker", "state": {"terminated": terminated}}]}  # fmt: skip
        emulator.set_status("pods", pod, status)
    ended = await asyncio.wait_for(backend.wait(handle), 10)
    assert ended.rank == 1
    assert ended.reason == f"pod {pods[1]} (rank 1) failed: OOMKilled (exit 137, SIGKILL)"
    assert ended.log_tail == ["step 96", "step 97", "step 98", "step 99", "CUDA out of memory"]
    assert ("GET", f"/api/v1/namespaces/{NS}/pods/{pods[1]}/log") in [
        (method, path) for method, path, _ in emulator.requests
    ]
    assert emulator.get("jobs", handle) is None
    assert emulator.list("pods") == [], "deleted after its log was read"


async def test_a_log_that_cannot_be_read_still_fails_the_attempt_and_removes_the_job(
    backend: KubernetesBackend, emulator: KubeEmulator
) -> None:
    emulator.deny("get", "pods/log")
    handle = await backend.schedule(backend.dryrun(gpu_job(world_size=1)))
    (pod,) = emulator.start_job_pods(handle)
    emulator.set_log(pod, "Traceback ...\n")
    failed = {"phase": "Failed", "containerStatuses": [container_terminated(1, "Error")]}
    emulator.set_status("pods", pod, failed)
    ended = await asyncio.wait_for(backend.wait(handle), 10)
    assert ended.status is Status.FAILED
    assert ended.reason == f"pod {pod} (rank 0) failed: Error (exit 1)"
    assert ended.log_tail == []
    assert emulator.list("jobs") == emulator.list("pods") == emulator.list("services") == []


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


async def test_every_rank_gets_the_rendezvous_and_collective_timeouts(
    backend: KubernetesBackend,
) -> None:
    def worker_of(job: WorkerJob) -> dict[str, object]:
        container = backend.dryrun(job).job["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        parsed: dict[str, object] = json.loads(env["TORCHRELAY_WORKER"])
        return parsed

    default = worker_of(gpu_job())
    assert (default["rendezvous_timeout_s"], default["collective_timeout_s"]) == (600.0, 1800.0)
    slow = gpu_job().model_copy(update={"rendezvous_timeout_s": 900, "collective_timeout_s": 60})
    chosen = worker_of(slow)
    assert (chosen["rendezvous_timeout_s"], chosen["collective_timeout_s"]) == (900, 60)


class Relay:
    """A TCP relay between the backend and the API server whose open watch connections can be
    frozen: nothing more crosses them and nothing closes them, as when a node or a proxy on
    the way dies without a FIN (half-open). Other connections, and new ones, still go through."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = ""
        self._watching: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:  # frozen ones too: the test is over
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self._server.wait_closed()

    def freeze_watches(self) -> None:
        for frozen in self._watching:
            frozen.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, upstream_writer]
        frozen = asyncio.Event()
        for source, sink, asks in (
            (reader, upstream_writer, True),
            (upstream_reader, writer, False),
        ):
            task = asyncio.create_task(self._pipe(source, sink, frozen, asks=asks))
            self._tasks.add(task)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        frozen: asyncio.Event,
        *,
        asks: bool,
    ) -> None:
        try:
            while data := await source.read(65536):
                if asks and b"watch=true" in data.lower():
                    self._watching.append(frozen)
                if frozen.is_set():
                    await asyncio.Event().wait()  # swallowed, and the connection stays open
                sink.write(data)
                await sink.drain()
        finally:
            if not frozen.is_set():
                sink.close()


async def test_a_half_open_watch_is_dropped_and_resumed(emulator: KubeEmulator) -> None:
    port = int(emulator.url.rsplit(":", 1)[1])
    async with Relay(port) as relay:
        options = KubeOptions(
            api_url=relay.url, namespace=NS, watch_timeout_s=1, watch_margin_s=0.5,
            request_timeout_s=2,
        )  # fmt: skip
        backend = KubernetesBackend(await connect(options), options)
        try:
            handle = await backend.schedule(backend.dryrun(gpu_job(world_size=1)))
            waiting = asyncio.create_task(backend.wait(handle))
            (pod,) = emulator.start_job_pods(handle)
            await asyncio.sleep(0.3)  # the watches are open
            watches = sum(1 for _, _, query in emulator.requests if query.get("watch"))
            relay.freeze_watches()  # and a change nobody would hear of on those connections
            failed = {"phase": "Failed", "containerStatuses": [container_terminated(3, "Error")]}
            emulator.set_status("pods", pod, failed)
            ended = await asyncio.wait_for(waiting, 20)
            assert ended.reason == f"pod {pod} (rank 0) failed: Error (exit 3)"
            assert sum(1 for _, _, query in emulator.requests if query.get("watch")) > watches
        finally:
            await backend.aclose()
