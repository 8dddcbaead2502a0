"""Settings of the train service: ``TORCHRELAY_TRAIN_<FIELD>`` plus the common ones."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.runtime.settings import Group, HttpSettings, ServiceSettings

DEFAULT_PORT = 8082


class TrainOptions(Group):
    backend: Literal["local", "kubernetes"] = Field(
        default="local",
        description="Where workers run: processes here, or pods (TORCHRELAY_KUBE_* settings).",
    )
    max_world_size: int = Field(
        default_factory=lambda: max(2, 2 * (os.cpu_count() or 1)),
        ge=1,
        description="Most ranks the local backend starts for one job.",
    )
    gpus: int | None = Field(
        default=None, ge=0, description="GPUs the local backend may use; detected if unset."
    )


class TrainSettings(ServiceSettings):
    http: HttpSettings = HttpSettings(port=DEFAULT_PORT)
    train: TrainOptions = TrainOptions()
    kube: KubeOptions = KubeOptions()
