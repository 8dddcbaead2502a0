"""Settings of the serve service: ``TORCHRELAY_SERVE_<FIELD>`` plus the common ones."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.runtime.settings import Group, HttpSettings, ServiceSettings

DEFAULT_PORT = 8083


class ServeOptions(Group):
    backend: Literal["local", "kubernetes", "simulated"] = Field(
        default="local",
        description="Where model servers run: processes here, or a Deployment per model. "
        "simulated: no model servers, for benchmarks and tests of the control plane only "
        "(needs TORCHRELAY_ALLOW_SIMULATED_BACKEND=true).",
    )
    endpoint_host: str = Field(
        default="127.0.0.1", description="Where models' stable endpoints listen."
    )
    replicas: int = Field(default=2, ge=1, le=32, description="Server processes per version.")
    max_batch_size: int = Field(default=64, ge=1)
    max_delay_ms: float = Field(default=0.0, ge=0, description="Extra wait to grow a batch.")
    max_queue: int = Field(default=512, ge=1, description="Requests queued per process, then 503.")
    ready_timeout_s: float = Field(default=60.0, gt=0, description="Load + smoke inference limit.")
    drain_s: float = Field(default=10.0, gt=0, description="How long a retired version drains.")
    simulated_ready_delay_s: float = Field(
        default=1.0, ge=0, description="Simulated backend: how long a version takes to get ready."
    )
    rollouts_in_flight: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Pipelines' rollouts (on train.completed) one replica runs at once. Each "
        "waits for a model server to get ready, seconds to minutes on a cluster; two of one "
        "model wait for each other (a lease), so only different models' rollouts overlap. "
        "Deploy, rollback and undeploy requests stay one at a time, in order.",
    )
    swap_in_place: bool = Field(
        default=True,
        description="A new version with the serving one's signature and architecture replaces "
        "it inside the running servers (no new processes); off: every version rolls out anew.",
    )


class ServeSettings(ServiceSettings):
    http: HttpSettings = HttpSettings(port=DEFAULT_PORT)
    serve: ServeOptions = ServeOptions()
    kube: KubeOptions = KubeOptions()
