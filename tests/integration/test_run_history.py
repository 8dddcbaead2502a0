"""Run history people can look at: rank 0 writes what it reports as TensorBoard event files
under ``runs/<id>/tensorboard/attempt-<a>/``, a resumed attempt's curve continues after the
restored step, and ``torchrelay tensorboard`` serves them."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.integration.history_trainers import scheduled_lr
from tests.integration.processes import cli
from torchrelay.services.ingest.fill import fill_for
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.staging import Stager, StageRequest
from torchrelay.services.train.worker.history import RunHistory
from torchrelay.shared.cluster import Status, WorkerJob
from torchrelay.shared.cluster.local import LocalBackend
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec
from torchrelay.shared.storage import Layout, ModelDescription
from torchrelay.shared.testing import assert_eventually

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
]
DIGITS = "torchrelay.services.train.examples.digits:train"
CRASHING = "tests.integration.history_trainers:crash_once_after_a_checkpoint"


@pytest.fixture(scope="module")
def platform_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A state folder with no platform running (the storage under it, where `torchrelay`
    finds it) and the digits staged there: (state folder, dataset path, dataset version)."""
    state = tmp_path_factory.mktemp("state")
    staged = asyncio.run(
        Stager(state / "storage", IngestOptions().limits()).stage(
            StageRequest("r", "digits", "sklearn:digits"),
            fill_for("sklearn:digits", IngestOptions()),
        )
    )
    return state, staged.path, staged.manifest.version


def train(
    platform_state: tuple[Path, str, str], run_id: str, *, attempt: int = 0, **spec: object
) -> Status:
    state, path, version = platform_state
    fields: dict[str, object] = {
        "dataset": DatasetRef(name="digits", version=version),
        "model_name": "digits",
        "seed": 7,
        "checkpoint_every_steps": 20,
        "keep_checkpoints": 2,
        **spec,
    }
    work = WorkerJob(
        run_id=run_id,
        attempt=attempt,
        job=TrainJobSpec.model_validate(fields),
        dataset_path=path,
        storage_root=str(state / "storage"),
    )

    async def scheduled() -> Status:
        backend = LocalBackend(max_world_size=2)
        try:
            ended = await backend.wait(await backend.schedule(backend.dryrun(work)))
        finally:
            await backend.aclose()
        return ended.status

    return asyncio.run(scheduled())


@pytest.fixture(scope="module")
def finished_run(platform_state: tuple[Path, str, str]) -> str:
    """The digits on two ranks for 2 epochs: 22 steps an epoch, reports every 10 steps,
    checkpoints every 20, the export at step 44."""
    status = train(
        platform_state, "digits-run", entrypoint=DIGITS, world_size=2, hyperparameters={"epochs": 2}
    )
    assert status is Status.SUCCEEDED
    return "digits-run"


