"""User-code errors fail fast and say why (issue 14): the train service and a monitor as real
processes, ranks on the local backend.

Code that cannot be imported, or that raises before its first step, would fail the same way on
every attempt: its run ends at once, restarts left or not, and train.failed carries the
exception's type, message and traceback. A crash after progress, or a killed rank, is restarted
from the checkpoint as before.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.failing_trainers import CRASH_AT_STEP
from tests.integration.processes import ServiceProcess
from tests.integration.training import request, train_service, workers_of
from tests.integration.watching import Watcher, watching
from torchrelay.shared.bus.jetstream import JetStreamBus
from torchrelay.shared.events import (
    AnyEvent,
    TrainCheckpointed,
    TrainCompleted,
    TrainFailed,
    TrainRestartRequested,
    TrainStarted,
)
from torchrelay.shared.runs import RunRecord
from torchrelay.shared.state import KvState, key_part
from torchrelay.shared.storage import Layout
from torchrelay.shared.storage.failures import RankFailure
from torchrelay.shared.testing import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
FAILING = "tests.integration.failing_trainers"
BROKEN = "tests.integration.broken_trainer"
ENTRYPOINTS = f"torchrelay.services.train.examples,{FAILING},{BROKEN}"


@pytest.fixture(scope="module")
def staged(staged_digits: tuple[Path, str]) -> tuple[Path, str]:
    return staged_digits


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[tuple[JetStreamBus, Watcher]]:
    kinds: list[type[AnyEvent]] = [
        TrainStarted,
        TrainCheckpointed,
        TrainCompleted,
        TrainFailed,
        TrainRestartRequested,
    ]
    async with watching(nats_url, "test-user-code-watch", kinds) as pair:
        yield pair


@pytest.fixture
def services(
    nats_url: str, staged: tuple[Path, str], tmp_path: Path
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    shutdown = {"TORCHRELAY_SHUTDOWN_GRACE_S": "5", "TORCHRELAY_SHUTDOWN_DEADLINE_S": "10"}
    train = train_service(
        nats_url,
        staged[0],
        tmp_path / "train.log",
        TORCHRELAY_TRAIN_MAX_WORLD_SIZE="2",
        TORCHRELAY_TRAIN_ENTRYPOINTS=ENTRYPOINTS,
    )
    monitor = ServiceProcess(
        ["-m", "torchrelay", "service", "monitor", "--nats-url", nats_url, "--http-port", "0"],
        tmp_path / "monitor.log",
        env={
            # Above a worker's start-up on two busy cores: no attempt is taken for stalled.
            "TORCHRELAY_MONITOR_STALL_AFTER_S": "30",
            "TORCHRELAY_MONITOR_BACKOFF_BASE_S": "0.2",
            **shutdown,
        },
    )
    yield train, monitor
    train.stop()
    monitor.stop()


async def monitor_counts(monitor: ServiceProcess) -> dict[str, float]:
    """The monitor's restarts after a failure and runs given up."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{monitor.http_port}/metrics") as response,
    ):
        text = await response.text()
    counts = {}
    for name, pattern in [
        ("restarts", r'^torchrelay_train_restarts_total\{cause="failed"\} (\S+)$'),
        ("given_up", r"^torchrelay_train_given_up_total (\S+)$"),
    ]:
        match = re.search(pattern, text, re.MULTILINE)
        counts[name] = float(match[1]) if match else 0.0
    return counts


def restored_steps(root: Path, run_id: str, *, attempt: int) -> list[int]:
    """The checkpoint steps rank 0 of ``attempt`` said it restored, from its log."""
    path = Layout(root).rank_log(run_id, attempt, 0)
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [r["step"] for r in records if r.get("event") == "checkpoint.restored"]


async def ended_at_once(
    watcher: Watcher, monitor: ServiceProcess, run_id: str
) -> tuple[TrainFailed, dict[str, float]]:
    """The run's one train.failed, once the monitor has handled it."""
    failed: TrainFailed = await watcher.one(TrainFailed, run_id=run_id, timeout_s=90)

    async def handled() -> bool:
        return (await monitor_counts(monitor))["given_up"] >= 1

    await assert_eventually(handled, timeout_s=30, message="the monitor never saw the failure")
    return failed, await monitor_counts(monitor)


