"""The simulated training backend: the port's contract without any worker, progress on a real
bus, a failed first attempt restarted once by the real monitor, and no use without opt-in."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from tests.integration.in_memory import Published
from torchrelay.services.monitor.handlers import EventMetrics, Monitor
from torchrelay.services.monitor.settings import MonitorOptions
from torchrelay.services.train.handlers import Trainer
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.cluster import Phase, Status, WorkerJob
from torchrelay.shared.cluster.registry import (
    SimulatedTraining,
    TrainingConfig,
    open_training_backend,
)
from torchrelay.shared.cluster.simulated import OPT_IN, SimulatedBackend, plan
from torchrelay.shared.errors import ConfigError, NotOwned
from torchrelay.shared.events import (
    AnyEvent,
    TrainCompleted,
    TrainFailed,
    TrainProgressed,
    TrainRequested,
    TrainRestartRequested,
)
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec, TrainRequestedData
from torchrelay.shared.runtime.metrics import reconciled_counter
from torchrelay.shared.state import State
from torchrelay.shared.state.presence import Presence
from torchrelay.shared.storage import Layout, RunResult
from torchrelay.shared.storage.files import ModelDescription
from torchrelay.shared.testing import assert_eventually
from torchrelay.shared.testing.fixtures import wipe_jetstream

pytestmark = pytest.mark.timeout(60)
QUICK = SimulatedTraining(min_duration_s=0.2, max_duration_s=0.3, progress_interval_s=0.05)
LONG = SimulatedTraining(min_duration_s=60, max_duration_s=60, progress_interval_s=0.05)
ENTRYPOINT = "torchrelay.services.train.examples.digits:train"


def spec() -> TrainJobSpec:
    return TrainJobSpec(
        dataset=DatasetRef(name="digits", version="v1"),
        entrypoint=ENTRYPOINT,
        model_name="digits",
        max_restarts=1,
    )


def job(root: Path, run_id: str, attempt: int = 0, nats_url: str | None = None) -> WorkerJob:
    return WorkerJob(
        run_id=run_id,
        attempt=attempt,
        job=spec(),
        dataset_path="datasets/digits/v1",
        storage_root=str(root),
        nats_url=nats_url,
    )


class Progress:
    """A stand-in for the bus: the progress events an attempt published."""

    def __init__(self) -> None:
        self.events: list[AnyEvent] = []

    async def __call__(self, event: AnyEvent) -> bool:
        self.events.append(event)
        return True


@pytest.fixture
async def backend() -> AsyncIterator[SimulatedBackend]:
    simulated = SimulatedBackend(QUICK, publish=Progress())
    yield simulated
    await simulated.aclose()


async def test_opening_it_without_the_opt_in_is_refused_as_for_benchmarks_and_tests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(OPT_IN, raising=False)
    with pytest.raises(ConfigError, match="benchmarks and tests"):
        await open_training_backend("simulated", TrainingConfig())
    monkeypatch.setenv(OPT_IN, "true")
    opened = await open_training_backend("simulated", TrainingConfig())
    assert opened.name == "simulated"
    await opened.aclose()


async def test_an_attempt_runs_then_leaves_what_a_successful_rank_0_leaves(
    backend: SimulatedBackend, tmp_path: Path
) -> None:
    work = job(tmp_path, "r1")
    handle = await backend.schedule(backend.dryrun(work))
    described = await backend.describe(handle)
    assert described is not None
    assert described.phase is Phase.RUNNING
    ended = await asyncio.wait_for(backend.wait(handle), 10)
    assert ended.status is Status.SUCCEEDED, ended
    after = await backend.describe(handle)
    assert after is None or after.phase is Phase.SUCCEEDED
    layout = Layout(tmp_path)
    result = RunResult.read(layout.result("r1"))
    assert (result.model_name, result.version, result.attempt) == ("digits", "r1", 0)
    assert ModelDescription.read(layout.model_description("digits", "r1")).lineage.run_id == "r1"


async def test_at_fail_rate_1_a_first_attempt_is_killed_and_the_next_succeeds(
    tmp_path: Path,
) -> None:
    failing = SimulatedTraining(min_duration_s=0.1, max_duration_s=0.1, fail_rate=1.0)
    backend = SimulatedBackend(failing, publish=Progress())
    try:
        first = await backend.schedule(backend.dryrun(job(tmp_path, "r1", attempt=0)))
        ended = await asyncio.wait_for(backend.wait(first), 10)
        assert ended.status is Status.FAILED
        assert (ended.rank, ended.signal) == (0, "SIGKILL")
        assert not Layout(tmp_path).result("r1").exists(), "a killed rank exports nothing"
        second = await backend.schedule(backend.dryrun(job(tmp_path, "r1", attempt=1)))
        assert (await asyncio.wait_for(backend.wait(second), 10)).status is Status.SUCCEEDED
    finally:
        await backend.aclose()


async def test_a_cancel_ends_the_wait_as_cancelled_and_cancelling_again_is_fine(
    tmp_path: Path,
) -> None:
    backend = SimulatedBackend(LONG, publish=Progress())
    try:
        handle = await backend.schedule(backend.dryrun(job(tmp_path, "r1")))
        waiting = asyncio.create_task(backend.wait(handle))
        await asyncio.sleep(0.1)
        await backend.cancel(handle)
        await backend.cancel(handle)
        assert (await asyncio.wait_for(waiting, 10)).status is Status.CANCELLED
        await backend.cancel(handle)  # after the end too
        assert await backend.describe(handle) is None
        with pytest.raises(NotOwned):
            await backend.cancel("another-replicas/0")
    finally:
        await backend.aclose()


async def test_attempts_are_the_replicas_own_and_dryrun_is_pure_and_reproducible(
    backend: SimulatedBackend, tmp_path: Path
) -> None:
    work = job(tmp_path, "r1")
    assert backend.dryrun(work) == backend.dryrun(work)
    assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == [], "nothing written"
    assert await backend.adopt(backend.dryrun(work)) is None
    assert await backend.describe(backend.dryrun(work).handle) is None
    draws = {plan(f"r{i}", 0, QUICK).duration_s for i in range(20)}
    assert len(draws) > 1, "durations vary between runs"
    assert all(QUICK.min_duration_s <= d <= QUICK.max_duration_s for d in draws)


async def test_progress_reaches_the_bus_as_rank_0_reports_it(nats_url: str, tmp_path: Path) -> None:
    await wipe_jetstream(nats_url)
    nc = await nats.connect(nats_url)
    bus = JetStreamBus(nc)
    await bus.ensure_stream()
    heard: list[dict[str, object]] = []

    async def keep(msg: Msg) -> None:
        heard.append(json.loads(msg.data))

    subscription = await nc.subscribe(TrainProgressed.nats_subject, cb=keep)
    backend = SimulatedBackend(QUICK)
    try:
        handle = await backend.schedule(backend.dryrun(job(tmp_path, "r1", nats_url=nats_url)))
        assert (await asyncio.wait_for(backend.wait(handle), 10)).status is Status.SUCCEEDED
        await assert_eventually(lambda: len(heard) >= 2, timeout_s=5)
    finally:
        await backend.aclose()
        await subscription.unsubscribe()
        await bus.aclose()
    assert {e["source"] for e in heard} == {"/torchrelay/train/worker"}
    assert {e["subject"] for e in heard} == {"r1"}
    steps = [e["data"]["step"] for e in heard]  # type: ignore[index]
    assert steps == sorted(steps)


async def test_a_run_whose_first_attempt_fails_is_restarted_once_by_the_monitor_and_succeeds(
    any_state: State, tmp_path: Path
) -> None:
    """The real train handlers and monitor (state in memory and over JetStream KV), with the
    events routed between them."""
    manifest = Layout(tmp_path).manifest("digits", "v1")
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    state, published = any_state, Published()
    presence = Presence(state.leases, "train", f"train-{uuid.uuid4().hex[:6]}")
    await presence.announce()
    sim = SimulatedTraining(min_duration_s=0.2, max_duration_s=0.2, fail_rate=1.0)
    backend = SimulatedBackend(sim, publish=published)
    trainer = Trainer(
        backend=backend,
        state=state,
        publish=published,
        storage_root=tmp_path,
        nats_url="nats://127.0.0.1:1",
        presence=presence,
        source="/torchrelay/train",
        entrypoints=["torchrelay.services.train.examples"],
        reconciled=reconciled_counter(CollectorRegistry()),
    )
    monitor = Monitor(
        metrics=EventMetrics(CollectorRegistry()),
        state=state,
        publish=published,
        options=MonitorOptions(backoff_base_s=0),
        source="/torchrelay/monitor",
        instance="tests",
        reconciled=reconciled_counter(CollectorRegistry()),
    )
    routed = 0

    async def route() -> bool:
        """Deliver what was published since last time; True once the run completed."""
        nonlocal routed
        while routed < len(published.events):
            event = published.events[routed]
            routed += 1
            await monitor.on_event(event)
            if isinstance(event, TrainRestartRequested):
                await trainer.on_restart_requested(event)
        return bool(published.of(TrainCompleted))

    try:
        request = TrainRequestedData(run_id=f"r{uuid.uuid4().hex[:6]}", spec=spec())
        await trainer.on_requested(TrainRequested(source="/tests", data=request))
        await assert_eventually(route, timeout_s=20)
        record = await trainer.runs.get(str(request.run_id))
        assert record is not None
        assert (record.value.status, record.value.attempt) == ("succeeded", 1)
    finally:
        await trainer.aclose()
    (failed,) = published.of(TrainFailed)
    assert not failed.data.final
    assert [r.data.attempt for r in published.of(TrainRestartRequested)] == [1]
    (completed,) = published.of(TrainCompleted)
    assert completed.data.run_id == request.run_id
    assert published.of(TrainProgressed), "the attempts reported progress"
