"""The digits pipeline with train and serve on ``backend=kubernetes``, against the API
emulator with its kubelet: the ranks of an Indexed Job and the model server of a Deployment
run as real processes, find each other through cluster DNS names and share the storage claim,
as pods would on a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.e2e.conftest import Up, digits_pipeline, start_up, stop_up
from tests.integration.backend_worlds import infer_body
from tests.kube.emulator import KubeEmulator
from tests.kube.kubelet import INDEX, Image, Kubelet, running_cluster
from torchrelay.platform import nats_passwords
from torchrelay.shared.bus import principals
from torchrelay.shared.cluster.kubernetes.manifests import version_label
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.kubernetes.outcome import rollout_state

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
NS = "torchrelay"
WORKER_SECRET = "torchrelay-worker-nats"


class Cluster:
    """The emulator and its kubelet in a thread of their own (the platform runs beside them as
    `torchrelay up` processes)."""

    def __init__(self, root: Path, **options: Any) -> None:
        self.root = root
        self.options = options
        self._ready: Future[tuple[KubeEmulator, Kubelet]] = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="cluster", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with running_cluster(self.root, **self.options) as running:
                self._ready.set_result(running)
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    def __enter__(self) -> tuple[KubeEmulator, Kubelet]:
        self._thread.start()
        return self._ready.result(timeout=60)

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)


@contextlib.contextmanager
def on_cluster(
    folder: Path, *, images: dict[str, Image] | None = None, env: dict[str, str] | None = None
) -> Iterator[tuple[Up, KubeEmulator, Kubelet]]:
    """`torchrelay up` in ``folder`` with train and serve on the emulated cluster: the storage
    is the claim its pods mount, the worker's NATS password is in the Secret they read."""
    state = folder / ".torchrelay"
    passwords = nats_passwords(state)  # made here first: the worker's goes in its Secret
    storage = (state / "storage").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    with Cluster(
        folder / "cluster",
        claims={"torchrelay-storage": storage},
        secrets={WORKER_SECRET: {"password": passwords[principals.WORKER]}},
        images=images or {},
    ) as (emulator, kubelet):
        settings = {
            "TORCHRELAY_TRAIN_BACKEND": "kubernetes",
            "TORCHRELAY_SERVE_BACKEND": "kubernetes",
            "TORCHRELAY_KUBE_API_URL": emulator.url,
            "TORCHRELAY_KUBE_NAMESPACE": NS,
            "TORCHRELAY_KUBE_WORKER_NATS_SECRET": WORKER_SECRET,
            "TORCHRELAY_KUBE_SERVER_CPU": "1",
            "TORCHRELAY_SERVE_READY_TIMEOUT_S": "45",
            **(env or {}),
        }
        up = start_up(folder, env=settings)
        try:
            yield up, emulator, kubelet
        finally:
            stop_up(up)


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[Up, KubeEmulator, Kubelet]]:
    with on_cluster(tmp_path) as running:
        yield running


