"""The train service's sweeps over the State port: trials launched as runs a few at a time,
each once whatever replica advances the sweep, ended as their runs end, and the best one
handed on. Runs are simulated (real records, result files and events; no torch), so each
test takes a second or two."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.integration.in_memory import Published, present
from torchrelay.services.monitor.domain import request_stop
from torchrelay.services.train.handlers import Trainer
from torchrelay.services.train.suggest import OPTUNA_MISSING, suggest
from torchrelay.services.train.sweeps import Sweeps
from torchrelay.shared.cluster.registry import SimulatedTraining
from torchrelay.shared.cluster.simulated import SimulatedBackend
from torchrelay.shared.events import (
    DatasetStaged,
    SweepCancelRequested,
    SweepCompleted,
    SweepStarted,
    SweepTrialStarted,
    SweepTrialStopped,
    TrainCancelRequested,
    TrainCompleted,
    TrainFailed,
    TrainRestartRequested,
    TrainStarted,
)
from torchrelay.shared.events.data import (
    DatasetRef,
    DatasetStagedData,
    PipelineSpec,
    SweepCancelRequestedData,
    TrainFailedData,
    TrainJobSpec,
    TrainRestartRequestedData,
)
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key
from torchrelay.shared.runs import RunRecord, halted_event_id
from torchrelay.shared.runtime.metrics import reconciled_counter
from torchrelay.shared.state import MemoryState, key_part
from torchrelay.shared.storage import Layout
from torchrelay.shared.sweep_state import (
    Suggest,
    SweepRecord,
    cancel,
    fill_slots,
    new_sweep,
    sweep_key,
)
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(120)
ENTRYPOINT = "torchrelay.services.train.examples.digits:train"
QUICK = SimulatedTraining(min_duration_s=0.05, max_duration_s=0.4, progress_interval_s=0.05)
LONG = SimulatedTraining(min_duration_s=600, max_duration_s=600, progress_interval_s=60)
"""Runs that never end by themselves: a test ends them."""


def pipeline_spec(**sweep: Any) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": "swept",
            "dataset": {"name": "digits", "source": "sklearn:digits"},
            "training": {
                "entrypoint": ENTRYPOINT,
                "model_name": "digits",
                "hyperparameters": {"epochs": 2},
            },
            "sweep": {
                "space": {"lr": {"type": "choice", "values": [0.1, 0.01, 0.001, 0.0001]}},
                "algorithm": "grid",
                "objective": {"metric": "loss", "direction": "minimize"},
                "max_trials": 4,
                "parallel": 2,
                **sweep,
            },
        }
    )


class Replica:
    """One train replica: its trainer (simulated runs) and its sweeps, over shared state."""

    def __init__(
        self,
        world: World,
        suggest: Suggest | None,
        sim: SimulatedTraining,
    ) -> None:
        self.state, self.storage, self.published = world.state, world.storage, world.published
        self._suggest, self._sim = suggest, sim

    async def __aenter__(self) -> Sweeps:
        self.trainer = Trainer(
            backend=SimulatedBackend(self._sim, publish=self.published),
            state=self.state,
            publish=self.published,
            storage_root=self.storage,
            nats_url="nats://127.0.0.1:1",
            presence=await present(self.state, "train"),
            source="/torchrelay/train",
            entrypoints=["torchrelay.services.train.examples"],
            reconciled=reconciled_counter(CollectorRegistry()),
        )
        return Sweeps(
            trainer=self.trainer,
            state=self.state,
            publish=self.published,
            source="/torchrelay/train",
            suggest=self._suggest,
        )

    async def __aexit__(self, *exc: object) -> None:
        await self.trainer.aclose()


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.state, self.published, self.storage = MemoryState(), Published(), tmp_path
        manifest = Layout(tmp_path).manifest("digits", "v1")
        manifest.parent.mkdir(parents=True)
        manifest.write_text("{}")  # staged: all the train service checks before launching
        self.handled = 0

    def replica(self, suggest: Suggest | None = None, sim: SimulatedTraining = QUICK) -> Replica:
        return Replica(self, suggest, sim)

    async def submit(self, spec: PipelineSpec) -> tuple[str, DatasetStaged]:
        pipeline_id = f"sweep-{uuid.uuid4().hex[:8]}"
        record = PipelineRecord(pipeline_id=pipeline_id, spec=spec, submitted=datetime.now(UTC))
        await self.state.store("pipelines", PipelineRecord).create(
            pipeline_key(pipeline_id), record
        )
        staged = DatasetStaged(
            source="/torchrelay/ingest",
            pipelineid=pipeline_id,
            data=DatasetStagedData(
                name="digits",
                version="v1",
                path="datasets/digits/v1",
                format="npz",
                files=1,
                size_bytes=1,
                manifest_sha256="0" * 64,
            ),
        )
        return pipeline_id, staged

    async def deliver_endings(self, *replicas: Sweeps) -> None:
        """Hand each run's end (and each cancel of a run) published so far to the replicas in
        turn, as the bus would."""
        events = self.published.events[self.handled :]
        self.handled += len(events)
        for position, event in enumerate(events):
            replica = replicas[position % len(replicas)]
            if isinstance(event, TrainCompleted | TrainFailed):
                await replica.on_run_ended(event)
            elif isinstance(event, TrainCancelRequested):
                await replica.trainer.on_cancel_requested(event)

    async def sweep(self, sweep_id: str) -> SweepRecord:
        found = await self.state.store("sweeps", SweepRecord).get(sweep_key(sweep_id))
        assert found is not None
        return found.value

    async def run_until(
        self, sweep_id: str, done: Callable[[SweepRecord], bool], *replicas: Sweeps
    ) -> SweepRecord:
        async def reached() -> bool:
            await self.deliver_endings(*replicas)
            record = await self.sweep(sweep_id)
            assert record.count("running") <= record.spec.parallel, "more trials than slots"
            return done(record)

        await assert_eventually(reached, timeout_s=60, interval_s=0.02)
        return await self.sweep(sweep_id)

    def ids(self, kind: type[Any]) -> set[str]:
        return {event.id for event in self.published.of(kind)}


async def stop_early(world: World, sweep_id: str, run_id: str) -> None:
    """What the monitor writes into a trial before it cancels the trial's run."""
    await world.state.store("sweeps", SweepRecord).mutate(
        sweep_key(sweep_id), lambda record: request_stop(record, run_id, "median stopping: worse")
    )


