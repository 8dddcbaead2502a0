"""A kubelet and the controllers for the API emulator: the pods of Jobs and Deployments run as
real local processes (test-only).

Attached to a :class:`~tests.kube.emulator.KubeEmulator` in the same event loop, it plays:

- the **Job controller**: one pod per completion index for an Indexed Job (hostname
  ``<job>-<index>``, the template's subdomain, the index as label, annotation and
  ``JOB_COMPLETION_INDEX``), a replacement for a failed pod until ``backoffLimit``, then the Job
  Failed (BackoffLimitExceeded) with its other pods stopped; Complete once every index
  succeeded; the counts (active, ready, succeeded, failed) in its status;
- the **Deployment and ReplicaSet controllers**: a ReplicaSet per pod template (labelled with
  its hash), rolling updates within ``maxSurge``/``maxUnavailable``, unhealthy old pods cleaned
  up first, the rollout's status (observedGeneration, updated, ready and available replicas)
  and its ``Progressing`` condition, ``ProgressDeadlineExceeded`` when it stalls;
- the **kubelet**: each pod gets its own loopback address (127.0.0.x) and runs its one
  container as a process: its command and args (``python`` is this interpreter, ``$(VAR)``
  expanded), its env (values, ``fieldRef`` for the pod's name, namespace, IP, labels and
  annotations, Secret and ConfigMap keys), its volumes mapped to local folders (a PVC to the
  folder given for its claim, an emptyDir to a folder of the pod, Secrets and ConfigMaps to
  files; a mount path in the command, args or env becomes its folder; ``/tmp`` is ``TMPDIR``),
  and cluster DNS (pods' ``<hostname>.<subdomain>.<ns>.svc`` names behind a Service of that
  name, Services' names resolving to their endpoints) through ``shim/sitecustomize.py`` on its
  PYTHONPATH; readiness probes (httpGet, tcpSocket) polled; phases, conditions, container
  states, restarts and exit codes (128 + signal) reported; restarts per ``restartPolicy``;
  image pulls that take time or fail (``ErrImagePull``, then ``ImagePullBackOff``); a deleted
  pod's process stopped (SIGTERM, SIGKILL after the grace period) before the pod goes.

Not emulated: scheduling (every pod fits), liveness probes, init containers and pods with more
than one container, resource limits, ``ttlSecondsAfterFinished``. A Service's name resolves to
its endpoints' addresses (no virtual IP), so its port must be the pods' port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.kube.emulator import KubeEmulator, matches, now, running_emulator

Object = dict[str, Any]
ROOT = Path(__file__).parents[2]
SHIM = Path(__file__).parent / "shim"
INDEX = "batch.kubernetes.io/job-completion-index"
HASH = "pod-template-hash"
TICK_S = 0.25
"""How often timers (progress deadlines, probes' turns) are looked at."""


@dataclass(frozen=True)
class Image:
    """How pulling an image goes."""

    pull_delay_s: float = 0.0
    """Each pull takes this long (the container waits in ContainerCreating)."""
    pull_failures: int = 0
    """Pulls that fail before one succeeds; -1: every pull fails."""
    pull_error: str = "rpc error: code = NotFound desc = failed to pull and unpack image"


class ConfigError(Exception):
    """A container cannot be configured (CreateContainerConfigError)."""


@dataclass
class _Running:
    """The kubelet's side of one pod."""

    name: str
    uid: str
    ip: str
    folder: Path
    task: asyncio.Task[None] | None = None
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    stopping: bool = False
    logs: list[Path] = field(default_factory=list)


def _owner(obj: Object) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller", True):
            return str(ref["uid"])
    return None


def _owned_by(owner: Object) -> dict[str, Any]:
    metadata = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", "v1"),
        "kind": owner.get("kind", ""),
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _condition(kind: str, status: str, reason: str = "", message: str = "") -> Object:
    """A condition; ``status`` as the API writes it ("True", "False"; ``str(flag)``)."""
    condition: Object = {"type": kind, "status": status}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def _pod_ready(pod: Object) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _terminal(pod: Object) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _deleting(obj: Object) -> bool:
    return "deletionTimestamp" in obj["metadata"]


def _same_status(old: Object | None, new: Object) -> bool:
    return json.dumps(old or {}, sort_keys=True) == json.dumps(new, sort_keys=True)


def template_hash(template: Object) -> str:
    text = json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _int_or_percent(value: Any, total: int, *, up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        share = total * int(value[:-1]) / 100
        return math.ceil(share) if up else math.floor(share)
    return int(value)


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` references (``$$`` escapes one), unknown ones left as written."""

    def one(match: re.Match[str]) -> str:
        if match.group(0).startswith("$$"):
            return match.group(0)[1:]
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$\(|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def path_mapper(mounts: Mapping[str, str]) -> Any:
    """A function that rewrites each mount path in a string to its local folder (the longest
    mount first, whole path components only)."""
    if not mounts:
        return lambda text: text
    ordered = sorted((m.rstrip("/") or "/" for m in mounts), key=len, reverse=True)
    local = {m.rstrip("/") or "/": v for m, v in mounts.items()}
    pattern = re.compile(
        r"(?<![\w.-])(" + "|".join(re.escape(m) for m in ordered) + r")(?=/|$|[\"'\s:,;])"
    )
    return lambda text: pattern.sub(lambda m: local[m.group(1)], text)


class Kubelet:
    """Runs the emulator's pods; see the module's docstring."""

    def __init__(
        self,
        emulator: KubeEmulator,
        root: Path,
        *,
        claims: Mapping[str, Path] | None = None,
        secrets: Mapping[str, Mapping[str, str]] | None = None,
        config_maps: Mapping[str, Mapping[str, str]] | None = None,
        images: Mapping[str, Image] | None = None,
        python_path: tuple[Path, ...] = (ROOT,),
        probe_period_s: float | None = 0.2,
        grace_s: float = 5.0,
        backoff_s: float = 0.5,
    ) -> None:
        self.emulator = emulator
        self.root = root
        self.claims = dict(claims or {})
        self.secrets = {k: dict(v) for k, v in (secrets or {}).items()}
        self.config_maps = {k: dict(v) for k, v in (config_maps or {}).items()}
        self.images = dict(images or {})
        self.python_path = python_path
        self.probe_period_s = probe_period_s
        """Probes run this often, whatever their periodSeconds (None: as the pod says)."""
        self.grace_s = grace_s
        """The longest a stopping container gets before SIGKILL."""
        self.backoff_s = backoff_s
        self.pulls: dict[str, int] = {}
        """Pulls tried per image."""
        self._pulled: set[str] = set()
        self._pods: dict[str, _Running] = {}
        self._addresses = (f"127.0.{n // 250}.{n % 250 + 2}" for n in range(1, 60000))
        self._progress: dict[str, tuple[str, datetime]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._hosts: dict[str, list[str]] = {}
        self.hosts_file = root / "hosts.json"

    # --- what tests use ----------------------------------------------------------------------

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.hosts_file.write_text("{}")
        self.emulator.graceful_pods = True
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="kubelet")

    async def stop(self) -> None:
        """Stop every process (the cluster goes away with the test)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for running in list(self._pods.values()):
            await self._stop_process(running, grace_s=0)
            if running.task is not None:
                running.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running.task
        self.emulator.graceful_pods = False

    def address(self, pod: str) -> str:
        return self._pods[pod].ip

    def resolve(self, host: str) -> list[str]:
        """What cluster DNS answers for ``host`` now (empty: no such name)."""
        return list(self._hosts.get(host.rstrip(".").lower(), []))

    def log(self, pod: str, *, previous: bool = False) -> str:
        """The output of the pod's container (``previous``: of the run before the last)."""
        logs = self._pods[pod].logs
        chosen = logs[-2] if previous else logs[-1]
        return chosen.read_text(errors="replace")

    def kill(self, pod: str, sig: int = signal.SIGKILL) -> None:
        """Signal the pod's container, as the OOM killer or a crashing node would."""
        process = self._pods[pod].process
        if process is not None and process.returncode is None:
            os.killpg(process.pid, sig)

    def forget_images(self) -> None:
        """Clear the node's image cache (pods landing on a fresh node): the next pod of each
        image pulls it again, as :attr:`images` says that goes."""
        self._pulled.clear()

    def processes(self) -> list[int]:
        """The process ids of the containers running now."""
        return [
            r.process.pid
            for r in self._pods.values()
            if r.process is not None and r.process.returncode is None
        ]

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        queue = self.emulator.subscribe()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK_S):
                        await queue.get()
                while not queue.empty():
                    queue.get_nowait()
                self.reconcile()
        finally:
            self.emulator.unsubscribe(queue)

    def reconcile(self) -> None:
        """Every controller once over what the API holds now."""
        for namespace in {ns for (_, ns, _) in self.emulator.objects}:
            for job in self.emulator.list("jobs", namespace):
                self._job(job)
            for deployment in self.emulator.list("deployments", namespace):
                self._deployment(deployment)
            for replica_set in self.emulator.list("replicasets", namespace):
                self._replica_set(replica_set)
            for pod in self.emulator.list("pods", namespace):
                self._pod(pod)
        for name in [n for n in self._pods if not self._exists(n)]:
            running = self._pods.pop(name)  # removed without a graceful delete
            asyncio.get_running_loop().create_task(self._stop_process(running, grace_s=0))
        self._write_hosts()

    def _exists(self, pod: str) -> bool:
        return any(p == "pods" and n == pod for (p, _, n) in self.emulator.objects)

    def _owned(self, plural: str, owner: Object) -> list[Object]:
        uid = owner["metadata"]["uid"]
        namespace = owner["metadata"]["namespace"]
        return [o for o in self.emulator.list(plural, namespace) if _owner(o) == uid]

    def _put_status(self, plural: str, obj: Object, status: Object) -> None:
        metadata = obj["metadata"]
        current = self.emulator.get(plural, metadata["name"], metadata["namespace"])
        if current is not None and not _same_status(current.get("status"), status):
            self.emulator.set_status(plural, metadata["name"], status, metadata["namespace"])

    # --- the Job controller ------------------------------------------------------------------

    def _job(self, job: Object) -> None:
        if _deleting(job):
            return
        spec = job["spec"]
        status = dict(job.get("status") or {})
        conditions = {c["type"] for c in status.get("conditions") or []}
        pods = self._owned("pods", job)
        failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        succeeded = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
        active = [p for p in pods if not _terminal(p) and not _deleting(p)]
        completions = int(spec.get("completions", 1))
        indexed = spec.get("completionMode") == "Indexed"
        if not conditions & {"Complete", "Failed"}:
            if len(failed) > int(spec.get("backoffLimit", 6)):
                for pod in active:
                    self.emulator.delete(
                        "pods", pod["metadata"]["name"], pod["metadata"]["namespace"]
                    )
                status["conditions"] = [
                    {
                        **_condition("Failed", "True", "BackoffLimitExceeded",
                            "Job has reached the specified backoff limit",
                        ),
                        "lastTransitionTime": now(),
                    }
                ]  # fmt: skip
                active = []
            elif len(succeeded) >= completions or (
                indexed and len({self._index(p) for p in succeeded}) >= completions
            ):
                status["conditions"] = [
                    {**_condition("SuccessCriteriaMet", "True"), "lastTransitionTime": now()},
                    {**_condition("Complete", "True"), "lastTransitionTime": now()},
                ]
                status["completionTime"] = now()
            elif indexed:
                done = {self._index(p) for p in succeeded} | {self._index(p) for p in active}
                for index in range(completions):
                    if index not in done:
                        self._create_job_pod(job, index)
            else:
                wanted = min(int(spec.get("parallelism", 1)), completions - len(succeeded))
                for _ in range(wanted - len(active)):
                    self._create_job_pod(job, None)
        pods = self._owned("pods", job)
        active = [p for p in pods if not _terminal(p)]
        status.update(
            active=len(active),
            ready=sum(1 for p in active if _pod_ready(p)),
            succeeded=len(succeeded),
            failed=len(failed),
        )
        status.setdefault("startTime", now())
        self._put_status("jobs", job, status)

    @staticmethod
    def _index(pod: Object) -> int:
        return int(pod["metadata"]["labels"].get(INDEX, -1))

    def _create_job_pod(self, job: Object, index: int | None) -> None:
        metadata = job["metadata"]
        template = json.loads(json.dumps(job["spec"]["template"]))
        labels = {
            **(template.get("metadata", {}).get("labels") or {}),
            "batch.kubernetes.io/controller-uid": metadata["uid"],
            "batch.kubernetes.io/job-name": metadata["name"],
            "controller-uid": metadata["uid"],
            "job-name": metadata["name"],
        }
        annotations = dict(template.get("metadata", {}).get("annotations") or {})
        spec = template["spec"]
        base = metadata["name"]
        if index is not None:
            labels[INDEX] = annotations[INDEX] = str(index)
            spec["hostname"] = f"{metadata['name']}-{index}"
            base = f"{metadata['name']}-{index}"
            for container in spec.get("containers") or []:
                container.setdefault("env", []).append(
                    {
                        "name": "JOB_COMPLETION_INDEX",
                        "valueFrom": {
                            "fieldRef": {"fieldPath": f"metadata.annotations['{INDEX}']"}
                        },
                    }
                )
        self._create_pod(job, base, labels, annotations, spec)

    def _create_pod(
        self, owner: Object, base: str, labels: Object, annotations: Object, spec: Object
    ) -> None:
        self.emulator.put(
            "pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{base}-{uuid.uuid4().hex[:5]}",
                    "namespace": owner["metadata"]["namespace"],
                    "labels": labels,
                    "annotations": annotations,
                    "ownerReferences": [_owned_by(owner)],
                },
                "spec": spec,
                "status": {"phase": "Pending"},
            },
        )

    # --- the Deployment and ReplicaSet controllers -------------------------------------------

    def _deployment(self, deployment: Object) -> None:
        if _deleting(deployment):
            return
        metadata, spec = deployment["metadata"], deployment["spec"]
        wanted = int(spec.get("replicas", 1))
        rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        surge = _int_or_percent(rolling.get("maxSurge", "25%"), wanted, up=True)
        unavailable = _int_or_percent(rolling.get("maxUnavailable", "25%"), wanted, up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        digest = template_hash(spec["template"])
        sets = self._owned("replicasets", deployment)
        new = next((r for r in sets if r["metadata"]["labels"].get(HASH) == digest), None)
        if new is None:
            new = self._create_replica_set(deployment, digest, len(sets) + 1)
        old = [r for r in sets if r["metadata"]["name"] != new["metadata"]["name"]]

        def counts(replica_set: Object) -> tuple[int, int]:
            pods = [p for p in self._owned("pods", replica_set) if not _deleting(p)]
            return len(pods), sum(1 for p in pods if _pod_ready(p))

        new_replicas = int(new["spec"].get("replicas", 0))
        new_pods, new_ready = counts(new)
        old_replicas = sum(int(r["spec"].get("replicas", 0)) for r in old)
        # Scale the new ReplicaSet up within the surge.
        target = min(wanted, max(new_replicas, wanted + surge - old_replicas))
        if target != new_replicas:
            new = self._scale(new, target)
            new_replicas = target
        # Old ReplicaSets: their unhealthy pods first, then as many as stay available allows.
        minimum = wanted - unavailable
        total = new_replicas + old_replicas
        cleanup = max(0, total - minimum - (new_replicas - new_ready))
        sizes = {r["metadata"]["name"]: int(r["spec"].get("replicas", 0)) for r in old}
        ready_of = {r["metadata"]["name"]: counts(r)[1] for r in old}
        for replica_set in old:
            name = replica_set["metadata"]["name"]
            drop = min(cleanup, max(0, sizes[name] - ready_of[name]))
            sizes[name] -= drop
            cleanup -= drop
        old_ready = sum(min(ready_of[n], sizes[n]) for n in sizes)
        removable = max(0, new_ready + old_ready - minimum)
        for name, size in sizes.items():
            drop = min(removable, size)
            sizes[name] = size - drop
            removable -= drop
        for replica_set in old:
            if sizes[replica_set["metadata"]["name"]] != int(
                replica_set["spec"].get("replicas", 0)
            ):
                self._scale(replica_set, sizes[replica_set["metadata"]["name"]])
        all_pods = [
            p
            for r in [new, *old]
            for p in self._owned("pods", r)
            if not _deleting(p) and not _terminal(p)
        ]
        ready = sum(1 for p in all_pods if _pod_ready(p))
        done = new_ready >= wanted and len(all_pods) == new_pods
        marker = f"{digest}:{new_pods}:{new_ready}:{len(all_pods)}"
        previous = self._progress.get(metadata["uid"])
        if previous is None or previous[0] != marker:
            self._progress[metadata["uid"]] = (marker, datetime.now(UTC))
        since = self._progress[metadata["uid"]][1]
        deadline = int(spec.get("progressDeadlineSeconds", 600))
        name = new["metadata"]["name"]
        if done:
            progressing = _condition("Progressing", "True", "NewReplicaSetAvailable",
                f'ReplicaSet "{name}" has successfully progressed.',
            )  # fmt: skip
        elif (datetime.now(UTC) - since).total_seconds() > deadline:
            progressing = _condition("Progressing", "False", "ProgressDeadlineExceeded",
                f'ReplicaSet "{name}" has timed out progressing.',
            )  # fmt: skip
        else:
            progressing = _condition(
                "Progressing", "True", "ReplicaSetUpdated", f'ReplicaSet "{name}" is progressing.'
            )
        enough = ready >= minimum
        available = _condition(
            "Available", str(enough),
            "MinimumReplicasAvailable" if enough else "MinimumReplicasUnavailable",
        )  # fmt: skip
        status = {
            "observedGeneration": metadata.get("generation", 1),
            "replicas": len(all_pods),
            "updatedReplicas": new_pods,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(0, wanted - ready),
            "conditions": [available, progressing],
        }
        self._put_status("deployments", deployment, status)

    def _create_replica_set(self, deployment: Object, digest: str, revision: int) -> Object:
        template = json.loads(json.dumps(deployment["spec"]["template"]))
        template.setdefault("metadata", {}).setdefault("labels", {})[HASH] = digest
        selector = dict((deployment["spec"].get("selector") or {}).get("matchLabels") or {})
        return self.emulator.put(
            "replicasets",
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": f"{deployment['metadata']['name']}-{digest}",
                    "namespace": deployment["metadata"]["namespace"],
                    "labels": dict(template["metadata"]["labels"]),
                    "annotations": {"deployment.kubernetes.io/revision": str(revision)},
                    "ownerReferences": [_owned_by(deployment)],
                },
                "spec": {
                    "replicas": 0,
                    "selector": {"matchLabels": {**selector, HASH: digest}},
                    "template": template,
                },
                "status": {"replicas": 0},
            },
        )

    def _scale(self, replica_set: Object, replicas: int) -> Object:
        changed = json.loads(json.dumps(replica_set))
        changed["spec"]["replicas"] = replicas
        changed["metadata"]["generation"] = replica_set["metadata"].get("generation", 1) + 1
        return self.emulator.put("replicasets", changed)

    def _replica_set(self, replica_set: Object) -> None:
        if _deleting(replica_set):
            return
        pods = [
            p for p in self._owned("pods", replica_set) if not _deleting(p) and not _terminal(p)
        ]
        wanted = int(replica_set["spec"].get("replicas", 0))
        template = replica_set["spec"]["template"]
        for _ in range(wanted - len(pods)):
            self._create_pod(
                replica_set,
                replica_set["metadata"]["name"],
                dict(template["metadata"].get("labels") or {}),
                dict(template["metadata"].get("annotations") or {}),
                json.loads(json.dumps(template["spec"])),
            )
        # Too many: the not-ready ones go first, then the youngest.
        extra = sorted(pods, key=lambda p: (_pod_ready(p), p["metadata"]["creationTimestamp"]))
        for pod in extra[: max(0, len(pods) - wanted)]:
            self.emulator.delete("pods", pod["metadata"]["name"], pod["metadata"]["namespace"])
        pods = [p for p in self._owned("pods", replica_set) if not _deleting(p)]
        ready = sum(1 for p in pods if _pod_ready(p))
        status = {
            "replicas": len(pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "observedGeneration": replica_set["metadata"].get("generation", 1),
        }
        self._put_status("replicasets", replica_set, status)

    # --- the kubelet -------------------------------------------------------------------------

    def _pod(self, pod: Object) -> None:
        name = pod["metadata"]["name"]
        running = self._pods.get(name)
        if running is None or running.uid != pod["metadata"]["uid"]:
            if _deleting(pod) or _terminal(pod):
                if _deleting(pod):  # never started here: nothing to stop
                    self.emulator.remove("pods", name, pod["metadata"]["namespace"])
                return
            folder = self.root / "pods" / f"{name}-{pod['metadata']['uid'][:8]}"
            running = _Running(name, pod["metadata"]["uid"], next(self._addresses), folder)
            self._pods[name] = running
            running.task = asyncio.get_running_loop().create_task(
                self._lifecycle(running, pod), name=f"pod:{name}"
            )
        elif _deleting(pod) and not running.stopping:
            running.stopping = True
            asyncio.get_running_loop().create_task(self._terminate(running, pod))

    async def _terminate(self, running: _Running, pod: Object) -> None:
        grace = int(pod["metadata"].get("deletionGracePeriodSeconds", 30))
        await self._stop_process(running, grace_s=min(grace, self.grace_s))
        if running.task is not None:
            running.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running.task
        if self._pods.get(running.name) is running:
            del self._pods[running.name]
        if self._exists(running.name):
            self.emulator.remove("pods", running.name, pod["metadata"]["namespace"])

    async def _stop_process(self, running: _Running, *, grace_s: float) -> None:
        running.stopping = True
        process = running.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
        try:
            async with asyncio.timeout(grace_s if grace_s > 0 else None):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()

    def _status(self, running: _Running, pod: Object, phase: str, container: Object) -> None:
        namespace = pod["metadata"]["namespace"]
        current = self.emulator.get("pods", running.name, namespace)
        if current is None or current["metadata"]["uid"] != running.uid:
            return
        started = (current.get("status") or {}).get("startTime") or now()
        ready = running.ready and "running" in container["state"]
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": running.ip,
            "podIPs": [{"ip": running.ip}],
            "startTime": started,
            "conditions": [
                _condition("PodScheduled", "True"),
                _condition("Initialized", "True"),
                _condition("ContainersReady", str(ready)),
                _condition("Ready", str(ready)),
            ],
            "containerStatuses": [{**container, "ready": ready, "restartCount": running.restarts}],
        }
        self._put_status("pods", current, status)

    async def _lifecycle(self, running: _Running, pod: Object) -> None:
        spec = pod["spec"]
        containers = spec.get("containers") or []
        base = {"name": containers[0]["name"] if containers else "?", "image": "", "started": False}
        if len(containers) != 1:
            waiting = {"reason": "CreateContainerError", "message": "one container per pod here"}
            self._status(running, pod, "Pending", {**base, "state": {"waiting": waiting}})
            return
        container = containers[0]
        base["image"] = container.get("image", "")
        self._status(
            running, pod, "Pending", {**base, "state": {"waiting": {"reason": "ContainerCreating"}}}
        )
        while True:  # a volume's source may appear later: the kubelet keeps trying
            try:
                mounts = self._volumes(running, pod)
                break
            except ConfigError as exc:
                message = f"MountVolume.SetUp failed: {exc}"
                waiting = {"reason": "ContainerCreating", "message": message}
                self._status(running, pod, "Pending", {**base, "state": {"waiting": waiting}})
                await asyncio.sleep(self.backoff_s)
        await self._pull(running, pod, container, base)
        policy = spec.get("restartPolicy", "Always")
        last: Object = {}
        while True:
            try:
                argv, env, cwd = self._command(running, pod, container, mounts)
            except ConfigError as exc:
                waiting = {"reason": "CreateContainerConfigError", "message": str(exc)}
                self._status(running, pod, "Pending", {**base, "state": {"waiting": waiting}})
                await asyncio.sleep(self.backoff_s)
                continue
            code, terminated = await self._run_container(
                running, pod=pod, container=container, base=base, argv=argv, env=env, cwd=cwd
            )
            last = {"terminated": terminated}
            if running.stopping:
                return
            restart = policy == "Always" or (policy == "OnFailure" and code != 0)
            if not restart:
                phase = "Succeeded" if code == 0 else "Failed"
                self._status(running, pod, phase, {**base, "state": last})
                return
            running.restarts += 1
            waiting = {
                "reason": "CrashLoopBackOff",
                "message": f"back-off restarting {base['name']}",
            }
            self._status(
                running, pod, "Running", {**base, "state": {"waiting": waiting}, "lastState": last}
            )
            await asyncio.sleep(self.backoff_s * min(running.restarts, 10))

    async def _pull(self, running: _Running, pod: Object, container: Object, base: Object) -> None:
        image = container.get("image", "")
        how = self.images.get(image, Image())
        always = container.get("imagePullPolicy", "IfNotPresent") == "Always"
        while always or image not in self._pulled:
            tried = self.pulls.get(image, 0)
            self.pulls[image] = tried + 1
            if how.pull_delay_s:
                await asyncio.sleep(how.pull_delay_s)
            if how.pull_failures < 0 or tried < how.pull_failures:
                message = f'Failed to pull image "{image}": {how.pull_error}'
                waiting = {"reason": "ErrImagePull", "message": message}
                self._status(running, pod, "Pending", {**base, "state": {"waiting": waiting}})
                await asyncio.sleep(self.backoff_s)
                waiting = {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{image}"',
                }
                self._status(running, pod, "Pending", {**base, "state": {"waiting": waiting}})
                await asyncio.sleep(self.backoff_s)
                continue
            self._pulled.add(image)
            return

    def _volumes(self, running: _Running, pod: Object) -> dict[str, str]:
        """mountPath -> local folder, for the pod's one container."""
        folders: dict[str, Path] = {}
        namespace = pod["metadata"]["namespace"]
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if claim not in self.claims:
                    raise ConfigError(f'persistentvolumeclaim "{claim}" not found')
                folders[name] = self.claims[claim]
            elif "secret" in volume or "configMap" in volume:
                kind = "secret" if "secret" in volume else "configMap"
                source = volume[kind]
                ref = source.get("secretName") or source.get("name", "")
                data = (self.secrets if kind == "secret" else self.config_maps).get(ref)
                if data is None:
                    what = "secret" if kind == "secret" else "configmap"
                    raise ConfigError(f'{what} "{ref}" not found in {namespace}')
                folder = running.folder / "volumes" / name
                folder.mkdir(parents=True, exist_ok=True)
                for key, value in data.items():
                    (folder / key).write_text(value)
                folders[name] = folder
            else:  # emptyDir and anything else: a folder of the pod's own
                folders[name] = running.folder / "volumes" / name
                folders[name].mkdir(parents=True, exist_ok=True)
        container = pod["spec"]["containers"][0]
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in folders:
                raise ConfigError(f"volume {mount['name']} is not among the pod's volumes")
            mounts[mount["mountPath"]] = str(folders[mount["name"]])
        return mounts

    def _field(self, pod: Object, running: _Running, path: str) -> str:
        metadata = pod["metadata"]
        simple = {
            "metadata.name": metadata["name"],
            "metadata.namespace": metadata["namespace"],
            "metadata.uid": metadata["uid"],
            "status.podIP": running.ip,
            "status.hostIP": "127.0.0.1",
            "spec.nodeName": "kubelet",
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        }
        if path in simple:
            return str(simple[path])
        found = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if found:
            return str((metadata.get(found.group(1)) or {}).get(found.group(2), ""))
        raise ConfigError(f"unsupported fieldRef {path}")

    def _command(
        self, running: _Running, pod: Object, container: Object, mounts: Mapping[str, str]
    ) -> tuple[list[str], dict[str, str], str]:
        translate = path_mapper(mounts)
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for variable in container.get("env") or []:
            source = variable.get("valueFrom")
            if source is None:
                env[variable["name"]] = expand(str(variable.get("value", "")), env)
                continue
            if "fieldRef" in source:
                env[variable["name"]] = self._field(pod, running, source["fieldRef"]["fieldPath"])
                continue
            kind = "secretKeyRef" if "secretKeyRef" in source else "configMapKeyRef"
            ref = source[kind]
            store = self.secrets if kind == "secretKeyRef" else self.config_maps
            what = "secret" if kind == "secretKeyRef" else "configmap"
            data = store.get(ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                if data is None:
                    raise ConfigError(f'{what} "{ref["name"]}" not found')
                raise ConfigError(
                    f"couldn't find key {ref['key']} in {what} {namespace}/{ref['name']}"
                )
            env[variable["name"]] = data[ref["key"]]
        env = {k: translate(v) for k, v in env.items()}
        command = [expand(translate(str(a)), env) for a in container.get("command") or []]
        args = [expand(translate(str(a)), env) for a in container.get("args") or []]
        argv = command + args
        if not argv:
            raise ConfigError("no command specified (this kubelet knows no image's entrypoint)")
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
        process_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(running.folder / "home"),
            "HOSTNAME": hostname,
            "PYTHONPATH": os.pathsep.join(str(p) for p in (SHIM, *self.python_path)),
            "TORCHRELAY_KUBELET_HOSTS": str(self.hosts_file),
            "TORCHRELAY_KUBELET_POD_IP": running.ip,
            **env,
        }
        if "/tmp" in mounts:  # noqa: S108 - the pod's /tmp is its emptyDir
            process_env["TMPDIR"] = mounts["/tmp"]  # noqa: S108
        (running.folder / "home").mkdir(parents=True, exist_ok=True)
        working = container.get("workingDir")
        cwd = translate(working) if working else str(running.folder)
        return argv, process_env, cwd

    async def _run_container(
        self,
        running: _Running,
        *,
        pod: Object,
        container: Object,
        base: Object,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
    ) -> tuple[int, Object]:
        log = running.folder / f"{base['name']}-{running.restarts}.log"
        running.logs.append(log)
        started = now()
        try:
            with log.open("wb") as output:
                running.process = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    cwd=cwd,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as exc:
            terminated = {"exitCode": 128, "reason": "StartError", "message": str(exc)}
            return 128, {**terminated, "startedAt": started, "finishedAt": now()}
        running.ready = False
        state = {"running": {"startedAt": started}}
        self._status(running, pod, "Running", {**base, "started": True, "state": state})
        probing = asyncio.get_running_loop().create_task(
            self._probe(running, pod, container, {**base, "started": True, "state": state})
        )
        try:
            code = await running.process.wait()
        finally:
            probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probing
        running.ready = False
        exit_code = 128 - code if code < 0 else code
        terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": started,
            "finishedAt": now(),
        }
        return exit_code, terminated

    async def _probe(
        self, running: _Running, pod: Object, container: Object, shown: Object
    ) -> None:
        probe = container.get("readinessProbe")
        if probe is None:
            running.ready = True
            self._status(running, pod, "Running", shown)
            return
        period = self.probe_period_s or float(probe.get("periodSeconds", 10))
        delay = float(probe.get("initialDelaySeconds", 0))
        await asyncio.sleep(min(delay, period) if self.probe_period_s else delay)
        failures = 0
        while True:
            ok = await self._check(running, container, probe)
            failures = 0 if ok else failures + 1
            ready = ok or (running.ready and failures < int(probe.get("failureThreshold", 3)))
            if ready != running.ready:
                running.ready = ready
                self._status(running, pod, "Running", shown)
            await asyncio.sleep(period)

    async def _check(self, running: _Running, container: Object, probe: Object) -> bool:
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
        how = probe.get("httpGet") or probe.get("tcpSocket")
        if how is None:
            return False  # exec probes are not emulated
        port = ports.get(how["port"], how["port"])
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(running.ip, int(port))
                try:
                    if "httpGet" not in probe:
                        return True
                    path = how.get("path", "/")
                    writer.write(f"GET {path} HTTP/1.0\r\nHost: {running.ip}\r\n\r\n".encode())
                    await writer.drain()
                    line = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError, ValueError):
            return False
        parts = line.split()
        return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400

    # --- cluster DNS -------------------------------------------------------------------------

    def _write_hosts(self) -> None:
        hosts: dict[str, list[str]] = {}
        pods = {
            name: pod
            for (plural, _, name), pod in self.emulator.objects.items()
            if plural == "pods" and name in self._pods and not _terminal(pod) and not _deleting(pod)
        }
        for (plural, namespace, name), service in sorted(self.emulator.objects.items()):
            if plural != "services":
                continue
            selector = (service.get("spec") or {}).get("selector") or {}
            unready = bool((service.get("spec") or {}).get("publishNotReadyAddresses"))
            wanted = ",".join(f"{k}={v}" for k, v in selector.items())
            endpoints = sorted(
                (
                    pod
                    for pod in pods.values()
                    if pod["metadata"]["namespace"] == namespace
                    and selector
                    and matches(pod["metadata"].get("labels") or {}, wanted)
                    and (unready or _pod_ready(pod))
                ),
                key=lambda p: p["metadata"]["name"],
            )
            addresses = [self._pods[p["metadata"]["name"]].ip for p in endpoints]
            for suffix in (
                "",
                f".{namespace}",
                f".{namespace}.svc",
                f".{namespace}.svc.cluster.local",
            ):
                if addresses:
                    hosts[f"{name}{suffix}"] = addresses
            for pod in endpoints:
                spec = pod["spec"]
                if spec.get("hostname") and spec.get("subdomain") == name:
                    ip = self._pods[pod["metadata"]["name"]].ip
                    for suffix in (
                        "",
                        f".{namespace}",
                        f".{namespace}.svc",
                        f".{namespace}.svc.cluster.local",
                    ):
                        hosts[f"{spec['hostname']}.{name}{suffix}"] = [ip]
        if hosts != self._hosts:
            self._hosts = hosts
            partial = self.hosts_file.with_suffix(".partial")
            partial.write_text(json.dumps(hosts, indent=1, sort_keys=True))
            partial.replace(self.hosts_file)


@contextlib.asynccontextmanager
async def running_cluster(
    root: Path, **options: Any
) -> AsyncIterator[tuple[KubeEmulator, Kubelet]]:
    """An API emulator with a kubelet attached; ``options`` go to :class:`Kubelet`."""
    async with running_emulator() as emulator:
        kubelet = Kubelet(emulator, root, **options)
        await kubelet.start()
        try:
            yield emulator, kubelet
        finally:
            await kubelet.stop()
