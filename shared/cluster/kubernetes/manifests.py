"""Kubernetes objects for a training attempt and for a served model, as plain dicts (what the
API takes and returns). Pure: same input, same objects."""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

from torchrelay.shared.bus.principals import WORKER, inbox_prefix
from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.port import WorkerJob
from torchrelay.shared.cluster.worker_spec import WORKER_ENV, WorkerSpec
from torchrelay.shared.storage.layout import relative_model

Object = dict[str, Any]
GROUP = "torchrelay.io"
RUN_LABEL = f"{GROUP}/run"
ATTEMPT_LABEL = f"{GROUP}/attempt"
MODEL_LABEL = f"{GROUP}/model"
VERSION_LABEL = f"{GROUP}/version"
RUN_ID_ANNOTATION = f"{GROUP}/run-id"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
WORKER_MODULE = "torchrelay.services.train.worker"
SERVER_MODULE = "torchrelay.services.serve.server"
VERSION_ANNOTATION = f"{GROUP}/version"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - a pod's server answers its Service
GPU = "nvidia.com/gpu"


def _digest(text: str, length: int = 10) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def job_name(run_id: str, attempt: int) -> str:
    """A DNS label for one attempt: readable prefix, a hash of the run id, the attempt.
    Short enough that ``<name>-<index>`` (the pods' host names) stays a DNS label too."""
    readable = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:30].rstrip("-")
    return f"{readable or 'run'}-{_digest(run_id)}-a{attempt}"


def run_label(run_id: str) -> str:
    return _digest(run_id, 16)


def _common_labels(component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "torchrelay",
        "app.kubernetes.io/part-of": "torchrelay",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "torchrelay",
    }


def attempt_selector(run_id: str, attempt: int) -> str:
    return f"{RUN_LABEL}={run_label(run_id)},{ATTEMPT_LABEL}={attempt}"