async def crash_first_trial(world: World, sweep_id: str) -> str:
    """Trial 0's rank died: its run's attempt failed and a restart is due. Its run id."""
    run_id = f"{sweep_id}.trial-0"
    runs = world.state.store("runs", RunRecord)
    current = await runs.get(key_part(run_id))
    assert current is not None
    crash = TrainFailedData(run_id=run_id, reason="rank 0 was killed", final=False)
    await runs.put(
        key_part(run_id),
        current.value.model_copy(
            update={"status": "failed", "outcome": crash, "reason": crash.reason}
        ),
    )
    return run_id


def restart_request(sweep_id: str, run_id: str) -> TrainRestartRequested:
    """The monitor's request to restart the crashed attempt 0."""
    return TrainRestartRequested(
        source="/torchrelay/monitor",
        pipelineid=sweep_id,
        data=TrainRestartRequestedData(run_id=run_id, reason="rank 0 was killed", attempt=1),
    )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def over(record: SweepRecord) -> bool:
    return record.status != "running" and record.announced


async def test_a_sweep_runs_its_trials_two_at_a_time_and_hands_on_the_best(world: World) -> None:
    async with world.replica() as sweeps:
        sweep_id, staged = await world.submit(pipeline_spec())
        await sweeps.on_dataset_staged(staged)
        record = await world.sweep(sweep_id)
        assert [t.status for t in record.trials] == ["running", "running", "pending", "pending"]
        record = await world.run_until(sweep_id, over, sweeps)

    assert record.status == "completed"
    assert [t.status for t in record.trials] == ["completed"] * 4
    losses = {t.index: t.objective for t in record.trials}
    assert record.best == min(losses, key=lambda index: losses[index] or 1.0)
    (completed,) = world.published.of(SweepCompleted)
    assert completed.data.best_trial == record.best
    assert completed.data.hyperparameters == record.trials[record.best].params
    assert completed.data.model_version == record.trials[record.best].model_version
    assert (completed.data.completed, completed.data.stopped, completed.data.failed) == (4, 0, 0)
    assert len(world.ids(SweepStarted)) == 1
    assert len(world.ids(SweepTrialStarted)) == 4
    runs = world.state.store("runs", RunRecord)
    for trial in record.trials:
        run = await runs.get(key_part(trial.run_id))
        assert run is not None
        assert run.value.trial == trial.index
        assert run.value.spec.hyperparameters == {"epochs": 2, "lr": trial.params["lr"]}
    pipeline = await world.state.store("pipelines", PipelineRecord).get(pipeline_key(sweep_id))
    assert pipeline is not None
    train = pipeline.value.stages["train"]
    assert train.status == "succeeded"
    assert train.detail["trial"] == record.best
    assert train.detail["run_id"] == f"{sweep_id}.trial-{record.best}"