def infer(kubelet: Kubelet, endpoint: str) -> dict[str, Any]:
    """One inference through the model's Service name, as a client in the cluster sends it."""
    url = urlparse(endpoint)
    (address, *_) = kubelet.resolve(str(url.hostname))
    request = urllib.request.Request(
        f"http://{address}:{url.port}{url.path}/infer",
        data=json.dumps(infer_body()).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - http only
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def test_the_digits_pipeline_trains_two_ranks_in_an_indexed_job_and_serves_from_a_deployment(
    kube: tuple[Up, KubeEmulator, Kubelet],
) -> None:
    up, emulator, kubelet = kube
    pipeline_id = up.submit(digits_pipeline("kube", epochs=3, world_size=2))

    report = up.finish(pipeline_id, timeout=420)

    assert report["status"] == "succeeded", report["stages"]
    assert report["stages"]["train"]["detail"]["metrics"]["accuracy"] >= 0.8
    (job,) = [j for j in emulator.history if j.plural == "jobs" and j.type == "ADDED"]
    name = job.object["metadata"]["name"]
    ranks = sorted(
        {c.object["spec"]["hostname"] for c in emulator.history if c.plural == "pods"
         and c.object["metadata"].get("labels", {}).get("job-name") == name}
    )  # fmt: skip
    assert ranks == [f"{name}-0", f"{name}-1"]
    rendezvous = f"tcp://{name}-0.{name}.{NS}.svc:29500"
    worker_env = job.object["spec"]["template"]["spec"]["containers"][0]["env"]
    assert rendezvous in worker_env[0]["value"]  # the ranks met at rank 0's DNS name

    deployment = emulator.get("deployments", "model-digits", NS)
    assert deployment is not None
    assert deployment["status"]["availableReplicas"] == 1
    endpoint = f"http://model-digits.{NS}.svc:8080/v2/models/digits"
    answer = infer(kubelet, endpoint)
    assert answer["outputs"][0]["shape"] == [1, 10], answer


def wait_until(condition: Any, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def rank_pods(emulator: KubeEmulator, job: str) -> dict[int, str]:
    """The pods of ``job`` by rank (the last created for each index)."""
    ranks = {}
    for pod in emulator.list("pods", NS):
        labels = pod["metadata"].get("labels") or {}
        if labels.get("job-name") == job:
            ranks[int(labels[INDEX])] = pod["metadata"]["name"]
    return ranks


def jobs_created(emulator: KubeEmulator) -> list[str]:
    return [c.object["metadata"]["name"] for c in list(emulator.history)
            if c.plural == "jobs" and c.type == "ADDED"]  # fmt: skip


def test_a_rank_killed_mid_run_fails_the_attempt_and_the_next_resumes_from_its_checkpoint(
    kube: tuple[Up, KubeEmulator, Kubelet],
) -> None:
    up, emulator, kubelet = kube
    pipeline_id = up.submit(digits_pipeline("phoenix", epochs=8, world_size=2))
    checkpoints = up.storage / "runs" / f"{pipeline_id}.train" / "checkpoints"
    wait_until(
        lambda: checkpoints.is_dir() and any(checkpoints.glob("step-*.pt")),
        "no checkpoint was written",
    )
    (first,) = jobs_created(emulator)
    victim = rank_pods(emulator, first)[1]

    kubelet.kill(victim, signal.SIGKILL)  # the OOM killer, say

    report = up.finish(pipeline_id, timeout=420)
    assert report["status"] == "succeeded", report["stages"]
    first_attempt, second_attempt = jobs_created(emulator)
    assert (first_attempt[-3:], second_attempt[-3:]) == ("-a0", "-a1")
    rank0 = rank_pods(emulator, second_attempt)[0]
    resumed = kubelet.log(rank0)
    assert '"resumed_from_step": ' in resumed
    assert '"resumed_from_step": null' not in resumed
    assert emulator.get("jobs", first_attempt, NS) is None  # the failed attempt's Job is gone


def test_a_rollout_whose_pods_never_get_ready_is_rolled_back_and_the_old_version_serves(
    kube: tuple[Up, KubeEmulator, Kubelet],
) -> None:
    up, emulator, kubelet = kube
    first = up.submit(digits_pipeline("v1", epochs=2, world_size=1))
    assert up.finish(first, timeout=300)["status"] == "succeeded"
    endpoint = f"http://model-digits.{NS}.svc:8080/v2/models/digits"
    assert infer(kubelet, endpoint)["outputs"][0]["shape"] == [1, 10]

    # The next version's pods land on a fresh node and the registry refuses the image.
    kubelet.forget_images()
    kubelet.images[KubeOptions().server_image] = Image(pull_failures=-1)
    second = up.submit(digits_pipeline("v2", epochs=2, world_size=1))

    report = up.finish(second, timeout=300)
    assert report["status"] == "failed", report
    deploy = report["stages"]["deploy"]
    assert deploy["status"] == "failed", deploy
    assert "ErrImagePull" in deploy["reason"] or "ImagePullBackOff" in deploy["reason"], deploy
    deployment = emulator.get("deployments", "model-digits", NS)
    assert deployment is not None
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["torchrelay.io/version"] == version_label(f"{first}.train")
    wait_until(
        lambda: rollout_state(emulator.get("deployments", "model-digits", NS) or {})[0] == "done",
        "the old version's rollout never settled",
    )
    assert infer(kubelet, endpoint)["outputs"][0]["shape"] == [1, 10]  # v1 still answers


def test_a_60_s_image_pull_is_not_a_stall(tmp_path: Path) -> None:
    image = KubeOptions().worker_image
    with on_cluster(
        tmp_path,
        images={image: Image(pull_delay_s=60)},
        env={"TORCHRELAY_MONITOR_STALL_AFTER_S": "20", "TORCHRELAY_MONITOR_STALL_CHECK_S": "1"},
    ) as (up, emulator, _):
        pipeline_id = up.submit(digits_pipeline("slow-pull", epochs=2, world_size=2))
        report = up.finish(pipeline_id, timeout=420)
        assert report["status"] == "succeeded", report["stages"]
        (job,) = jobs_created(emulator)  # never cancelled as stalled, never restarted
        assert job.endswith("-a0")
        waited = {
            (c.object.get("status", {}).get("containerStatuses") or [{}])[0]
            .get("state", {}).get("waiting", {}).get("reason")
            for c in list(emulator.history) if c.plural == "pods"
        }  # fmt: skip
        assert "ContainerCreating" in waited