@pytest.mark.parametrize(
    ("entrypoint", "error_type", "error_message", "reason", "exit_code"),
    [
        (
            f"{BROKEN}:train",
            "ModuleNotFoundError",
            "No module named 'torchrelay_missing_dependency'",
            f"the entrypoint '{BROKEN}:train' cannot run: ModuleNotFoundError: No module named "
            "'torchrelay_missing_dependency' (rank {rank}): not restarted, it would fail again",
            3,
        ),
        (
            f"{FAILING}:bad_column",
            "ValueError",
            "bad column 'z'",
            "the training function raised ValueError: bad column 'z' before its first step "
            "(rank {rank}): not restarted, it would fail again",
            1,
        ),
    ],
)
async def test_code_that_would_fail_again_ends_its_run_at_once_and_says_why(
    *,
    bus: tuple[JetStreamBus, Watcher],
    services: tuple[ServiceProcess, ServiceProcess],
    staged: tuple[Path, str],
    entrypoint: str,
    error_type: str,
    error_message: str,
    reason: str,
    exit_code: int,
) -> None:
    publisher, watcher = bus
    train, monitor = services
    await train.wait_ready()
    await monitor.wait_ready()
    run_id = f"typo-{exit_code}"
    await publisher.publish(request(staged, run_id, entrypoint=entrypoint, max_restarts=3))
    failed, counts = await ended_at_once(watcher, monitor, run_id)

    data = failed.data
    assert data.final, "three restarts were left, but another attempt would fail the same way"
    assert (data.attempt, data.error_type, data.error_message) == (0, error_type, error_message)
    # Both ranks' code fails alike; the first to fail may stop the other before it writes.
    assert data.rank in {0, 1}
    assert data.reason == reason.format(rank=data.rank)
    assert data.exit_code in {exit_code, None}, "None: another rank's exit was seen first"
    assert data.log_tail[0] == "Traceback (most recent call last):"
    assert data.log_tail[-1] == f"{error_type}: {error_message}"
    assert any(entrypoint.partition(":")[0].replace(".", "/") in line for line in data.log_tail)

    assert counts == {"restarts": 0.0, "given_up": 1.0}
    assert [e.data.attempt for e in watcher.of(TrainStarted, run_id=run_id)] == [0]
    assert watcher.of(TrainRestartRequested, run_id=run_id) == []
    state = await KvState.open(publisher.nc.jetstream())
    run = await state.store("runs", RunRecord).get(key_part(run_id))
    assert run is not None
    assert (run.value.status, run.value.attempt, run.value.reason) == ("failed", 0, data.reason)
    assert run.value.outcome == data
    assert workers_of(run_id) == []

    # What the rank wrote, and its log in plain text (not only as escaped JSON).
    layout = Layout(staged[0])
    written = RankFailure.read(layout.rank_error(run_id, 0, data.rank))
    assert (written.error_type, written.message, written.repeatable) == (
        error_type,
        error_message,
        True,
    )
    log = layout.rank_log(run_id, 0, data.rank).read_text().splitlines()
    assert "Traceback (most recent call last):" in log
    assert f"{error_type}: {error_message}" in log


async def test_a_crash_after_progress_is_restarted_from_its_checkpoint(
    bus: tuple[JetStreamBus, Watcher],
    services: tuple[ServiceProcess, ServiceProcess],
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    train, monitor = services
    await train.wait_ready()
    await monitor.wait_ready()
    entrypoint = f"{FAILING}:crash_once_after_a_checkpoint"
    await publisher.publish(request(staged, "crashy", entrypoint=entrypoint, max_restarts=1))
    await assert_eventually(
        lambda: bool(watcher.of(TrainCompleted, run_id="crashy")), timeout_s=180
    )

    (failed,) = watcher.of(TrainFailed, run_id="crashy")
    assert not failed.data.final, "the crash came after progress: a restart may get past it"
    assert (failed.data.error_type, failed.data.error_message) == (
        "RuntimeError",
        "the device was lost",
    )
    assert f"at step {CRASH_AT_STEP}" in failed.data.reason
    assert failed.data.log_tail[-1] == "RuntimeError: the device was lost"
    assert [e.data.attempt for e in watcher.of(TrainStarted, run_id="crashy")] == [0, 1]
    assert (await monitor_counts(monitor))["restarts"] == 1.0
    assert restored_steps(staged[0], "crashy", attempt=1) == [20], "from the checkpoint"


async def test_a_killed_rank_is_restarted(
    bus: tuple[JetStreamBus, Watcher],
    services: tuple[ServiceProcess, ServiceProcess],
    staged: tuple[Path, str],
) -> None:
    publisher, watcher = bus
    train, monitor = services
    await train.wait_ready()
    await monitor.wait_ready()
    await publisher.publish(
        request(staged, "killed", max_restarts=1, hyperparameters={"epochs": 200})
    )
    await assert_eventually(
        lambda: bool(watcher.of(TrainCheckpointed, run_id="killed")), timeout_s=60
    )
    checkpointed = watcher.of(TrainCheckpointed, run_id="killed")[0].data.step
    os.kill(max(workers_of("killed")), signal.SIGKILL)
    await watcher.one(TrainStarted, run_id="killed", attempt=1, timeout_s=60)
    await assert_eventually(
        lambda: bool(restored_steps(staged[0], "killed", attempt=1)), timeout_s=60
    )
    assert restored_steps(staged[0], "killed", attempt=1)[0] >= checkpointed

    (failed,) = watcher.of(TrainFailed, run_id="killed", attempt=0)
    assert not failed.data.final, "a killed rank says nothing about the code"
    if failed.data.signal == "SIGKILL":
        assert "was killed by SIGKILL" in failed.data.reason
        assert failed.data.error_type is None
    else:  # its peer noticed first: the collective's error, not counted as the code's
        assert failed.data.reason.startswith("a collective failed on rank")
