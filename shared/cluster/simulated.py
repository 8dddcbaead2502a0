"""The simulated training backend: attempts that behave like real ones without running any.

For benchmarks and tests of the control plane only, never a production choice: choosing it
needs ``TORCHRELAY_ALLOW_SIMULATED_BACKEND=true`` in the service's environment (see
:func:`require_opt_in`). Nothing else in the platform knows an attempt is simulated: each one
is an asyncio task in the train service's process (no process, no torch) that

- publishes ``train.progress`` every ``progress_interval_s`` as rank 0's reporter does (source
  ``/torchrelay/train/worker``, the worker's own NATS user from ``worker_env``);
- runs for a duration drawn uniformly from ``[min_duration_s, max_duration_s]``;
- then fails, with probability ``fail_rate`` **on attempt 0 only**, like a rank killed by
  SIGKILL after progress (no failure file: the train service restarts it while restarts are
  left, as it would a lost node); every later attempt succeeds. So at ``fail_rate`` p a run
  fails at most once and each failure is restarted exactly once: what a benchmark can count;
- or succeeds as rank 0 does: the model folder (``model.json`` and a placeholder model file)
  and then ``result.json``. The placeholder is no loadable model: only the simulated serving
  backend (:mod:`.simulated_serving`, which never loads one) can serve it.

Every random draw is seeded from ``run_id/attempt``: the same run behaves the same each time.
Attempts live in the replica that scheduled them (like local ranks): ``adopt`` says None and
``cancel`` of another replica's handle raises :class:`NotOwned`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from torchrelay.shared.bus.connection import NatsSettings, connect
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.cluster.port import Description, Ended, Phase, Status, WorkerJob
from torchrelay.shared.cluster.registry import SimulatedTraining, TrainingConfig
from torchrelay.shared.errors import ConfigError, NotOwned
from torchrelay.shared.events import AnyEvent, TrainProgressed
from torchrelay.shared.events.data import TrainProgressData
from torchrelay.shared.storage import Layout, RunResult
from torchrelay.shared.storage.files import (
    ModelDescription,
    ModelLineage,
    TensorSignature,
    Throughput,
)
from torchrelay.shared.storage.layout import TORCHSCRIPT_FILE

log = structlog.get_logger("torchrelay.cluster.simulated")
OPT_IN = "TORCHRELAY_ALLOW_SIMULATED_BACKEND"
WORKER_SOURCE = "/torchrelay/train/worker"
KILLED = -9
ENDED_KEPT = 4096
"""Handles of attempts that ended here, remembered so that cancelling one again is success."""
SIGNATURE_IN = TensorSignature(name="input", datatype="FP32", shape=(-1, 4))
SIGNATURE_OUT = TensorSignature(name="output", datatype="FP32", shape=(-1, 2))
"""The simulated model's signature: what the simulated servers answer the smoke inference."""

Publish = Callable[[AnyEvent], Awaitable[object]]


def require_opt_in(environ: Mapping[str, str], kind: str) -> None:
    """A ConfigError unless the environment opts in: a simulated backend trains and serves
    nothing, so choosing it by mistake must not start a service that looks healthy."""
    if environ.get(OPT_IN, "").strip().lower() not in ("1", "true", "yes"):
        raise ConfigError(
            f"the simulated {kind} backend is for benchmarks and tests of the control plane "
            f"only: it trains and serves nothing. Set {OPT_IN}=true to use it anyway."
        )


@dataclass(frozen=True)
class Plan:
    """How one attempt goes, drawn from its seed before it starts."""

    duration_s: float
    fails: bool


def plan(run_id: str, attempt: int, sim: SimulatedTraining) -> Plan:
    """The attempt's duration and outcome: the same for the same run and attempt."""
    draws = random.Random(f"{run_id}/{attempt}")  # noqa: S311 - a simulation, not a secret
    duration = draws.uniform(sim.min_duration_s, sim.max_duration_s)
    fails = draws.random() < sim.fail_rate and attempt == 0
    return Plan(duration, fails)


@dataclass(frozen=True)
class SimulatedRequest:
    handle: str
    job: WorkerJob
    plan: Plan


