"""Rank 0's progress reports: train.progress and train.checkpointed events on NATS.

Training code is synchronous; a background thread runs an event loop with the bus and
publishes what the training loop queues, so a slow NATS never stalls a step. The NATS client
is imported in that thread, by rank 0 only, and the thread starts with the first report: the
other ranks never load it, and rank 0 does not spend the CPU its peers need to start (the
import, the connection) before it has anything to say.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
from typing import TYPE_CHECKING, Any

import structlog

from torchrelay.shared.cluster.worker_spec import WorkerSpec
from torchrelay.shared.events import AnyEvent, TrainCheckpointed, TrainProgressed
from torchrelay.shared.events.data import TrainCheckpointedData, TrainProgressData

if TYPE_CHECKING:
    from torchrelay.shared.bus.connection import NatsSettings

log = structlog.get_logger("torchrelay.train.worker")
_DONE = object()


def worker_nats_settings(url: str) -> NatsSettings:
    """How rank 0 reaches NATS: the URL from its spec, the identity from its environment
    (TORCHRELAY_NATS_* as the backend set them: the worker's own user, TLS)."""
    from pydantic_settings import BaseSettings, SettingsConfigDict

    from torchrelay.shared.bus.connection import NatsSettings

    class FromEnvironment(BaseSettings):
        model_config = SettingsConfigDict(
            env_prefix="TORCHRELAY_",
            env_nested_delimiter="_",
            env_nested_max_split=1,
            extra="ignore",
        )

        nats: NatsSettings = NatsSettings()

    return FromEnvironment().nats.model_copy(update={"url": url, "startup_wait_s": 10.0})


class Reporter:
    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self._publishes = spec.rank == 0 and bool(spec.nats_url)
        self._thread: threading.Thread | None = None

    def __call__(self, kind: str, fields: dict[str, Any]) -> None:
        log.info(f"train.{kind}", **fields)
        if not self._publishes:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="reporter", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(report_event(self._spec, kind, fields))
        except queue.Full:
            log.warning("report.dropped", kind=kind)

    def close(self, timeout_s: float = 10.0) -> None:
        """Publish what is queued, then stop."""
        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join(timeout_s)

    def _run(self) -> None:
        asyncio.run(self._publish_loop())

    async def _publish_loop(self) -> None:
        assert self._spec.nats_url is not None  # noqa: S101 - checked before the thread starts
        from torchrelay.shared.bus.connection import connect  # the top says why
        from torchrelay.shared.bus.jetstream import JetStreamBus

        bus = JetStreamBus(await connect(worker_nats_settings(self._spec.nats_url)))
        try:
            while True:
                item = await asyncio.to_thread(self._queue.get)
                if item is _DONE:
                    return
                try:
                    await bus.publish(item)
                except Exception as exc:  # noqa: BLE001 - reports are best effort
                    log.warning("report.failed", error=repr(exc))
        finally:
            await bus.aclose()


def report_event(spec: WorkerSpec, kind: str, fields: dict[str, Any]) -> AnyEvent:
    """Rank 0's ``progress`` or ``checkpointed`` report as its event."""
    envelope = {
        "source": "/torchrelay/train/worker",
        "subject": spec.run_id,
        "pipelineid": spec.pipeline_id,
    }
    if kind == "progress":
        data = TrainProgressData(run_id=spec.run_id, **_finite(fields))
        return TrainProgressed(data=data, **envelope)
    return TrainCheckpointed(data=TrainCheckpointedData(run_id=spec.run_id, **fields), **envelope)


def _finite(fields: dict[str, Any]) -> dict[str, Any]:
    """A progress report as the event carries it: a NaN or infinite loss or metric (a run that
    diverged) becomes None, which JSON can carry, instead of failing the training step."""

    def finite(value: Any) -> Any:
        return value if value is None or math.isfinite(value) else None

    metrics = {name: finite(value) for name, value in fields.get("metrics", {}).items()}
    return {**fields, "loss": finite(fields["loss"]), "metrics": metrics}
