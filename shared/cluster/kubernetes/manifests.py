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
STARTUP_PERIOD_S = 5
SERVER_SHUTDOWN_S = 30


DNS_LABEL_MAX = 63
# The API server's own rules (k8s.io/apimachinery validation).
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # Service names
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # other names, host names
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
MAX_INDEX_SUFFIX = len("-1023")  # a pod's host name is <job>-<completion index>


def _digest(text: str, length: int = 10) -> str:
    # surrogatepass: defined for any str (a lone surrogate too), the same bytes for valid text
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def dns_name(text: str, *, prefix: str, max_length: int = DNS_LABEL_MAX) -> str:
    """Any text as a DNS-1035 label (so also DNS-1123) of at most ``max_length``: ``prefix``
    when ``text`` does not start with a letter, then ``text`` lower-cased with every run of other
    characters than letters, digits and ``-`` a ``-``, cut to fit, then a hash of the exact
    ``text``. Stable (same text, same
    name) and collision-resistant (texts that sanitise alike differ in the hash)."""
    digest = f"-{_digest(text)}"
    if max_length < len(prefix) + len(digest) + 1:
        raise ValueError(f"no DNS label of {max_length} characters holds {prefix!r} and a hash")
    readable = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not readable[:1].isalpha():
        readable = f"{prefix}-{readable}".rstrip("-")
    return f"{readable[: max_length - len(digest)].rstrip('-')}{digest}"


def label_value(text: str) -> str:
    """``text`` itself when it is a valid label value, else a valid one with its hash."""
    if len(text) <= DNS_LABEL_MAX and LABEL_VALUE.fullmatch(text):
        return text
    digest = _digest(text, 12)
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[: DNS_LABEL_MAX - len(digest) - 1]
    readable = re.sub(r"^[^A-Za-z0-9]+", "", readable)  # the hash ends it: alphanumeric
    return f"{readable}-{digest}" if readable else digest


def job_name(run_id: str, attempt: int) -> str:
    """A DNS-1035 label for one attempt (the Job, its headless Service and the pods'
    subdomain): readable prefix, a hash of the run id, the attempt. Short enough that
    ``<name>-<index>`` (the pods' host names) stays a DNS label too."""
    suffix = f"-a{attempt}"
    budget = min(30 + 11, DNS_LABEL_MAX - MAX_INDEX_SUFFIX - len(suffix))
    return f"{dns_name(run_id, prefix='run', max_length=budget)}{suffix}"


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


HOME = "/home/torchrelay"  # the images' user has no home folder on the read-only root
NATS_TLS_DIR = "/etc/torchrelay/nats-tls"


def _volumes(
    options: KubeOptions, mount: str, *, shm_mb: int | None
) -> tuple[list[Object], list[Object]]:
    """The shared storage, and pod-private writable folders on a read-only root: /tmp, the
    user's home (``~/.cache``: torch hub, compile caches) and, with ``shm_mb``, /dev/shm."""
    volumes: list[Object] = [
        {"name": "storage", "persistentVolumeClaim": {"claimName": options.storage_claim}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
    ]
    mounts: list[Object] = [
        {"name": "storage", "mountPath": mount},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a pod-private emptyDir
        {"name": "home", "mountPath": HOME},
    ]
    if shm_mb is not None:  # NCCL and data loader workers share memory through /dev/shm
        # Memory-backed: it counts against the pod's memory limit, so it is capped below it.
        shm = {"medium": "Memory", "sizeLimit": f"{shm_mb}Mi"}
        volumes.append({"name": "dshm", "emptyDir": shm})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})  # noqa: S108 - emptyDir
    return volumes, mounts


def shm_size_mb(memory_mb: int) -> int:
    """The cap of the shared-memory folder: half the pod's memory (at least 64 MiB, Docker's)."""
    return max(64, memory_mb // 2)


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
    volumes, mounts = _volumes(
        options, job.storage_root, shm_mb=shm_size_mb(spec.resources.memory_mb)
    )
    if options.worker_nats_tls_secret is not None:
        secret = {"secretName": options.worker_nats_tls_secret}
        volumes.append({"name": "nats-tls", "secret": secret})
        mounts.append({"name": "nats-tls", "mountPath": NATS_TLS_DIR, "readOnly": True})
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
                    {"name": "HOME", "value": HOME},
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
    """The Deployment's and Service's name (a DNS-1035 label): ``model-<model>`` when that is
    one, else a sanitised, hashed form of the model's name."""
    name = f"model-{model}"
    if len(model) <= DNS_LABEL_MAX and DNS1123_LABEL.fullmatch(model):  # the names events allow
        # Unchanged from earlier releases, so that their Deployments are found again.
        short = f"model-{model[:45].rstrip('-')}-{_digest(model)}"
        return name if len(name) <= DNS_LABEL_MAX else short
    return dns_name(name, prefix="model")


def version_label(version: str) -> str:
    """Versions may be 64 characters and end in ``.`` or ``-``; label values may not."""
    return label_value(version)


def model_labels(model: str) -> dict[str, str]:
    """What selects a model's server pods, whatever the version."""
    return {MODEL_LABEL: label_value(model), "app.kubernetes.io/component": "model-server"}


def model_selector(model: str) -> str:
    return ",".join(f"{key}={value}" for key, value in model_labels(model).items())


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
    selector = model_labels(model)
    labels = {**_common_labels("model-server"), **selector}
    pod_labels = {**labels, VERSION_LABEL: version_label(version)}
    pod_security, container_security = _security(options)
    volumes, mounts = _volumes(options, storage_root, shm_mb=None)
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
        "env": [{"name": "OMP_NUM_THREADS", "value": threads}, {"name": "HOME", "value": HOME}],
        "ports": [{"name": "http", "containerPort": port}],
        # Loading a large model takes minutes: liveness starts once the server has started.
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": STARTUP_PERIOD_S,
            "failureThreshold": math.ceil(options.server_startup_timeout_s / STARTUP_PERIOD_S),
        },
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": "http"},
            "periodSeconds": 5,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 10,
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
    if options.server_drain_s:
        # Endpoints are removed asynchronously: keep answering while callers stop sending.
        container["lifecycle"] = {
            "preStop": {"exec": {"command": ["sleep", str(options.server_drain_s)]}}
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
                    # The drain, then the server's own shutdown.
                    "terminationGracePeriodSeconds": options.server_drain_s + SERVER_SHUTDOWN_S,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def model_service(model: str, options: KubeOptions) -> Object:
    """The model's stable endpoint: every version, every replica, behind one name."""
    name = model_object_name(model)
    selector = model_labels(model)
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
    names it, the kubelet reads it: the train service never sees it). With TLS, it verifies
    the server with the CA mounted from ``worker_nats_tls_secret``. The worker reads these
    as every service does (``TORCHRELAY_NATS_*``)."""
    env: list[Object] = []
    if options.worker_nats_secret is not None:
        env += [
            {"name": "TORCHRELAY_NATS_USER", "value": WORKER},
            {
                "name": "TORCHRELAY_NATS_PASSWORD",
                "valueFrom": {
                    "secretKeyRef": {"name": options.worker_nats_secret, "key": "password"}
                },
            },
            {"name": "TORCHRELAY_NATS_INBOX_PREFIX", "value": inbox_prefix(WORKER)},
        ]
    if options.worker_nats_tls_secret is not None:
        env.append({"name": "TORCHRELAY_NATS_TLS_CA_FILE", "value": f"{NATS_TLS_DIR}/ca.crt"})
    return env
