"""Wiring and lifecycle of the serve service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import aiohttp

from torchrelay.services.serve.handlers import Deployer, ServeMetrics
from torchrelay.services.serve.http import routes
from torchrelay.services.serve.settings import ServeSettings
from torchrelay.shared.bus import Subscription
from torchrelay.shared.cluster.registry import ServerOptions, ServingConfig, open_serving_backend
from torchrelay.shared.events import (
    ModelDeployRequested,
    ModelRollbackRequested,
    ModelUndeployRequested,
    SweepCompleted,
    TrainCompleted,
)
from torchrelay.shared.runtime import Platform, Service, service_main

NAME = "serve"


def serving_config(settings: ServeSettings) -> ServingConfig:
    options = settings.serve
    return ServingConfig(
        storage_root=settings.storage_root,
        ready_timeout_s=options.ready_timeout_s,
        server=ServerOptions(
            max_batch_size=options.max_batch_size,
            max_delay_ms=options.max_delay_ms,
            max_queue=options.max_queue,
            drain_s=options.drain_s,
        ),
        host=options.endpoint_host,
        kube=settings.kube,
        simulated_ready_delay_s=options.simulated_ready_delay_s,
    )


@asynccontextmanager
async def build(platform: Platform[ServeSettings]) -> AsyncIterator[Service]:
    settings = platform.settings
    backend = await open_serving_backend(settings.serve.backend, serving_config(settings))
    deployer = Deployer(
        backend=backend,
        storage_root=settings.storage_root.resolve(),
        smoke_timeout_s=settings.serve.ready_timeout_s,
        state=platform.state,
        publish=platform.bus.publish,
        presence=platform.presence,
        source=platform.source,
        replicas=platform.settings.serve.replicas,
        retain_s=platform.settings.retention_s,
        metrics=ServeMetrics(platform.registry),
        swap_in_place=platform.settings.serve.swap_in_place,
    )
    session: aiohttp.ClientSession | None = None

    def client() -> aiohttp.ClientSession:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession()
        return session

    in_flight = settings.serve.rollouts_in_flight
    try:
        yield Service(
            NAME,
            routes=routes(deployer.endpoint_of, client),
            subscriptions=[
                # Requests for a model (deploy, rollback, undeploy) one at a time here, in
                # the order they were sent: a rollback reads what serves when it is handled.
                Subscription(
                    "serve-rollouts",
                    [ModelDeployRequested, ModelRollbackRequested, ModelUndeployRequested],
                    _route(deployer),
                    max_in_flight=1,
                    prefetch=1,
                ),
                # Pipelines' rollouts wait seconds for servers to get ready: many at once (a
                # lease keeps one model's in turn), and no more fetched than run, so that an
                # idle replica takes the next one.
                Subscription(
                    "serve-pipelines",
                    [TrainCompleted, SweepCompleted],
                    deployer.on_trained,
                    max_in_flight=in_flight,
                    prefetch=in_flight,
                ),
            ],
            background=[deployer.reclaim],
        )
    finally:
        if session is not None:
            await session.close()
        await deployer.aclose()


Request = ModelDeployRequested | ModelRollbackRequested | ModelUndeployRequested


def _route(deployer: Deployer) -> Callable[[Request], Awaitable[None]]:
    async def handle(event: Request) -> None:
        if isinstance(event, ModelDeployRequested):
            await deployer.on_deploy_requested(event)
        elif isinstance(event, ModelRollbackRequested):
            await deployer.on_rollback_requested(event)
        else:
            await deployer.on_undeploy_requested(event)

    return handle


def main(argv: Sequence[str] | None = None) -> int:
    return service_main(NAME, ServeSettings, build, argv)
