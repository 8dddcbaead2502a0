"""The train service with its Kubernetes backend: a real service process, a real nats-server,
and the API emulator over HTTP. The test plays kubelet and the Job controller; the service turns
what it sees into the same train.* events as with local workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.integration.processes import ServiceProcess
from tests.integration.training import request, train_service
from tests.integration.watching import Watcher, watching
from tests.kube.emulator import KubeEmulator, running_emulator
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.cluster.kubernetes.manifests import job_name
from torchrelay.shared.events import TrainCancelRequested, TrainCompleted, TrainFailed, TrainStarted
from torchrelay.shared.events.data import TrainCancelRequestedData
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.state import KvState, key_part
from torchrelay.shared.storage.files import RunResult, Throughput
from torchrelay.shared.storage.layout import Layout
from torchrelay.shared.testing import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def staged(staged_digits: tuple[Path, str]) -> tuple[Path, str]:
    return staged_digits


@pytest.fixture
async def emulator() -> AsyncIterator[KubeEmulator]:
    async with running_emulator() as running:
        yield running


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    async with watching(
        nats_url, "test-k8s-train", [TrainStarted, TrainCompleted, TrainFailed]
    ) as pair:
        yield pair


@pytest.fixture
def train(
    nats_url: str,
    staged: tuple[Path, str],
    emulator: KubeEmulator,
    tmp_path: Path,
) -> Iterator[ServiceProcess]:
    process = train_service(
        nats_url,
        staged[0],
        tmp_path / "train.log",
        TORCHRELAY_TRAIN_BACKEND="kubernetes",
        TORCHRELAY_KUBE_API_URL=emulator.url,
        TORCHRELAY_KUBE_NAMESPACE="torchrelay",
        TORCHRELAY_SHUTDOWN_GRACE_S="2",
        TORCHRELAY_SHUTDOWN_DEADLINE_S="5",
    )
    yield process
    process.stop()


async def job_of(emulator: KubeEmulator, run_id: str) -> str:
    name = job_name(run_id, 0)

    async def created() -> bool:
        return emulator.get("jobs", name) is not None

    await assert_eventually(created, timeout_s=20)
    return name


async def test_a_failed_pod_is_a_train_failed_naming_it(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    emulator: KubeEmulator,
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    await train.wait_ready()
    await publisher.publish(request(staged, "k8s-oom", world_size=2))
    job = await job_of(emulator, "k8s-oom")
    pods = emulator.start_job_pods(job)
    for pod in pods:
        emulator.set_status("pods", pod, {"phase": "Running"})
    emulator.set_status(
        "pods",
        pods[1],
        {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "worker",
                    "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                }
            ],
        },
    )

    event = await watcher.one(TrainFailed, run_id="k8s-oom", timeout_s=20)
    assert event.data.reason == f"pod {pods[1]} (rank 1) failed: OOMKilled (exit 137, SIGKILL)"
    assert (event.data.rank, event.data.exit_code, event.data.signal) == (1, 137, "SIGKILL")
    assert event.data.final is False, "the monitor may restart it"
    (started,) = watcher.of(TrainStarted, run_id="k8s-oom")
    assert started.data.backend == "kubernetes"
    assert emulator.get("jobs", job) is None


async def test_all_ranks_succeeded_is_a_train_completed(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    emulator: KubeEmulator,
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    await train.wait_ready()
    await publisher.publish(request(staged, "k8s-ok", world_size=2))
    job = await job_of(emulator, "k8s-ok")
    # Rank 0, as the worker does on the shared storage, records the exported model.
    RunResult(
        model_name="digits",
        version="k8s-ok",
        path="models/digits/k8s-ok",
        metrics={"accuracy": 0.97},
        steps=40,
        attempt=0,
        throughput=Throughput(samples_per_s=500.0, checkpoints=2, checkpoint_seconds=0.2),
    ).write(Layout(staged[0]).result("k8s-ok"))
    for pod in emulator.start_job_pods(job):
        emulator.set_status("pods", pod, {"phase": "Succeeded"})
    emulator.set_status(
        "jobs", job, {"succeeded": 2, "conditions": [{"type": "Complete", "status": "True"}]}
    )

    event = await watcher.one(TrainCompleted, run_id="k8s-ok", timeout_s=20)
    assert (event.data.model_version, event.data.metrics) == ("k8s-ok", {"accuracy": 0.97})


async def test_a_finished_job_whose_result_is_corrupt_fails_the_run_with_the_reason(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    emulator: KubeEmulator,
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    await train.wait_ready()
    await publisher.publish(request(staged, "k8s-garbled", world_size=1))
    job = await job_of(emulator, "k8s-garbled")
    result = Layout(staged[0]).result("k8s-garbled")
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text('{"model_name": "digits", "version": ')  # cut off mid-write
    for pod in emulator.start_job_pods(job):
        emulator.set_status("pods", pod, {"phase": "Succeeded"})
    emulator.set_status(
        "jobs", job, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    )

    failed = await watcher.one(TrainFailed, run_id="k8s-garbled", timeout_s=20)
    assert failed.data.final, "the same result would come out again: no restart"
    assert failed.data.reason.startswith("attempt 0 finished but its result.json is unusable")
    assert str(result) in failed.data.reason
    assert watcher.of(TrainCompleted, run_id="k8s-garbled") == []


async def test_rbac_denial_fails_the_run_with_the_reason(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    emulator: KubeEmulator,
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    emulator.deny("create", "jobs")
    await train.wait_ready()
    await publisher.publish(request(staged, "k8s-denied"))

    event = await watcher.one(TrainFailed, run_id="k8s-denied", timeout_s=20)
    assert event.data.final is True
    assert event.data.reason.startswith(
        "cannot launch: the Kubernetes API refused to create jobs in namespace torchrelay "
        "(HTTP 403)"
    )
    await asyncio.sleep(0.5)
    assert emulator.list("jobs") == []


async def test_a_run_whose_pods_cannot_be_watched_fails_and_its_job_is_removed(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    emulator: KubeEmulator,
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    emulator.deny("list", "pods")  # a Role without the pods rule
    await train.wait_ready()
    await publisher.publish(request(staged, "k8s-blind"))

    event = await watcher.one(TrainFailed, run_id="k8s-blind", timeout_s=20)
    assert event.data.reason.startswith(
        "lost track of attempt 0: the Kubernetes API refused to list pods"
    )
    assert emulator.list("jobs") == [], "no copy of the attempt is left running"


async def test_cancel_deletes_the_job_and_ends_the_run_as_cancelled(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    emulator: KubeEmulator,
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    await train.wait_ready()
    await publisher.publish(request(staged, "k8s-stop", world_size=2))
    job = await job_of(emulator, "k8s-stop")
    for pod in emulator.start_job_pods(job):
        emulator.set_status("pods", pod, {"phase": "Running"})
    await watcher.one(TrainStarted, run_id="k8s-stop", timeout_s=20)
    runs = (await KvState.open(publisher.nc.jetstream())).store("runs", RunRecord)
    run = await runs.get(key_part("k8s-stop"))
    assert run is not None
    assert run.value.handle == job, "the handle schedule() returned is what the record keeps"

    await publisher.publish(
        TrainCancelRequested(source="/tests", data=TrainCancelRequestedData(run_id="k8s-stop"))
    )

    event = await watcher.one(TrainFailed, run_id="k8s-stop", timeout_s=20)
    assert (event.data.reason, event.data.final) == ("cancelled", True)
    assert emulator.get("jobs", job) is None
    assert emulator.list("pods") == emulator.list("services") == []
    ended = await runs.get(key_part("k8s-stop"))
    assert ended is not None
    assert ended.value.status == "cancelled"