def read(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``folder``'s event files: tag -> [(step, value)], as TensorBoard reads
    them."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def steps(series: list[tuple[int, float]]) -> list[int]:
    return [step for step, _ in series]


def reported(log: Path) -> list[dict[str, object]]:
    """The progress reports rank 0 logged (its log is JSON lines, plus plain tracebacks)."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "train.progress"]


def test_a_finished_run_keeps_every_reported_metric_and_the_exported_accuracy(
    platform_state: tuple[Path, str, str], finished_run: str
) -> None:
    layout = Layout(platform_state[0] / "storage")
    history = layout.history(finished_run)
    assert sorted(p.name for p in history.iterdir()) == ["attempt-0"]
    files = list((history / "attempt-0").iterdir())
    assert len(files) == 1, "rank 1 writes no history: one event file, rank 0's"
    assert files[0].name.startswith("events.out.tfevents.")

    scalars = read(history / "attempt-0")
    assert set(scalars) == {
        "train/loss",
        "train/samples_per_s",
        "train/lr",
        "metrics/accuracy",  # each batch's, as the digits example reports it while it trains
        "export/accuracy",
    }
    logged = reported(layout.rank_log(finished_run, attempt=0, rank=0))
    assert steps(scalars["train/loss"]) == [line["step"] for line in logged] == [10, 20, 30, 40]
    for (_, loss), line in zip(scalars["train/loss"], logged, strict=True):
        assert loss == pytest.approx(line["loss"], rel=1e-6)
    for (_, accuracy), line in zip(scalars["metrics/accuracy"], logged, strict=True):
        assert accuracy == pytest.approx(line["metrics"]["accuracy"], rel=1e-6)
    for (_, rate), line in zip(scalars["train/samples_per_s"], logged, strict=True):
        assert rate == pytest.approx(line["samples_per_s"], rel=1e-6)
        assert rate > 0
    assert scalars["train/lr"] == [(step, pytest.approx(3e-3)) for step in (10, 20, 30, 40)]
    exported = ModelDescription.read(layout.model_description("digits", finished_run))
    assert exported.lineage.steps == 44
    assert scalars["export/accuracy"] == [(44, pytest.approx(exported.metrics["accuracy"]))]


def test_a_resumed_run_continues_its_curve_after_the_restored_step(
    platform_state: tuple[Path, str, str],
) -> None:
    """Attempt 0 checkpoints at 20 and 40, reports at 50, dies at 55; attempt 1 resumes from
    step 40. Each attempt is its own curve: the redone steps are not mixed into attempt 0's."""
    crashed = train(platform_state, "resumed-run", entrypoint=CRASHING, world_size=1)
    assert crashed is Status.FAILED
    resumed = train(platform_state, "resumed-run", attempt=1, entrypoint=CRASHING, world_size=1)
    assert resumed is Status.SUCCEEDED
    layout = Layout(platform_state[0] / "storage")
    log = layout.rank_log("resumed-run", attempt=1, rank=0).read_text()
    assert '"resumed_from_step": 40' in log

    first = read(layout.attempt_history("resumed-run", 0))
    second = read(layout.attempt_history("resumed-run", 1))
    # Attempt 0's report at step 50, after its last checkpoint, reached the storage too.
    assert steps(first["train/loss"]) == [10, 20, 30, 40, 50]
    assert steps(second["train/loss"]) == list(range(50, 111, 10))
    assert "export/accuracy" not in first
    assert second["export/accuracy"] == [(112, 0.5)]
    # The scheduler's learning rate as it was at each step, restored with the checkpoint.
    for attempt in (first, second):
        assert attempt["train/lr"] == [
            (step, pytest.approx(scheduled_lr(step))) for step in steps(attempt["train/loss"])
        ]
        assert attempt["metrics/batch"] == [
            (step, float(step - 1)) for step in steps(attempt["train/loss"])
        ]


def test_history_that_cannot_be_written_never_fails_training_and_warns_once(
    tmp_path: Path,
) -> None:
    blocked = tmp_path / "runs"
    blocked.write_text("a file where the run's folder should be")
    history = RunHistory(blocked / "r1" / "tensorboard" / "attempt-0")
    with capture_logs() as logs:
        history.scalars(10, {"train/loss": 1.0})
        history.scalars(20, {"train/loss": 0.5})
        history.flush()
        history.close()
    assert not history.writing
    warnings = [entry for entry in logs if entry["event"] == "history.unwritable"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert "attempt-0" in warnings[0]["folder"]
    assert blocked.read_text() == "a file where the run's folder should be"


def test_a_rank_other_than_0_writes_no_history_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a writer given no folder would put ./runs/...
    history = RunHistory(None)
    history.scalars(10, {"train/loss": 1.0})
    history.flush()
    history.close()
    assert not history.writing
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_refuses_runs_it_cannot_show_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Layout(state / "storage").logs("no-history").mkdir(parents=True)  # ran, wrote no history
    refusals = {
        "no-such-run": (1, "no run no-such-run under "),
        "no-history": (1, "run no-history has no history (TensorBoard event files) in "),
        "..": (2, "not a single path segment"),
    }
    for run_id, (code, message) in refusals.items():
        refused = cli("tensorboard", run_id, "--state-dir", str(state))
        assert refused.returncode == code, refused.stderr
        assert refused.stderr.startswith("torchrelay: ")
        assert message in refused.stderr
        assert len(refused.stderr.splitlines()) == 1, refused.stderr
        assert refused.stdout == ""
    nothing = cli("tensorboard", "--state-dir", str(state))
    assert nothing.returncode == 1
    assert nothing.stderr.splitlines() == [
        f"torchrelay: no run history under {state / 'storage' / 'runs'}: rank 0 of a run "
        "writes it as it trains"
    ]


async def test_tensorboard_serves_a_runs_history_until_ctrl_c(
    platform_state: tuple[Path, str, str], finished_run: str
) -> None:
    board = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "torchrelay", "tensorboard", finished_run, "--port", "0"],
        *["--state-dir", str(platform_state[0])],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert board.stdout is not None
        said = (await board.stdout.readline()).decode()
        found = re.search(r"http://127\.0\.0\.1:\d+/", said)
        assert found, said
        url = found[0]
        listed: list[str] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def lists_the_run() -> bool:
                try:
                    async with session.get(url + "data/runs") as answer:
                        listed[:] = await answer.json() if answer.status == 200 else []
                except aiohttp.ClientError:
                    return False
                return listed == [f"{finished_run}/attempt-0"]

            await assert_eventually(
                lists_the_run,
                timeout_s=60,
                interval_s=0.2,
                message=lambda: f"TensorBoard at {url} lists {listed}",
            )
    finally:
        board.send_signal(signal.SIGINT)
        _, errors = await asyncio.wait_for(board.communicate(), timeout=30)
    assert board.returncode == 0, errors
    assert b"Traceback" not in errors
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(url)