async def test_two_replicas_advancing_one_sweep_launch_each_trial_once(world: World) -> None:
    async with world.replica() as one, world.replica() as two:
        sweep_id, staged = await world.submit(pipeline_spec(max_trials=4, parallel=3))
        # The staged dataset reaches both (a redelivery after a replica died mid-way).
        await asyncio.gather(one.on_dataset_staged(staged), two.on_dataset_staged(staged))
        record = await world.run_until(sweep_id, over, one, two)

    assert record.status == "completed"
    assert len(world.ids(SweepTrialStarted)) == 4, "one start event per trial"
    launches = [e for e in world.published.events if type(e).__name__ == "TrainStarted"]
    assert sorted(e.data.run_id for e in launches) == sorted(t.run_id for t in record.trials)
    assert len(world.ids(SweepCompleted)) == 1


async def test_trials_a_replica_started_before_it_died_are_launched_by_the_next(
    world: World,
) -> None:
    sweep_id, _ = await world.submit(pipeline_spec(max_trials=3, parallel=2))
    # The dying replica got as far as the compare-and-set that started two trials: nothing
    # launched, nothing announced.
    spec = pipeline_spec(max_trials=3, parallel=2)
    assert spec.sweep is not None
    job = TrainJobSpec(
        dataset=DatasetRef(name="digits", version="v1"), **spec.training.model_dump()
    )
    now = datetime.now(UTC)
    started = fill_slots(new_sweep(sweep_id, spec.sweep, job, now), now)
    await world.state.store("sweeps", SweepRecord).create(sweep_key(sweep_id), started)

    async with world.replica() as sweeps:
        await sweeps.advance(sweep_id, None)
        runs = world.state.store("runs", RunRecord)
        for index in (0, 1):
            assert await runs.get(key_part(f"{sweep_id}.trial-{index}")) is not None
        assert await runs.get(key_part(f"{sweep_id}.trial-2")) is None, "one slot each"
        assert all(t.announced for t in (await world.sweep(sweep_id)).trials)
        record = await world.run_until(sweep_id, over, sweeps)
    assert [t.status for t in record.trials] == ["completed"] * 3
    assert len(world.ids(SweepTrialStarted)) == 3


