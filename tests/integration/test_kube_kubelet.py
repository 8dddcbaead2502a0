"""The test kubelet runs the emulator's pods as real processes: Indexed Jobs with their index,
env, volumes and DNS names; Deployments rolled out, stalled and rolled back on readiness;
image pulls that take time or fail; missing Secrets; killed and deleted containers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.kube.emulator import KubeEmulator
from tests.kube.kubelet import Image, Kubelet, running_cluster
from torchrelay.shared.cluster.kubernetes.outcome import rollout_state
from torchrelay.shared.testing import assert_eventually

NS = "torchrelay"
WAIT_S = 60.0


@pytest.fixture
def claim(tmp_path: Path) -> Path:
    folder = tmp_path / "claim"
    folder.mkdir()
    return folder


@pytest.fixture
async def cluster(tmp_path: Path, claim: Path) -> AsyncIterator[tuple[KubeEmulator, Kubelet]]:
    async with running_cluster(
        tmp_path / "kubelet",
        claims={"shared": claim},
        secrets={"nats-worker": {"password": "s3cret"}},
        images={
            "slow:1": Image(pull_delay_s=0.3),
            "flaky:1": Image(pull_failures=1),
            "missing:1": Image(pull_failures=-1),
        },
    ) as running:
        yield running


def python(code: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(code)]


def job(
    name: str, command: list[str], *, completions: int = 1, image: str = "worker:1", **extra: Any
) -> dict[str, Any]:
    container = {
        "name": "worker",
        "image": image,
        "command": command,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "OUT", "value": "/data/out-$(POD_NAME)"},
        ],
        "volumeMounts": [{"name": "storage", "mountPath": "/data"}],
        **extra,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "labels": {"job": name}},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"job": name}},
                "spec": {
                    "restartPolicy": "Never",
                    "subdomain": name,
                    "containers": [container],
                    "volumes": [
                        {"name": "storage", "persistentVolumeClaim": {"claimName": "shared"}}
                    ],
                },
            },
        },
    }


def headless(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"job": name},
            "ports": [{"port": 29511}],
        },
    }


def conditions(obj: dict[str, Any] | None) -> set[str]:
    status = (obj or {}).get("status") or {}
    return {c["type"] for c in status.get("conditions") or [] if c.get("status") == "True"}


def pods_of(emulator: KubeEmulator, label: str) -> list[dict[str, Any]]:
    key, _, value = label.partition("=")
    return [p for p in emulator.list("pods") if p["metadata"]["labels"].get(key) == value]


def container(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
    found: dict[str, Any] = statuses[0]
    return found


def waiting_reason(pod: dict[str, Any]) -> str:
    return str((container(pod).get("state", {}).get("waiting") or {}).get("reason", ""))


def running(pod: dict[str, Any]) -> bool:
    return "running" in container(pod).get("state", {})


async def until(condition: Any) -> None:
    await assert_eventually(condition, timeout_s=WAIT_S, interval_s=0.05)


async def test_an_indexed_job_runs_one_process_per_index_with_its_env_and_volumes(
    cluster: tuple[KubeEmulator, Kubelet], claim: Path
) -> None:
    emulator, kubelet = cluster
    code = """
        import json, os
        keys = ("JOB_COMPLETION_INDEX", "POD_NAME", "POD_IP", "HOSTNAME", "OUT")
        open(os.environ["OUT"], "w").write(json.dumps({k: os.environ[k] for k in keys}))
        print("rank", os.environ["JOB_COMPLETION_INDEX"], "done")
    """
    emulator.put("jobs", job("train-a", python(code), completions=2))

    await until(lambda: "Complete" in conditions(emulator.get("jobs", "train-a")))

    pods = sorted(pods_of(emulator, "job=train-a"), key=lambda p: p["metadata"]["name"])
    assert [p["spec"]["hostname"] for p in pods] == ["train-a-0", "train-a-1"]
    for index, pod in enumerate(pods):
        name = pod["metadata"]["name"]
        assert pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == str(
            index
        )
        assert pod["status"]["phase"] == "Succeeded"
        terminated = container(pod)["state"]["terminated"]
        assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
        seen = json.loads((claim / f"out-{name}").read_text())  # /data is the claim's folder
        assert seen == {
            "JOB_COMPLETION_INDEX": str(index),
            "POD_NAME": name,
            "POD_IP": pod["status"]["podIP"],
            "HOSTNAME": f"train-a-{index}",
            "OUT": f"{claim}/out-{name}",
        }
        assert kubelet.log(name) == f"rank {index} done\n"
    assert len({p["status"]["podIP"] for p in pods}) == 2
    status = emulator.get("jobs", "train-a")["status"]  # type: ignore[index]
    assert (status["succeeded"], status["failed"], status["active"]) == (2, 0, 0)


async def test_ranks_reach_each_other_through_the_headless_service_names(
    cluster: tuple[KubeEmulator, Kubelet],
) -> None:
    emulator, kubelet = cluster
    code = """
        import os, socket, time
        index = int(os.environ["JOB_COMPLETION_INDEX"])
        if index == 0:  # listens on "all interfaces": its own address
            server = socket.create_server(("0.0.0.0", 29511))
            peer, _ = server.accept()
            print("rank 0 got", peer.recv(100).decode())
        else:
            deadline = time.monotonic() + 30
            while True:
                try:
                    sock = socket.create_connection(("talk-0.talk.torchrelay.svc", 29511))
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            sock.sendall(b"hello from " + os.environ["POD_IP"].encode())
    """
    emulator.put("jobs", job("talk", python(code), completions=2))
    emulator.put("services", headless("talk"))

    await until(lambda: "Complete" in conditions(emulator.get("jobs", "talk")))

    rank0, rank1 = sorted(pods_of(emulator, "job=talk"), key=lambda p: p["spec"]["hostname"])
    assert kubelet.log(rank0["metadata"]["name"]) == (
        f"rank 0 got hello from {rank1['status']['podIP']}\n"
    )


async def test_a_failed_rank_fails_the_job_with_its_exit_code_and_stops_the_others(
    cluster: tuple[KubeEmulator, Kubelet],
) -> None:
    emulator, kubelet = cluster
    code = """
        import os, sys, time
        if os.environ["JOB_COMPLETION_INDEX"] == "1":
            sys.exit(3)
        time.sleep(600)
    """
    emulator.put("jobs", job("fails", python(code), completions=2))

    await until(lambda: "Failed" in conditions(emulator.get("jobs", "fails")))
    job_status = emulator.get("jobs", "fails")["status"]  # type: ignore[index]
    assert job_status["conditions"][0]["reason"] == "BackoffLimitExceeded"
    (failed,) = [p for p in pods_of(emulator, "job=fails") if p["status"]["phase"] == "Failed"]
    assert failed["spec"]["hostname"] == "fails-1"
    terminated = container(failed)["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    # Rank 0 is stopped and its pod goes.
    await until(lambda: len(pods_of(emulator, "job=fails")) == 1)
    assert kubelet.processes() == []


async def test_a_killed_container_exits_with_128_plus_the_signal(
    cluster: tuple[KubeEmulator, Kubelet],
) -> None:
    emulator, kubelet = cluster
    emulator.put("jobs", job("killed", python("import time; time.sleep(600)")))
    await until(
        lambda: any(
            "running" in container(p).get("state", {}) for p in pods_of(emulator, "job=killed")
        )
    )
    (pod,) = pods_of(emulator, "job=killed")

    kubelet.kill(pod["metadata"]["name"], signal.SIGKILL)

    await until(lambda: "Failed" in conditions(emulator.get("jobs", "killed")))
    (pod,) = pods_of(emulator, "job=killed")
    assert container(pod)["state"]["terminated"]["exitCode"] == 128 + signal.SIGKILL


async def test_deleting_a_job_in_the_foreground_stops_its_processes_before_it_goes(
    cluster: tuple[KubeEmulator, Kubelet],
) -> None:
    emulator, kubelet = cluster
    emulator.put("jobs", job("stopped", python("import time; time.sleep(600)"), completions=2))
    await until(lambda: len(kubelet.processes()) == 2)

    emulator.delete("jobs", "stopped", NS, foreground=True)

    assert emulator.deleting("jobs", "stopped", NS)
    await until(lambda: emulator.get("jobs", "stopped") is None)
    assert kubelet.processes() == []
    assert emulator.list("pods") == []


async def test_a_slow_pull_waits_in_container_creating_then_runs(
    cluster: tuple[KubeEmulator, Kubelet],
) -> None:
    emulator, kubelet = cluster
    emulator.put("jobs", job("slow", python("pass"), image="slow:1"))
    await until(lambda: bool(pods_of(emulator, "job=slow")))
    waiting = container(pods_of(emulator, "job=slow")[0])["state"].get("waiting") or {}
    assert waiting.get("reason") == "ContainerCreating"
    await until(lambda: "Complete" in conditions(emulator.get("jobs", "slow")))
    assert kubelet.pulls["slow:1"] == 1


async def test_a_failed_pull_is_retried_after_a_back_off(
    cluster: tuple[KubeEmulator, Kubelet],
) -> None:
    emulator, kubelet = cluster
    reasons: set[str] = set()

    def seen() -> bool:
        for pod in pods_of(emulator, "job=flaky"):
            reasons.add((container(pod)["state"].get("waiting") or {}).get("reason", ""))
        return "Complete" in conditions(emulator.get("jobs", "flaky"))

    emulator.put("jobs", job("flaky", python("pass"), image="flaky:1"))
    await until(seen)
    assert {"ErrImagePull", "ImagePullBackOff"} <= reasons
    assert kubelet.pulls["flaky:1"] == 2


async def test_an_image_that_cannot_be_pulled_never_starts(
    cluster: tuple[KubeEmulator, Kubelet],
) -> None:
    emulator, kubelet = cluster
    emulator.put("jobs", job("missing", python("pass"), image="missing:1"))
    await until(lambda: kubelet.pulls.get("missing:1", 0) >= 3)
    (pod,) = pods_of(emulator, "job=missing")
    assert pod["status"]["phase"] == "Pending"
    assert container(pod)["state"]["waiting"]["reason"] in ("ErrImagePull", "ImagePullBackOff")
    assert kubelet.processes() == []


def reading_secret(name: str, secret: str) -> dict[str, Any]:
    """A Job whose container reads the Secret's password from its env and from its file."""
    code = """
        import os
        secret = open("/etc/nats/password").read()
        open(os.environ["OUT"], "w").write(os.environ["PASSWORD"] + " " + secret)
    """
    spec = job(name, python(code))
    pod_spec = spec["spec"]["template"]["spec"]
    pod_spec["volumes"].append({"name": "nats", "secret": {"secretName": "nats-worker"}})
    worker = pod_spec["containers"][0]
    worker["volumeMounts"].append({"name": "nats", "mountPath": "/etc/nats"})
    reference = {"secretKeyRef": {"name": secret, "key": "password"}}
    worker["env"].append({"name": "PASSWORD", "valueFrom": reference})
    return spec


