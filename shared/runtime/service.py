"""The one way every torchrelay service starts, runs and stops.

Start: connect NATS -> stream and KV buckets -> build the service -> provision its consumers
-> HTTP side server -> ready. Stop (SIGTERM/SIGINT, or the ``stop`` event): readiness fails
first, consumers stop pulling, in-flight handlers get ``shutdown.grace_s`` to finish and are
cancelled after (their events are nak'd for prompt redelivery), the NATS connection drains,
then the HTTP server closes. Everything runs under a hard ``shutdown.deadline_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from torchrelay import __version__
from torchrelay.shared.bus.connection import connect, redact
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.bus.port import Subscription
from torchrelay.shared.runtime.http import build_app, start_http
from torchrelay.shared.runtime.metrics import RuntimeMetrics
from torchrelay.shared.runtime.settings import ServiceSettings
from torchrelay.shared.state import KvState, State
from torchrelay.shared.state.presence import Presence

S = TypeVar("S", bound=ServiceSettings)
BackgroundTask = Callable[[asyncio.Event], Coroutine[Any, Any, None]]

log = structlog.get_logger("torchrelay.runtime")


@dataclass(frozen=True)
class Service:
    """What a service contributes: its subscriptions, HTTP routes and background loops.

    A background loop receives the stop event and must return soon after it is set.
    """

    name: str
    subscriptions: Sequence[Subscription] = ()
    routes: Sequence[web.AbstractRouteDef] = ()
    background: Sequence[BackgroundTask] = ()


@dataclass
class Platform(Generic[S]):
    """What the runtime hands a service factory: settings, bus, state and metrics."""

    settings: S
    bus: JetStreamBus
    state: State
    registry: CollectorRegistry
    source: str
    presence: Presence
    ready_checks: list[Callable[[], Awaitable[bool]]] = field(default_factory=list)


ServiceFactory = Callable[[Platform[S]], contextlib.AbstractAsyncContextManager[Service]]


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._started: float | None = None

    def start(self) -> None:
        self._started = time.monotonic()

    def remaining(self) -> float:
        if self._started is None:  # start-up failed before the service ran
            return self.seconds
        return max(0.1, self.seconds - (time.monotonic() - self._started))


@dataclass
class _Readiness:
    started: bool = False
    stopping: bool = False


async def run_service(
    name: str,
    settings: S,
    factory: ServiceFactory[S],
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> None:
    """Run one service until ``stop`` is set or SIGTERM/SIGINT arrives."""
    stop = stop or asyncio.Event()
    structlog.contextvars.bind_contextvars(service=name, instance=settings.instance)
    loop = asyncio.get_running_loop()
    if handle_signals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    try:
        await _run(name, settings, factory, stop)
    finally:
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)


async def _run(name: str, settings: S, factory: ServiceFactory[S], stop: asyncio.Event) -> None:
    registry = CollectorRegistry()
    metrics = RuntimeMetrics(registry, name, __version__)
    readiness = _Readiness()
    source = f"/torchrelay/{name}"

    async with contextlib.AsyncExitStack() as stack:
        nats_options = settings.nats.model_copy(
            update={"name": settings.nats.name or f"torchrelay-{name}-{settings.instance}"}
        )
        nc = await connect(nats_options)
        bus = JetStreamBus(nc, settings.stream, source=source, observer=metrics)
        # The whole stop, drain included, fits in shutdown.deadline_s from the stop request.
        deadline = _Deadline(settings.shutdown.deadline_s)
        stack.push_async_callback(lambda: bus.aclose(deadline.remaining()))
        await bus.ensure_stream()
        state = await KvState.open(nc.jetstream(), replicas=settings.stream.replicas)
        # Presence first: work this replica starts is known to be its own from the start.
        presence = Presence(state.leases, name, settings.instance)
        await presence.announce()
        stack.push_async_callback(presence.withdraw)
        platform = Platform(settings, bus, state, registry, source, presence)
        service = await stack.enter_async_context(factory(platform))
        await bus.provision(service.subscriptions)

        async def ready() -> bool:
            if not readiness.started or readiness.stopping:
                return False
            checks = [bus.stream_ready(), *(check() for check in platform.ready_checks)]
            return all(await asyncio.gather(*checks))

        app = build_app(settings.http, registry=registry, ready=ready, routes=service.routes)
        runner, port = await start_http(app, settings.http)
        try:
            failure = await _serve(
                settings=settings,
                service=service,
                background=[presence.keep, *service.background],
                bus=bus,
                metrics=metrics,
                readiness=readiness,
                deadline=deadline,
                port=port,
                stop=stop,
            )
            # Service resources first, then the bus drains (flushing the last acks and naks).
            await stack.aclose()
        finally:
            # HTTP last: probes keep answering (not ready) until the very end.
            await runner.cleanup()
        if failure is not None:
            raise failure
    log.info("service.stopped")


async def _serve(
    *,
    settings: ServiceSettings,
    service: Service,
    background: Sequence[BackgroundTask],
    bus: JetStreamBus,
    metrics: RuntimeMetrics,
    readiness: _Readiness,
    deadline: _Deadline,
    port: int,
    stop: asyncio.Event,
) -> BaseException | None:
    """Run the consumers and background loops until a stop request or a failure; then stop
    pulling and give in-flight handlers the grace period. Returns the failure, if any."""
    consuming = asyncio.Event()  # set when consumers must stop pulling
    tasks = [
        asyncio.create_task(bus.consume(sub, consuming), name=f"consume:{sub.name}")
        for sub in service.subscriptions
    ] + [
        asyncio.create_task(task(consuming), name=f"background:{index}")
        for index, task in enumerate(background)
    ]
    readiness.started = True
    metrics.ready.set(1)
    log.info(
        "service.ready",
        http_host=settings.http.host,
        http_port=port,
        pid=os.getpid(),
        nats_url=redact(settings.nats.url),
        subscriptions=[sub.name for sub in service.subscriptions],
    )
    failure = await _wait_for_stop_or_failure(stop, tasks)
    deadline.start()
    readiness.stopping = True
    metrics.ready.set(0)
    log.info("service.stopping", reason="task failed" if failure else "stop requested")
    consuming.set()
    await _finish(tasks, grace_s=settings.shutdown.grace_s)
    return failure


async def _wait_for_stop_or_failure(
    stop: asyncio.Event, tasks: list[asyncio.Task[None]]
) -> BaseException | None:
    """Wait for a stop request; a root task that ends early is a failure that stops us."""
    stopper = asyncio.create_task(stop.wait(), name="stop-wait")
    try:
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    for task in done:
        if task is stopper:
            continue
        error = task.exception()
        log.error("service.task_ended", task=task.get_name(), error=repr(error))
        return error or RuntimeError(f"{task.get_name()} ended before the service was stopped")
    return None


async def _finish(tasks: list[asyncio.Task[None]], *, grace_s: float) -> None:
    started = time.monotonic()
    _, pending = await asyncio.wait(tasks, timeout=grace_s) if tasks else (set(), set())
    if pending:
        log.warning("service.grace_expired", cancelling=[t.get_name() for t in pending])
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("service.task_failed", task=task.get_name(), error=repr(task.exception()))
    log.info("service.handlers_finished", seconds=round(time.monotonic() - started, 3))