async def test_trials_that_fail_or_are_stopped_end_so_and_none_completed_fails_the_pipeline(
    world: World,
) -> None:
    async with world.replica(sim=LONG) as sweeps:
        sweep_id, staged = await world.submit(pipeline_spec(max_trials=2, parallel=2))
        await sweeps.on_dataset_staged(staged)
        await stop_early(world, sweep_id, f"{sweep_id}.trial-1")
        # Both runs end for good before finishing: trial 0's crashes (no restart left), trial
        # 1's is cancelled as the monitor asked.
        runs = world.state.store("runs", RunRecord)
        for index, status, reason in [(0, "failed", "exit code 1"), (1, "cancelled", "stop")]:
            run_id = f"{sweep_id}.trial-{index}"
            current = await runs.get(key_part(run_id))
            assert current is not None
            failure = TrainFailedData(run_id=run_id, reason=reason, final=True)
            ended = current.value.model_copy(
                update={"status": status, "outcome": failure, "reason": failure.reason}
            )
            await runs.put(key_part(run_id), ended)
            await sweeps.on_run_ended(
                TrainFailed(source="/torchrelay/train", pipelineid=sweep_id, data=failure)
            )
        record = await world.sweep(sweep_id)

    assert [t.status for t in record.trials] == ["failed", "stopped"]
    assert record.status == "failed"
    stopped = {e.data.trial: e.data for e in world.published.of(SweepTrialStopped)}
    assert stopped[0].code == "failed"
    assert stopped[0].reason == "exit code 1"
    assert stopped[1].code == "early_stopped"
    assert stopped[1].reason == "median stopping: worse"
    (completed,) = world.published.of(SweepCompleted)
    assert completed.data.best_trial is None
    assert (completed.data.stopped, completed.data.failed) == (1, 1)
    pipeline = await world.state.store("pipelines", PipelineRecord).get(pipeline_key(sweep_id))
    assert pipeline is not None
    assert pipeline.value.stages["train"].status == "failed"
    assert "no trial of the sweep completed (1 stopped early, 1 failed)" in str(
        pipeline.value.stages["train"].reason
    )


async def test_a_cancelled_sweep_cancels_its_running_trials_starts_no_more_and_fails(
    world: World,
) -> None:
    async with world.replica(sim=LONG) as sweeps:
        sweep_id, staged = await world.submit(pipeline_spec(max_trials=4, parallel=2))
        await sweeps.on_dataset_staged(staged)
        cancel = SweepCancelRequested(
            source="/torchrelay/cli",
            pipelineid=sweep_id,
            data=SweepCancelRequestedData(sweep_id=sweep_id, reason="wrong data"),
        )
        await sweeps.on_cancel_requested(cancel)
        await sweeps.on_cancel_requested(cancel)  # a redelivery changes nothing
        record = await world.run_until(sweep_id, over, sweeps)

    assert record.status == "failed"
    assert record.cancelled == "wrong data"
    assert [t.status for t in record.trials] == ["cancelled", "cancelled", "pending", "pending"]
    runs = world.state.store("runs", RunRecord)
    for index, trial in enumerate(record.trials):
        run = await runs.get(key_part(trial.run_id))
        if index < 2:
            assert run is not None
            assert run.value.status == "cancelled"
        else:
            assert run is None, "a pending trial never starts once the sweep is cancelled"
    stopped = world.published.of(SweepTrialStopped)
    assert sorted((e.data.trial, e.data.code) for e in stopped) == [
        (0, "cancelled"),
        (1, "cancelled"),
    ]
    assert all(e.data.reason == "sweep cancelled: wrong data" for e in stopped)
    (completed,) = world.published.of(SweepCompleted)
    assert (completed.data.best_trial, completed.data.cancelled) == (None, True)
    assert completed.data.reason == "the sweep was cancelled: wrong data"
    pipeline = await world.state.store("pipelines", PipelineRecord).get(pipeline_key(sweep_id))
    assert pipeline is not None
    assert pipeline.value.stages["train"].status == "failed"
    assert pipeline.value.stages["train"].reason == "the sweep was cancelled: wrong data"