class SimulatedBackend:
    name = "simulated"

    def __init__(self, sim: SimulatedTraining, *, publish: Publish | None = None) -> None:
        self.sim = sim
        self._publish = publish
        """Where progress goes; None: a NATS connection of the workers' user, opened on the
        first report (per backend, not per attempt: a thousand attempts share it)."""
        self._bus: JetStreamBus | None = None
        self._connecting = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task[Ended]] = {}
        self._cancelled: set[str] = set()
        self._ended: dict[str, None] = {}  # insertion-ordered: the oldest is forgotten first

    def check(self, job: WorkerJob) -> None:
        """Places any job: nothing runs."""

    def dryrun(self, job: WorkerJob) -> SimulatedRequest:
        return SimulatedRequest(
            f"{job.run_id}/{job.attempt}", job, plan(job.run_id, job.attempt, self.sim)
        )

    async def schedule(self, request: SimulatedRequest) -> str:
        task = asyncio.create_task(self._attempt(request), name=f"simulated-{request.handle}")
        self._tasks[request.handle] = task
        log.info("job.launched", handle=request.handle, simulated=True)
        return request.handle

    async def describe(self, handle: str) -> Description | None:
        task = self._tasks.get(handle)
        if task is None:
            return None
        if not task.done():
            return Description(handle, Phase.RUNNING, "1 of 1 simulated ranks running")
        ended = task.result() if not task.cancelled() else Ended(Status.CANCELLED, "cancelled")
        phase = Phase.SUCCEEDED if ended.status is Status.SUCCEEDED else Phase.FAILED
        return Description(handle, phase, ended.reason)

    async def wait(self, handle: str) -> Ended:
        task = self._tasks[handle]
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if handle not in self._cancelled:
                raise  # the waiter itself is being cancelled
            return Ended(Status.CANCELLED, "cancelled")
        finally:
            if task.done():
                self._forget(handle)

    async def adopt(self, request: SimulatedRequest) -> str | None:
        """Never: a simulated attempt is a task of the replica that started it."""
        return None

    async def cancel(self, handle: str) -> None:
        task = self._tasks.get(handle)
        if task is None:
            if handle in self._ended:
                return
            raise NotOwned(f"no simulated attempt {handle!r} runs in this replica")
        self._cancelled.add(handle)
        task.cancel()
        await asyncio.wait([task])  # ended, without taking on its cancellation

    async def aclose(self) -> None:
        for handle in list(self._tasks):
            with contextlib.suppress(NotOwned):
                await self.cancel(handle)
        bus, self._bus = self._bus, None
        if bus is not None:
            await bus.aclose()

    def _forget(self, handle: str) -> None:
        self._tasks.pop(handle, None)
        self._cancelled.discard(handle)
        self._ended[handle] = None
        if len(self._ended) > ENDED_KEPT:
            del self._ended[next(iter(self._ended))]

    async def _attempt(self, request: SimulatedRequest) -> Ended:
        job, chosen = request.job, request.plan
        loop = asyncio.get_running_loop()
        deadline = loop.time() + chosen.duration_s
        step = 0
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(left, self.sim.progress_interval_s))
            step += 1
            await self._report(job, step)
        if chosen.fails:
            return Ended(
                Status.FAILED,
                "rank 0 was killed by SIGKILL (simulated)",
                rank=0,
                exit_code=KILLED,
                signal="SIGKILL",
            )
        try:
            await asyncio.to_thread(write_success, job, step)
        except OSError as exc:  # the storage failed rank 0, as it would a real one
            return Ended(Status.FAILED, f"rank 0 failed: {exc} (exit 1)", rank=0, exit_code=1)
        return Ended(Status.SUCCEEDED, "every rank finished")

    async def _report(self, job: WorkerJob, step: int) -> None:
        """One ``train.progress``, best effort like rank 0's (a failed publish is logged)."""
        event = TrainProgressed(
            data=TrainProgressData(
                run_id=job.run_id, step=step, epoch=0, loss=1.0 / step, samples_per_s=100.0
            ),
            source=WORKER_SOURCE,
            subject=job.run_id,
            pipelineid=job.pipeline_id,
        )
        try:
            publish = self._publish or await self._connected(job)
            if publish is not None:
                await publish(event)
        except Exception as exc:  # noqa: BLE001 - reports are best effort
            log.warning("report.failed", run_id=job.run_id, error=repr(exc))

    async def _connected(self, job: WorkerJob) -> Publish | None:
        if job.nats_url is None:
            return None
        async with self._connecting:
            if self._bus is None:
                # As a local rank: the workers' own user, the service's TLS settings.
                env = {**os.environ, **self.sim.worker_env}
                settings = NatsSettings(
                    url=job.nats_url,
                    user=self.sim.worker_env.get("TORCHRELAY_NATS_USER"),
                    password=self.sim.worker_env.get("TORCHRELAY_NATS_PASSWORD"),
                    inbox_prefix=self.sim.worker_env.get("TORCHRELAY_NATS_INBOX_PREFIX"),
                    tls_ca_file=env.get("TORCHRELAY_NATS_TLS_CA_FILE"),
                    tls_cert_file=env.get("TORCHRELAY_NATS_TLS_CERT_FILE"),
                    tls_key_file=env.get("TORCHRELAY_NATS_TLS_KEY_FILE"),
                    tls_hostname=env.get("TORCHRELAY_NATS_TLS_HOSTNAME"),
                    startup_wait_s=10.0,
                )
                self._bus = JetStreamBus(await connect(settings))
        return self._bus.publish


def write_success(job: WorkerJob, steps: int) -> None:
    """What a successful rank 0 leaves: the model folder, then result.json (written last)."""
    layout = Layout(Path(job.storage_root))
    name, version = job.job.model_name, job.run_id
    folder = layout.model(name, version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TORCHSCRIPT_FILE).write_bytes(b"simulated: no model\n")
    metrics = {"loss": 1.0 / max(steps, 1)}
    ModelDescription(
        name=name,
        version=version,
        format="torchscript",
        inputs=(SIGNATURE_IN,),
        outputs=(SIGNATURE_OUT,),
        metrics=metrics,
        lineage=ModelLineage(
            dataset=job.job.dataset,
            run_id=job.run_id,
            attempt=job.attempt,
            entrypoint=job.job.entrypoint,
            steps=steps,
            workspace=job.job.workspace,
        ),
        created=datetime.now(UTC),
    ).write(layout.model_description(name, version))
    RunResult(
        model_name=name,
        version=version,
        path=str(folder.relative_to(layout.root)),
        metrics=metrics,
        steps=steps,
        attempt=job.attempt,
        throughput=Throughput(samples_per_s=100.0, checkpoints=0, checkpoint_seconds=0.0),
    ).write(layout.result(job.run_id))


async def open_training(config: TrainingConfig) -> SimulatedBackend:
    require_opt_in(os.environ, "training")
    return SimulatedBackend(config.simulated)
