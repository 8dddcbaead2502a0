"""The train service as a real process: requests, progress, failures, restart, cancel."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from tests.integration.processes import ServiceProcess
from tests.integration.training import request, train_service, workers_of
from tests.integration.watching import Watcher, watching
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.events import (
    DatasetStaged,
    TrainCancelRequested,
    TrainCheckpointed,
    TrainCompleted,
    TrainFailed,
    TrainProgressed,
    TrainRestartRequested,
    TrainStarted,
)
from torchrelay.shared.events.data import (
    DatasetSource,
    DatasetStagedData,
    PipelineSpec,
    TrainCancelRequestedData,
    TrainingStage,
    TrainRestartRequestedData,
)
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.state import KvState, key_part
from torchrelay.shared.testing import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
EXAMPLES = "torchrelay.services.train.examples"
# The bundled examples plus this suite's failure trainers; nothing else may run.
ENTRYPOINTS = f"{EXAMPLES},tests.integration.trainers"


@pytest.fixture(scope="module")
def staged(staged_digits: tuple[Path, str]) -> tuple[Path, str]:
    return staged_digits


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    kinds = [TrainStarted, TrainProgressed, TrainCheckpointed, TrainCompleted, TrainFailed]
    async with watching(nats_url, "test-train-watch", kinds) as pair:
        yield pair


@pytest.fixture
def train(nats_url: str, staged: tuple[Path, str], tmp_path: Path) -> Iterator[ServiceProcess]:
    process = train_service(
        nats_url,
        staged[0],
        tmp_path / "train.log",
        TORCHRELAY_TRAIN_MAX_WORLD_SIZE="4",
        TORCHRELAY_TRAIN_ENTRYPOINTS=ENTRYPOINTS,
    )
    yield process
    process.stop()


async def test_a_request_trains_reports_and_completes(
    bus: tuple[JetStreamBus, Watcher], train: ServiceProcess, staged: tuple[Path, str]
) -> None:
    publisher, watcher = bus
    await train.wait_ready()
    await publisher.publish(request(staged, "ok-run"))
    await assert_eventually(lambda: watcher.of(TrainCompleted, run_id="ok-run"), timeout_s=120)
    completed = watcher.of(TrainCompleted, run_id="ok-run")[0]
    assert completed.data.model_version == "ok-run"
    assert completed.pipelineid == "pipe-t"
    assert (staged[0] / completed.data.path / "model.json").exists()
    started = watcher.of(TrainStarted, run_id="ok-run")
    assert [e.data.attempt for e in started] == [0]
    assert started[0].data.backend == "local"
    assert watcher.of(TrainProgressed, run_id="ok-run"), "rank 0 reported progress"
    assert watcher.of(TrainCheckpointed, run_id="ok-run")
    assert workers_of("ok-run") == []


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"dataset": {"name": "digits", "version": "nope"}}, "unknown dataset digits version nope"),
        ({"entrypoint": f"{EXAMPLES}.no_such_module:train"}, "not importable"),
        ({"entrypoint": "os:system"}, f"not under TORCHRELAY_TRAIN_ENTRYPOINTS ({ENTRYPOINTS})"),
        (
            {"entrypoint": "tests.integration.trainers:Unscriptable"},
            "'Unscriptable' is not a function defined in module 'tests.integration.trainers'",
        ),
        ({"world_size": 8}, "world size 8"),
        ({"entrypoint": "tests.integration.trainers:explode"}, "training function raised"),
    ],
)
async def test_bad_requests_end_in_train_failed_with_the_reason(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    staged: tuple[Path, str],
    spec: dict[str, object],
    reason: str,
) -> None:
    publisher, watcher = bus
    await train.wait_ready()
    await publisher.publish(request(staged, "bad-run", max_restarts=0, **spec))
    await assert_eventually(lambda: watcher.of(TrainFailed, run_id="bad-run"), timeout_s=60)
    failed = watcher.of(TrainFailed, run_id="bad-run")[0].data
    assert reason in failed.reason
    assert failed.final
    assert workers_of("bad-run") == []


async def test_code_outside_the_entrypoint_policy_never_reaches_a_worker(
    bus: tuple[JetStreamBus, Watcher], train: ServiceProcess, staged: tuple[Path, str]
) -> None:
    publisher, watcher = bus
    state = await KvState.open(publisher.nc.jetstream())
    pipelines = state.store("pipelines", PipelineRecord)
    training = TrainingStage(entrypoint="subprocess:call", model_name="digits", world_size=2)
    spec = PipelineSpec(
        name="digits",
        dataset=DatasetSource(name="digits", source="sklearn:digits"),
        training=training,
    )
    now = datetime.now(UTC)
    await pipelines.create(
        pipeline_key("pipe-evil"),
        PipelineRecord(pipeline_id="pipe-evil", spec=spec, submitted=now),
    )
    await train.wait_ready()
    await publisher.publish(request(staged, "sneaky", entrypoint="os:system"))
    await publisher.publish(
        DatasetStaged(
            source="/tests",
            pipelineid="pipe-evil",
            data=DatasetStagedData(
                name="digits",
                version=staged[1],
                path=f"datasets/digits/{staged[1]}",
                format="npz",
                files=1,
                size_bytes=1,
                manifest_sha256="0" * 64,
            ),
        )
    )

    for run_id, entrypoint in [("sneaky", "os:system"), ("pipe-evil.train", "subprocess:call")]:
        failed = await watcher.one(TrainFailed, run_id=run_id, timeout_s=30)
        module = entrypoint.partition(":")[0]
        assert failed.data.reason == (
            f"entrypoint {entrypoint!r} is not allowed: module {module!r} is not under "
            f"TORCHRELAY_TRAIN_ENTRYPOINTS ({ENTRYPOINTS}); add its package to that setting"
        )
        assert failed.data.final, "no restart may follow a refusal"
        assert failed.data.exit_code is None
        assert watcher.of(TrainStarted, run_id=run_id) == []
        assert not (staged[0] / "runs" / run_id).exists(), "no attempt was ever launched"
        run = await state.store("runs", RunRecord).get(key_part(run_id))
        assert run is not None
        assert (run.value.status, run.value.reason) == ("failed", failed.data.reason)

    pipeline = await pipelines.get(pipeline_key("pipe-evil"))
    assert pipeline is not None
    stage = pipeline.value.stages["train"]
    assert stage.status == "failed"
    assert stage.reason is not None
    assert "'subprocess:call' is not allowed" in stage.reason
    assert "TORCHRELAY_TRAIN_ENTRYPOINTS" in stage.reason
    assert pipeline.value.status == "failed"
    assert train.logged("run.failed"), "the service said why"


async def test_a_killed_worker_fails_the_run_and_a_restart_resumes_it(
    bus: tuple[JetStreamBus, Watcher], train: ServiceProcess, staged: tuple[Path, str]
) -> None:
    publisher, watcher = bus
    await train.wait_ready()
    await publisher.publish(request(staged, "phoenix", hyperparameters={"epochs": 20}))
    await assert_eventually(
        lambda: any(e.data.step >= 40 for e in watcher.of(TrainCheckpointed, run_id="phoenix")),
        timeout_s=60,
    )
    victim = max(workers_of("phoenix"))
    os.kill(victim, signal.SIGKILL)
    await assert_eventually(lambda: watcher.of(TrainFailed, run_id="phoenix"), timeout_s=60)
    failed = watcher.of(TrainFailed, run_id="phoenix")[0].data
    assert failed.signal == "SIGKILL"
    assert not failed.final, "restarts are left"
    assert workers_of("phoenix") == [], "the other rank was torn down"
    await publisher.publish(
        TrainRestartRequested(
            source="/tests",
            data=TrainRestartRequestedData(run_id="phoenix", reason="worker died", attempt=1),
        )
    )
    await assert_eventually(lambda: watcher.of(TrainCompleted, run_id="phoenix"), timeout_s=120)
    assert [e.data.attempt for e in watcher.of(TrainStarted, run_id="phoenix")] == [0, 1]


async def test_cancel_stops_a_run(
    bus: tuple[JetStreamBus, Watcher], train: ServiceProcess, staged: tuple[Path, str]
) -> None:
    publisher, watcher = bus
    await train.wait_ready()
    await publisher.publish(request(staged, "stopme", hyperparameters={"epochs": 500}))
    await assert_eventually(lambda: len(workers_of("stopme")) == 2, timeout_s=30)
    await publisher.publish(
        TrainCancelRequested(source="/tests", data=TrainCancelRequestedData(run_id="stopme"))
    )
    await assert_eventually(lambda: watcher.of(TrainFailed, run_id="stopme"), timeout_s=30)
    assert watcher.of(TrainFailed, run_id="stopme")[0].data.reason == "cancelled"
    assert workers_of("stopme") == []


# --- recovery by the monitor -------------------------------------------------------------------


@pytest.fixture
def monitors(nats_url: str, tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    started = [
        ServiceProcess(
            ["-m", "torchrelay", "service", "monitor", "--nats-url", nats_url, "--http-port", "0"],
            tmp_path / f"monitor-{index}.log",
            env={
                # Above a worker's start-up here (torch import, data, the first DDP step: ~6 s
                # on two busy cores), or every attempt is cancelled before its first step.
                "TORCHRELAY_MONITOR_STALL_AFTER_S": "15",
                "TORCHRELAY_MONITOR_STALL_CHECK_S": "0.5",
                "TORCHRELAY_MONITOR_BACKOFF_BASE_S": "0.2",
                "TORCHRELAY_SHUTDOWN_GRACE_S": "5",
                "TORCHRELAY_SHUTDOWN_DEADLINE_S": "10",
            },
        )
        for index in range(2)
    ]
    yield started
    for process in started:
        process.stop()


async def ready(*processes: ServiceProcess) -> None:
    for process in processes:
        await process.wait_ready()


async def restarts_counted(monitors: list[ServiceProcess], cause: str) -> float:
    total = 0.0
    async with aiohttp.ClientSession() as http:
        for process in monitors:
            async with http.get(f"http://127.0.0.1:{process.http_port}/metrics") as response:
                text = await response.text()
            match = re.search(rf'torchrelay_train_restarts_total\{{cause="{cause}"\}} (\S+)', text)
            total += float(match[1]) if match else 0.0
    return total


async def test_a_killed_worker_is_restarted_once_by_two_monitors_and_the_run_completes(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    monitors: list[ServiceProcess],
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    await ready(train, *monitors)
    await publisher.publish(request(staged, "healed", hyperparameters={"epochs": 20}))
    await assert_eventually(
        lambda: any(e.data.step >= 40 for e in watcher.of(TrainCheckpointed, run_id="healed")),
        timeout_s=60,
    )
    os.kill(max(workers_of("healed")), signal.SIGKILL)
    await assert_eventually(lambda: watcher.of(TrainCompleted, run_id="healed"), timeout_s=120)
    assert [e.data.attempt for e in watcher.of(TrainStarted, run_id="healed")] == [0, 1]
    assert await restarts_counted(monitors, "failed") == 1.0


async def test_with_no_restarts_left_the_run_ends_failed_with_the_reason(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    monitors: list[ServiceProcess],
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    await ready(train, *monitors)
    await publisher.publish(
        request(staged, "mortal", max_restarts=0, hyperparameters={"epochs": 20})
    )
    await assert_eventually(lambda: len(workers_of("mortal")) == 2, timeout_s=30)
    await asyncio.sleep(1.0)
    os.kill(max(workers_of("mortal")), signal.SIGKILL)
    await assert_eventually(lambda: watcher.of(TrainFailed, run_id="mortal"), timeout_s=60)
    failed = watcher.of(TrainFailed, run_id="mortal")[0].data
    assert failed.final
    assert "killed by SIGKILL" in failed.reason
    await asyncio.sleep(2.0)
    assert [e.data.attempt for e in watcher.of(TrainStarted, run_id="mortal")] == [0]
    assert await restarts_counted(monitors, "failed") == 0.0


async def test_a_stalled_run_is_detected_and_restarted(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    monitors: list[ServiceProcess],
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    await ready(train, *monitors)
    await publisher.publish(request(staged, "frozen", hyperparameters={"epochs": 20}))
    await assert_eventually(lambda: watcher.of(TrainProgressed, run_id="frozen"), timeout_s=60)
    os.kill(max(workers_of("frozen")), signal.SIGSTOP)
    await assert_eventually(lambda: watcher.of(TrainCompleted, run_id="frozen"), timeout_s=120)
    assert [e.data.attempt for e in watcher.of(TrainStarted, run_id="frozen")] == [0, 1]
    assert await restarts_counted(monitors, "stalled") == 1.0
    (cancelled,) = watcher.of(TrainFailed, run_id="frozen")
    assert cancelled.data.attempt == 0
    assert not cancelled.data.final, "the monitor cancelled it to restart it: the run went on"


async def test_a_stalled_run_with_no_restart_left_is_given_up_with_the_reason(
    bus: tuple[JetStreamBus, Watcher],
    train: ServiceProcess,
    monitors: list[ServiceProcess],
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    await ready(train, *monitors)
    await publisher.publish(
        request(staged, "stuck", max_restarts=0, hyperparameters={"epochs": 20})
    )
    await assert_eventually(lambda: watcher.of(TrainProgressed, run_id="stuck"), timeout_s=60)
    os.kill(max(workers_of("stuck")), signal.SIGSTOP)

    def given_up() -> bool:
        return any("stalled" in e.data.reason for e in watcher.of(TrainFailed, run_id="stuck"))

    await assert_eventually(given_up, timeout_s=60)
    final = next(e for e in watcher.of(TrainFailed, run_id="stuck") if "stalled" in e.data.reason)
    assert final.data.final
    assert final.source == "/torchrelay/monitor"
    assert "restarts are used" in final.data.reason
    assert [e.data.attempt for e in watcher.of(TrainStarted, run_id="stuck")] == [0]
    await assert_eventually(lambda: workers_of("stuck") == [], timeout_s=15)
