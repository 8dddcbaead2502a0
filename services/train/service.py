"""Wiring and lifecycle of the train service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

from torchrelay.services.train.handlers import Trainer
from torchrelay.services.train.settings import TrainOptions, TrainSettings
from torchrelay.services.train.suggest import suggester
from torchrelay.services.train.sweeps import Sweeps
from torchrelay.shared.bus import Subscription
from torchrelay.shared.bus.principals import inbox_prefix
from torchrelay.shared.cluster import TrainingBackend
from torchrelay.shared.cluster.registry import (
    SimulatedTraining,
    TrainingConfig,
    open_training_backend,
)
from torchrelay.shared.events import (
    DatasetStaged,
    SweepCancelRequested,
    TrainCancelRequested,
    TrainCompleted,
    TrainFailed,
    TrainRequested,
    TrainRestartRequested,
)
from torchrelay.shared.runtime import Platform, Service, service_main
from torchrelay.shared.runtime.metrics import reconciled_counter

NAME = "train"


def _detect_gpus() -> int:
    import torch  # the train image carries torch; only this service imports it

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


async def _backend(settings: TrainSettings) -> TrainingBackend:
    options = settings.train
    local = options.backend == "local"
    config = TrainingConfig(
        max_world_size=options.max_world_size,
        gpus=(options.gpus if options.gpus is not None else _detect_gpus()) if local else 0,
        worker_env=_worker_nats_env(options),
        warm_ranks=options.warm_ranks if local else 0,
        kube=settings.kube,
        simulated=SimulatedTraining(
            min_duration_s=options.simulated_min_duration_s,
            max_duration_s=options.simulated_max_duration_s,
            progress_interval_s=options.simulated_progress_interval_s,
            fail_rate=options.simulated_fail_rate,
            worker_env=_worker_nats_env(options),
        ),
    )
    return await open_training_backend(options.backend, config)


def _worker_nats_env(options: TrainOptions) -> dict[str, str]:
    """The workers' own NATS user: never the service's (inherited) credentials."""
    if options.worker_nats_user is None or options.worker_nats_password is None:
        return {}
    return {
        "TORCHRELAY_NATS_USER": options.worker_nats_user,
        "TORCHRELAY_NATS_PASSWORD": options.worker_nats_password.get_secret_value(),
        "TORCHRELAY_NATS_INBOX_PREFIX": inbox_prefix(options.worker_nats_user),
    }


@asynccontextmanager
async def build(platform: Platform[TrainSettings]) -> AsyncIterator[Service]:
    backend = await _backend(platform.settings)
    trainer = Trainer(
        backend=backend,
        state=platform.state,
        publish=platform.bus.publish,
        storage_root=platform.settings.storage_root.resolve(),
        nats_url=platform.settings.nats.url,
        presence=platform.presence,
        source=platform.source,
        entrypoints=platform.settings.train.entrypoints,
        reconciled=reconciled_counter(platform.registry),
        retain_s=platform.settings.retention_s,
        rendezvous_timeout_s=platform.settings.train.rendezvous_timeout_s,
        collective_timeout_s=platform.settings.train.collective_timeout_s,
    )
    sweeps = Sweeps(
        trainer=trainer,
        state=platform.state,
        publish=platform.bus.publish,
        source=platform.source,
        suggest=suggester(),
        retain_s=platform.settings.retention_s,
    )
    try:
        yield Service(
            NAME,
            subscriptions=[
                # Launching is quick (runs are watched in the background); no hoarding.
                Subscription(
                    "train-requests",
                    [TrainRequested],
                    trainer.on_requested,
                    max_in_flight=2,
                    prefetch=2,
                ),
                Subscription(
                    "train-restarts",
                    [TrainRestartRequested],
                    trainer.on_restart_requested,
                    max_in_flight=2,
                    prefetch=2,
                ),
                Subscription(
                    "train-cancels",
                    [TrainCancelRequested, SweepCancelRequested],
                    _cancels(trainer, sweeps),
                ),
                Subscription(
                    "train-pipelines",
                    [DatasetStaged],
                    sweeps.on_dataset_staged,
                    max_in_flight=2,
                    prefetch=2,
                ),
                # A sweep's trial ended: the sweep moves on (other runs cost one lookup).
                Subscription("train-sweeps", [TrainCompleted, TrainFailed], sweeps.on_run_ended),
            ],
            background=[trainer.reclaim, sweeps.keep_moving],
        )
    finally:
        await trainer.aclose()


def _cancels(
    trainer: Trainer, sweeps: Sweeps
) -> Callable[[TrainCancelRequested | SweepCancelRequested], Awaitable[None]]:
    async def handle(event: TrainCancelRequested | SweepCancelRequested) -> None:
        if isinstance(event, SweepCancelRequested):
            await sweeps.on_cancel_requested(event)
        else:
            await trainer.on_cancel_requested(event)

    return handle


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(NAME, TrainSettings, build, argv)