async def test_secrets_reach_env_and_files_and_a_missing_one_holds_the_container(
    cluster: tuple[KubeEmulator, Kubelet], claim: Path
) -> None:
    emulator, kubelet = cluster
    emulator.put("jobs", reading_secret("secret", "nats-worker"))
    await until(lambda: "Complete" in conditions(emulator.get("jobs", "secret")))
    (pod,) = pods_of(emulator, "job=secret")
    assert (claim / f"out-{pod['metadata']['name']}").read_text() == "s3cret s3cret"

    emulator.put("jobs", reading_secret("no-secret", "not-there"))
    await until(
        lambda: (
            [waiting_reason(p) for p in pods_of(emulator, "job=no-secret")]
            == ["CreateContainerConfigError"]
        )
    )
    (held,) = pods_of(emulator, "job=no-secret")
    assert container(held)["state"]["waiting"]["message"] == 'secret "not-there" not found'

    kubelet.secrets["not-there"] = {"password": "late"}  # created afterwards: it starts
    await until(lambda: "Complete" in conditions(emulator.get("jobs", "no-secret")))


async def test_a_pod_whose_claim_does_not_exist_stays_pending(
    cluster: tuple[KubeEmulator, Kubelet],
) -> None:
    emulator, kubelet = cluster
    spec = job("unclaimed", python("pass"))
    spec["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "x"
    emulator.put("jobs", spec)
    await until(
        lambda: (
            [waiting_reason(p) for p in pods_of(emulator, "job=unclaimed")] == ["ContainerCreating"]
            and "message" in container(pods_of(emulator, "job=unclaimed")[0])["state"]["waiting"]
        )
    )
    (pod,) = pods_of(emulator, "job=unclaimed")
    assert pod["status"]["phase"] == "Pending"
    assert 'persistentvolumeclaim "x" not found' in container(pod)["state"]["waiting"]["message"]
    assert kubelet.processes() == []


# --- Deployments ------------------------------------------------------------------------------

SERVER = """
    import http.server, os
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = os.environ["READY"] == "yes" or self.path == "/live"
            self.send_response(200 if ok else 503)
            self.end_headers()
            self.wfile.write(os.environ["VERSION"].encode())
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


def deployment(version: str, *, ready: bool = True, deadline_s: int = 600) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "model-x", "namespace": NS, "labels": {"model": "x"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"model": "x"}},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "progressDeadlineSeconds": deadline_s,
            "template": {
                "metadata": {"labels": {"model": "x", "version": version}},
                "spec": {
                    "containers": [
                        {
                            "name": "server",
                            "image": "server:1",
                            "command": python(SERVER),
                            "env": [
                                {"name": "VERSION", "value": version},
                                {"name": "READY", "value": "yes" if ready else "no"},
                            ],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                        }
                    ]
                },
            },
        },
    }


def service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "model-x", "namespace": NS},
        "spec": {"selector": {"model": "x"}, "ports": [{"port": 8080, "targetPort": "http"}]},
    }


def replace(emulator: KubeEmulator, body: dict[str, Any]) -> None:
    current = emulator.get("deployments", "model-x")
    assert current is not None
    body["metadata"] = {**current["metadata"], "generation": current["metadata"]["generation"] + 1}
    body["status"] = current.get("status", {})
    emulator.put("deployments", body)


def rollout(emulator: KubeEmulator) -> str:
    found = emulator.get("deployments", "model-x")
    return rollout_state(found)[0] if found else "absent"


def versions(emulator: KubeEmulator) -> list[str]:
    return sorted(
        p["metadata"]["labels"]["version"] for p in pods_of(emulator, "model=x")
        if "deletionTimestamp" not in p["metadata"]
    )  # fmt: skip


async def get(address: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://{address}:8080/") as r:
        return r.status, await r.text()


async def test_a_deployment_rolls_out_on_readiness_and_its_service_name_resolves(
    cluster: tuple[KubeEmulator, Kubelet],
) -> None:
    emulator, kubelet = cluster
    emulator.put("services", service())
    emulator.put("deployments", deployment("v1"))
    await until(lambda: rollout(emulator) == "done")
    (pod,) = pods_of(emulator, "model=x")
    assert kubelet.resolve("model-x.torchrelay.svc") == [pod["status"]["podIP"]]
    assert await get(kubelet.resolve("model-x.torchrelay.svc")[0]) == (200, "v1")

    replace(emulator, deployment("v2"))

    await until(lambda: rollout(emulator) == "done" and versions(emulator) == ["v2"])
    (address,) = kubelet.resolve("model-x.torchrelay.svc.cluster.local")
    assert await get(address) == (200, "v2")
    assert len(emulator.list("replicasets")) == 2


async def test_a_rollout_whose_pods_never_get_ready_exceeds_its_deadline_and_rolls_back(
    cluster: tuple[KubeEmulator, Kubelet],
) -> None:
    emulator, kubelet = cluster
    emulator.put("services", service())
    emulator.put("deployments", deployment("v1", deadline_s=1))
    await until(lambda: rollout(emulator) == "done")

    replace(emulator, deployment("v2", ready=False, deadline_s=1))

    await until(lambda: rollout(emulator) == "failed")
    assert versions(emulator) == ["v1", "v2"]  # the old pod still serves; the new one surged
    (address,) = kubelet.resolve("model-x.torchrelay.svc")  # only the ready pod behind it
    assert await get(address) == (200, "v1")

    replace(emulator, deployment("v1", deadline_s=1))  # what the serving backend does

    await until(lambda: rollout(emulator) == "done" and versions(emulator) == ["v1"])


async def test_a_deployment_container_that_exits_is_restarted(
    cluster: tuple[KubeEmulator, Kubelet],
) -> None:
    emulator, _ = cluster
    crashing = deployment("v1")
    crashing["spec"]["template"]["spec"]["containers"][0]["command"] = python(
        "import sys; sys.exit(2)"
    )
    emulator.put("deployments", crashing)

    await until(
        lambda: any(container(p).get("restartCount", 0) >= 2 for p in pods_of(emulator, "model=x"))
    )
    (pod,) = pods_of(emulator, "model=x")
    assert container(pod)["lastState"]["terminated"]["exitCode"] == 2
    assert rollout(emulator) == "waiting"


def test_the_shim_is_importable_without_a_kubelet() -> None:
    """A process started outside the kubelet is not changed by the shim's presence."""
    shim = Path(__file__).parents[1] / "kube" / "shim"
    code = "import socket; print(socket.getaddrinfo.__module__)"
    shown = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(shim)}, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    assert shown.stdout.strip() == "socket"
