"""Settings of the train service: ``TORCHRELAY_TRAIN_<FIELD>`` plus the common ones."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.worker_spec import COLLECTIVE_TIMEOUT_S, RENDEZVOUS_TIMEOUT_S
from torchrelay.shared.runtime.settings import Group, HttpSettings, ServiceSettings

DEFAULT_PORT = 8082
EXAMPLES = "torchrelay.services.train.examples"


class TrainOptions(Group):
    backend: Literal["local", "kubernetes", "simulated"] = Field(
        default="local",
        description="Where workers run: processes here, or pods (TORCHRELAY_KUBE_* settings). "
        "simulated: no workers at all, for benchmarks and tests of the control plane only "
        "(needs TORCHRELAY_ALLOW_SIMULATED_BACKEND=true).",
    )
    max_world_size: int = Field(
        default_factory=lambda: max(2, 2 * (os.cpu_count() or 1)),
        ge=1,
        description="Most ranks the local backend starts for one job.",
    )
    gpus: int | None = Field(
        default=None, ge=0, description="GPUs the local backend may use; detected if unset."
    )
    warm_ranks: int = Field(
        default=0,
        ge=0,
        description="Local backend: standby rank processes kept waiting with torch already "
        "imported, so a CPU job's ranks start without paying the import (about half of its "
        "time to the first step here). Each serves one job, then a fresh one takes its slot; "
        "each idle one holds a Python process's memory (about 300 MB). GPU jobs start cold "
        "ranks. 0: none, every rank is a fresh process.",
    )
    worker_nats_user: str | None = Field(
        default=None,
        description="NATS user the local backend's workers report progress with (a user that "
        "may publish only train.progress and train.checkpointed). Unset: workers connect "
        "without credentials. Kubernetes workers read theirs from TORCHRELAY_KUBE_WORKER_NATS_"
        "SECRET.",
    )
    worker_nats_password: SecretStr | None = Field(
        default=None, description="That user's password."
    )
    rendezvous_timeout_s: float = Field(
        default=RENDEZVOUS_TIMEOUT_S,
        gt=0,
        description="How long each rank waits for every other rank of its attempt to join "
        "(pods start with skew: image pulls, node scale-up); torchrun's static rendezvous "
        "waits as long.",
    )
    collective_timeout_s: float = Field(
        default=COLLECTIVE_TIMEOUT_S,
        gt=0,
        description="How long one collective (all-reduce, barrier) may take once the ranks "
        "joined: a slow rank 0 checkpointing to shared storage holds the others that long.",
    )
    simulated_min_duration_s: float = Field(
        default=5.0, gt=0, description="Simulated backend: the shortest an attempt runs."
    )
    simulated_max_duration_s: float = Field(
        default=15.0, gt=0, description="Simulated backend: the longest an attempt runs."
    )
    simulated_progress_interval_s: float = Field(
        default=1.0, gt=0, description="Simulated backend: seconds between progress events."
    )
    simulated_fail_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Simulated backend: the chance that a run's first attempt fails like a "
        "killed rank (and is restarted); later attempts always succeed.",
    )
    entrypoints: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(EXAMPLES,),
        description="Module prefixes (comma-separated, whole dotted components) a request's "
        "entrypoint must lie under; anything else is refused before a worker starts, because "
        "a worker runs the named function with the service's access. Default: the bundled "
        "examples only. Empty: nothing may run.",
    )

    @field_validator("entrypoints", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("entrypoints")
    @classmethod
    def _module_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        wrong = [prefix for prefix in value if not all(p.isidentifier() for p in prefix.split("."))]
        if wrong:
            raise ValueError(
                f"not dotted module names: {', '.join(map(repr, wrong))} "
                "(give packages or modules, e.g. mycompany.trainers, without ':function')"
            )
        return value

    @model_validator(mode="after")
    def _simulated_durations_ordered(self) -> Self:
        if self.simulated_min_duration_s > self.simulated_max_duration_s:
            raise ValueError("simulated_min_duration_s is more than simulated_max_duration_s")
        return self


class TrainSettings(ServiceSettings):
    http: HttpSettings = HttpSettings(port=DEFAULT_PORT)
    train: TrainOptions = TrainOptions()
    kube: KubeOptions = KubeOptions()