async def test_a_trial_stopped_while_its_run_awaited_a_restart_is_not_restarted(
    world: World,
) -> None:
    async with world.replica(sim=LONG) as sweeps:
        sweep_id, staged = await world.submit(pipeline_spec(max_trials=3, parallel=1))
        await sweeps.on_dataset_staged(staged)
        run_id = await crash_first_trial(world, sweep_id)
        # Meanwhile the monitor stopped the trial early; then the restart is asked for.
        await stop_early(world, sweep_id, run_id)
        await sweeps.trainer.on_restart_requested(restart_request(sweep_id, run_id))

        runs = world.state.store("runs", RunRecord)
        halted = await runs.get(key_part(run_id))
        assert halted is not None
        assert (halted.value.attempt, halted.value.over) == (0, True), "no restart, and final"
        assert halted.value.reason == "median stopping: worse"
        said = [e for e in world.published.of(TrainFailed) if e.id == halted_event_id(run_id, 0)]
        assert [e.data.final for e in said] == [True], "a final train.failed says so"
        record = await world.run_until(
            sweep_id, lambda r: r.trials[0].status == "stopped" and r.trials[1].announced, sweeps
        )
    assert record.trials[0].reason == "median stopping: worse"
    assert record.trials[1].status == "running", "its slot went to the next trial"
    assert [
        e.data.attempt for e in world.published.of(TrainStarted) if e.data.run_id == run_id
    ] == [0]


async def test_a_trial_whose_restart_the_sweeps_cancel_halted_ends_cancelled(
    world: World,
) -> None:
    """The train replica that gets the restart request halts the run (not the sweep's own
    advance): the trial still ends cancelled, from what the halt wrote on the run."""
    async with world.replica(sim=LONG) as sweeps:
        sweep_id, staged = await world.submit(pipeline_spec(max_trials=3, parallel=1))
        await sweeps.on_dataset_staged(staged)
        run_id = await crash_first_trial(world, sweep_id)
        await world.state.store("sweeps", SweepRecord).mutate(
            sweep_key(sweep_id), lambda record: cancel(record, "wrong data", datetime.now(UTC))
        )
        await sweeps.trainer.on_restart_requested(restart_request(sweep_id, run_id))
        record = await world.run_until(sweep_id, over, sweeps)
    assert (record.trials[0].status, record.trials[0].reason) == (
        "cancelled",
        "sweep cancelled: wrong data",
    )
    (stopped,) = world.published.of(SweepTrialStopped)
    assert stopped.data.code == "cancelled"
    (completed,) = world.published.of(SweepCompleted)
    assert (completed.data.failed, completed.data.cancelled) == (0, True)


async def test_a_bayesian_sweep_asks_optuna_for_each_trial_within_the_space(
    world: World,
) -> None:
    space = {
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1},
        "width": {"type": "int", "low": 8, "high": 64, "step": 8},
        "optimizer": {"type": "choice", "values": ["adam", "sgd"]},
    }
    async with world.replica(suggest) as sweeps:
        sweep_id, staged = await world.submit(
            pipeline_spec(algorithm="bayesian", space=space, max_trials=5, parallel=1)
        )
        await sweeps.on_dataset_staged(staged)
        assert len((await world.sweep(sweep_id)).trials) == 1, "suggested one at a time"
        record = await world.run_until(sweep_id, over, sweeps)

    assert len(record.trials) == 5
    assert [t.status for t in record.trials] == ["completed"] * 5
    for trial in record.trials:
        assert 1e-4 <= float(trial.params["lr"]) <= 1e-1
        assert trial.params["width"] in range(8, 65, 8)
        assert trial.params["optimizer"] in {"adam", "sgd"}
    assert len(world.ids(SweepTrialStarted)) == 5


async def test_a_bayesian_sweep_without_optuna_fails_its_train_stage_saying_so(
    world: World,
) -> None:
    space = {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}}
    async with world.replica(suggest=None) as sweeps:
        sweep_id, staged = await world.submit(
            pipeline_spec(algorithm="bayesian", space=space, max_trials=3, parallel=1)
        )
        await sweeps.on_dataset_staged(staged)
    pipeline = await world.state.store("pipelines", PipelineRecord).get(pipeline_key(sweep_id))
    assert pipeline is not None
    assert pipeline.value.stages["train"].status == "failed"
    assert pipeline.value.stages["train"].reason == OPTUNA_MISSING
    assert world.published.of(SweepTrialStarted) == []
    (ended,) = world.published.of(SweepCompleted)  # what ends the pipeline for other services
    assert (ended.data.best_trial, ended.data.reason) == (None, OPTUNA_MISSING)
