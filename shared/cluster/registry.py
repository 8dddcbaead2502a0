"""Backends by name, imported only when chosen (the Kubernetes client stays out of a process
that runs everything locally).

Each backend module has an ``open_training`` or ``open_serving`` coroutine that builds the
backend from the settings below; a service names the backend it was configured with and gets
it from :func:`open_training_backend` or :func:`open_serving_backend`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from torchrelay.shared.cluster.kubernetes.options import KubeOptions
from torchrelay.shared.cluster.port import ServingBackend, TrainingBackend
from torchrelay.shared.errors import ConfigError

TRAINING: Mapping[str, str] = {
    "local": "torchrelay.shared.cluster.local",
    "kubernetes": "torchrelay.shared.cluster.kubernetes.training",
    "simulated": "torchrelay.shared.cluster.simulated",
}
SERVING: Mapping[str, str] = {
    "local": "torchrelay.shared.cluster.local_serving",
    "kubernetes": "torchrelay.shared.cluster.kubernetes.serving",
    "simulated": "torchrelay.shared.cluster.simulated_serving",
}


@dataclass(frozen=True)
class SimulatedTraining:
    """Simulated backend (benchmarks and tests only): how its attempts behave."""

    min_duration_s: float = 5.0
    max_duration_s: float = 15.0
    progress_interval_s: float = 1.0
    fail_rate: float = 0.0
    """The chance that an attempt 0 fails (killed, restartable); later attempts never fail."""
    worker_env: Mapping[str, str] = field(default_factory=dict)
    """The workers' NATS user (TORCHRELAY_NATS_USER, _PASSWORD, _INBOX_PREFIX), as locally."""


@dataclass(frozen=True)
class TrainingConfig:
    max_world_size: int = 4
    """Local: the most ranks one job may have."""
    gpus: int = 0
    """Local: the GPUs this machine has."""
    worker_env: Mapping[str, str] = field(default_factory=dict)
    """Local: added to every rank's environment (the workers' own NATS credentials)."""
    warm_ranks: int = 0
    """Local: standby ranks kept with torch imported, for CPU jobs to start on (0: none)."""
    kube: KubeOptions = field(default_factory=KubeOptions)
    simulated: SimulatedTraining = field(default_factory=SimulatedTraining)


@dataclass(frozen=True)
class ServerOptions:
    """How every model server runs, whatever the backend."""

    max_batch_size: int = 64
    max_delay_ms: float = 0.0
    max_queue: int = 512
    drain_s: float = 10.0

    def args(self) -> list[str]:
        return [
            "--max-batch-size", str(self.max_batch_size),
            "--max-delay-ms", str(self.max_delay_ms),
            "--max-queue", str(self.max_queue),
            "--drain-s", str(self.drain_s),
        ]  # fmt: skip


@dataclass(frozen=True)
class ServingConfig:
    storage_root: Path
    ready_timeout_s: float = 120.0
    server: ServerOptions = field(default_factory=ServerOptions)
    host: str = "127.0.0.1"
    """Local: the address model servers listen on."""
    kube: KubeOptions = field(default_factory=KubeOptions)
    simulated_ready_delay_s: float = 1.0
    """Simulated (benchmarks and tests only): how long a version takes to get ready."""


def _module(kind: str, table: Mapping[str, str], name: str) -> Any:
    try:
        path = table[name]
    except KeyError:
        raise ConfigError(
            f"unknown {kind} backend {name!r}; known: {', '.join(sorted(table))}"
        ) from None
    return importlib.import_module(path)


async def open_training_backend(name: str, config: TrainingConfig) -> TrainingBackend:
    module = _module("training", TRAINING, name)
    return cast(TrainingBackend, await module.open_training(config))


async def open_serving_backend(name: str, config: ServingConfig) -> ServingBackend[Any]:
    module = _module("serving", SERVING, name)
    return cast(ServingBackend[Any], await module.open_serving(config))