def _security(options: KubeOptions) -> tuple[Object, Object]:
    pod = {
        "runAsNonRoot": True,
        "runAsUser": options.run_as_user,
        "runAsGroup": options.run_as_user,
        "fsGroup": options.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    return pod, container


def _volumes(options: KubeOptions, mount: str, *, shm: bool) -> tuple[list[Object], list[Object]]:
    volumes: list[Object] = [
        {"name": "storage", "persistentVolumeClaim": {"claimName": options.storage_claim}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[Object] = [
        {"name": "storage", "mountPath": mount},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a pod-private emptyDir
    ]
    if shm:  # NCCL and data loader workers share memory through /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})  # noqa: S108 - emptyDir
    return volumes, mounts


def training_job(job: WorkerJob, options: KubeOptions) -> Object:
    """One attempt as an Indexed Job: one pod per rank, the rank from the completion index,
    rendezvous at rank 0's stable DNS name through the headless Service of the same name."""
    spec = job.job
    name = job_name(job.run_id, job.attempt)
    gpu = spec.resources.gpu
    worker = WorkerSpec(
        run_id=job.run_id,
        attempt=job.attempt,
        rank=0,  # each pod's rank is its JOB_COMPLETION_INDEX
        world_size=spec.world_size,
        rendezvous=(f"tcp://{name}-0.{name}.{options.namespace}.svc:{options.rendezvous_port}"),
        backend="nccl" if gpu > 0 else "gloo",
        job=spec,
        storage_root=job.storage_root,
        dataset_path=job.dataset_path,
        nats_url=job.nats_url,
        pipeline_id=job.pipeline_id,
        rendezvous_timeout_s=job.rendezvous_timeout_s,
        collective_timeout_s=job.collective_timeout_s,
    )
    labels = {
        **_common_labels("training"),
        RUN_LABEL: run_label(job.run_id),
        ATTEMPT_LABEL: str(job.attempt),
    }
    job_labels = dict(labels)
    if options.queue:
        job_labels[options.queue_label] = options.queue
    requests = {"cpu": f"{spec.resources.cpu:g}", "memory": f"{spec.resources.memory_mb}Mi"}
    limits: dict[str, str] = {"memory": f"{spec.resources.memory_mb}Mi"}
    if gpu:
        requests[GPU] = limits[GPU] = str(gpu)
    pod_security, container_security = _security(options)
    volumes, mounts = _volumes(options, job.storage_root, shm=True)
    placement = spec.placement
    pod: Object = {
        "restartPolicy": "Never",
        "subdomain": name,
        "serviceAccountName": options.workload_service_account,
        "automountServiceAccountToken": False,
        "securityContext": pod_security,
        "containers": [
            {
                "name": "worker",
                # A stage's own image (its dependencies), else the platform's worker image.
                "image": spec.image or options.worker_image,
                "imagePullPolicy": options.image_pull_policy,
                "command": ["python", "-m", WORKER_MODULE],
                "env": [
                    {"name": WORKER_ENV, "value": worker.model_dump_json()},
                    {
                        "name": "OMP_NUM_THREADS",
                        "value": str(max(1, math.ceil(spec.resources.cpu))),
                    },
                    *_worker_nats_env(options),
                ],
                "ports": [{"name": "rendezvous", "containerPort": options.rendezvous_port}],
                "resources": {"requests": requests, "limits": limits},
                "securityContext": container_security,
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    if options.scheduler_name:
        pod["schedulerName"] = options.scheduler_name
    # The pool's defaults (GPU or CPU nodes), then the job's own placement on top.
    pool = options.gpu_node_selector if gpu else options.cpu_node_selector
    if selector := {**pool, **placement.node_selector}:
        pod["nodeSelector"] = selector
    tolerations = [_toleration(t.model_dump()) for t in placement.tolerations]
    for default in options.gpu_tolerations if gpu else []:
        if default not in tolerations:
            tolerations.append(dict(default))
    if tolerations:
        pod["tolerations"] = tolerations
    if placement.affinity:
        pod["affinity"] = placement.affinity
    if placement.priority_class:
        pod["priorityClassName"] = placement.priority_class
    annotations = {RUN_ID_ANNOTATION: job.run_id}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": options.namespace,
            "labels": job_labels,
            "annotations": annotations,
        },
        "spec": {
            "completionMode": "Indexed",
            "completions": spec.world_size,
            "parallelism": spec.world_size,
            # A failed rank fails the attempt; restarts are the monitor's, from a checkpoint.
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": options.ttl_after_finished_s,
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod,
            },
        },
    }


def _toleration(raw: Object) -> Object:
    keys = {"toleration_seconds": "tolerationSeconds"}
    return {keys.get(k, k): v for k, v in raw.items() if v is not None}


def rendezvous_service(job: Object, job_uid: str) -> Object:
    """The headless Service that gives each rank a stable DNS name; owned by the Job, so
    deleting the Job removes it."""
    metadata = job["metadata"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "labels": labels,
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": metadata["name"],
                    "uid": job_uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "clusterIP": "None",
            # Rank 0 must be resolvable before any rank is ready: that is the rendezvous.
            "publishNotReadyAddresses": True,
            "selector": {RUN_LABEL: labels[RUN_LABEL], ATTEMPT_LABEL: labels[ATTEMPT_LABEL]},
            "ports": [
                {
                    "name": "rendezvous",
                    "port": job["spec"]["template"]["spec"]["containers"][0]["ports"][0][
                        "containerPort"
                    ],
                }
            ],
        },
    }


# --- serving ----------------------------------------------------------------------------------


def model_object_name(model: str) -> str:
    """The Deployment's and Service's name: the model's own (a DNS label already), prefixed."""
    name = f"model-{model}"
    return name if len(name) <= 63 else f"model-{model[:45].rstrip('-')}-{_digest(model)}"


def version_label(version: str) -> str:
    """Versions may be 64 characters; label values at most 63."""
    return version if len(version) <= 63 else f"{version[:50]}-{_digest(version, 12)}"


def model_selector(model: str) -> str:
    return f"{MODEL_LABEL}={model},app.kubernetes.io/component=model-server"


def model_deployment(
    model: str,
    version: str,
    replicas: int,
    *,
    options: KubeOptions,
    storage_root: str,
    server_args: list[str],
    progress_deadline_s: int,
) -> Object:
    """A model's Deployment serving ``version``: rolling updates that never drop below the
    wanted replicas (maxUnavailable 0), gated on the server's readiness."""
    name = model_object_name(model)
    selector = {MODEL_LABEL: model, "app.kubernetes.io/component": "model-server"}
    labels = {**_common_labels("model-server"), **selector}
    pod_labels = {**labels, VERSION_LABEL: version_label(version)}
    pod_security, container_security = _security(options)
    volumes, mounts = _volumes(options, storage_root, shm=False)
    mounts[0]["readOnly"] = True  # servers only read the model
    model_dir = f"{storage_root.rstrip('/')}/{relative_model(model, version)}"
    port = options.server_port
    threads = str(max(1, math.ceil(options.server_cpu)))
    container: Object = {
        "name": "server",
        "image": options.server_image,
        "imagePullPolicy": options.image_pull_policy,
        "command": ["python", "-m", SERVER_MODULE],
        "args": [
            "--model-dir",
            model_dir,
            "--host",
            ALL_INTERFACES,
            "--port",
            str(port),
            *server_args,
        ],
        "env": [{"name": "OMP_NUM_THREADS", "value": threads}],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": "http"},
            "periodSeconds": 5,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 10,
            "initialDelaySeconds": 10,
        },
        "resources": {
            "requests": {
                "cpu": f"{options.server_cpu:g}",
                "memory": f"{options.server_memory_mb}Mi",
            },
            "limits": {"memory": f"{options.server_memory_mb}Mi"},
        },
        "securityContext": container_security,
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "progressDeadlineSeconds": max(progress_deadline_s, 1),
            "revisionHistoryLimit": 5,
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        VERSION_ANNOTATION: version,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": options.workload_service_account,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security,
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def model_service(model: str, options: KubeOptions) -> Object:
    """The model's stable endpoint: every version, every replica, behind one name."""
    name = model_object_name(model)
    selector = {MODEL_LABEL: model, "app.kubernetes.io/component": "model-server"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": options.namespace,
            "labels": {**_common_labels("model-server"), **selector},
        },
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": options.server_port, "targetPort": "http"}],
        },
    }


def model_endpoint(model: str, options: KubeOptions) -> str:
    name = model_object_name(model)
    return f"http://{name}.{options.namespace}.svc:{options.server_port}/v2/models/{model}"


def _worker_nats_env(options: KubeOptions) -> list[Object]:
    """Rank 0 reports as the NATS user ``worker``; the password stays in its Secret (the Job
    names it, the kubelet reads it: the train service never sees it)."""
    if options.worker_nats_secret is None:
        return []
    return [
        {"name": "TORCHRELAY_NATS_USER", "value": WORKER},
        {
            "name": "TORCHRELAY_NATS_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": options.worker_nats_secret, "key": "password"}},
        },
        {"name": "TORCHRELAY_NATS_INBOX_PREFIX", "value": inbox_prefix(WORKER)},
    ]
