"""How torchrelay uses a cluster: ``TORCHRELAY_KUBE_<FIELD>``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from torchrelay.shared.runtime.settings import Group


class KubeOptions(Group):
    namespace: str = Field(default="torchrelay", description="Where jobs and models run.")
    api_url: str | None = Field(
        default=None,
        description="An API server URL to use without credentials (kubectl proxy, tests); "
        "unset: the pod's service account in a cluster, else the kubeconfig.",
    )
    kubeconfig: Path | None = Field(default=None, description="A kubeconfig file to use.")
    worker_image: str = Field(
        default="torchrelay/train:0.1.0", description="The image training workers run."
    )
    server_image: str = Field(
        default="torchrelay/serve:0.1.0", description="The image model servers run."
    )
    image_pull_policy: str = Field(default="IfNotPresent")
    worker_nats_secret: str | None = Field(
        default=None,
        description="A Secret (key 'password') of the NATS user 'worker': worker pods report "
        "progress as that user, which may publish nothing but train.progress and "
        "train.checkpointed. Unset: workers connect without credentials.",
    )
    worker_nats_tls_secret: str | None = Field(
        default=None,
        description="A Secret holding the CA that signed NATS's certificate (key 'ca.crt', "
        "as cert-manager writes it), for a NATS with TLS: mounted in worker pods, which "
        "verify the server with it. Unset: workers connect as the URL's scheme says.",
    )
    storage_claim: str = Field(
        default="torchrelay-storage",
        description="The ReadWriteMany PersistentVolumeClaim mounted at the storage root.",
    )
    workload_service_account: str = Field(
        default="torchrelay-workload",
        description="Service account of worker and model server pods (they need no API access).",
    )
    scheduler_name: str | None = Field(
        default=None, description="A gang scheduler for worker pods (volcano); default: kube's."
    )
    queue: str | None = Field(
        default=None, description="A queue for training jobs (a Kueue LocalQueue name)."
    )
    queue_label: str = Field(
        default="kueue.x-k8s.io/queue-name", description="The label that names the queue."
    )
    gpu_node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels of the GPU pool, for jobs that request GPUs (JSON).",
    )
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=list, description="Tolerations of the GPU pool's taints (JSON)."
    )
    cpu_node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels of the CPU pool, for jobs without GPUs."
    )
    server_cpu: float = Field(default=1.0, gt=0, description="CPU cores per model server pod.")
    server_memory_mb: int = Field(default=1024, gt=0, description="Memory per model server pod.")
    server_port: int = Field(default=8080, ge=1, le=65535, description="Model servers' port.")
    server_startup_timeout_s: int = Field(
        default=900,
        ge=10,
        description="How long a model server may take to load its model before the kubelet "
        "restarts it (its startup probe); large models take minutes.",
    )
    server_drain_s: int = Field(
        default=10,
        ge=0,
        le=300,
        description="A stopping model server keeps serving this long (its preStop), so that "
        "Service endpoints stop sending it requests before it shuts down.",
    )
    rendezvous_port: int = Field(default=29500, ge=1, le=65535)
    pending_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="An attempt whose ranks have not all started this long after its Job "
        "started (scheduling, node scale-up, image pulls, volume mounts, pod creation refused "
        "by a quota or webhook) fails, saying why; a Job suspended by its queue is not timed.",
    )
    log_tail_lines: int = Field(
        default=50,
        ge=1,
        le=200,
        description="Lines of the failed rank's log that go into train.failed before its Job "
        "(and the pod with its log) is deleted.",
    )
    ttl_after_finished_s: int = Field(
        default=3600, ge=0, description="Finished jobs (and their pods) are deleted after this."
    )
    watch_timeout_s: int = Field(
        default=240, ge=1, description="Server-side length of one watch; it resumes after."
    )
    watch_margin_s: float = Field(
        default=30.0,
        gt=0,
        description="A watch silent this much longer than its server-side length is taken "
        "for a half-open connection: dropped and resumed.",
    )
    connect_timeout_s: float = Field(
        default=10.0, gt=0, description="Connecting to the API server."
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="One API call (not a watch), answer included."
    )
    run_as_user: int = Field(default=10001, ge=1, description="The images' non-root user.")
