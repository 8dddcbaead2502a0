"""A sweep as the train service leaves it mid-way, for the monitor's tests: trials 0-2 completed
(final losses 0.5, 0.55, 0.6, with their histories), trial 3 running; loss minimized, median
stopping from step 10 once 3 trials completed."""

from __future__ import annotations

from datetime import UTC, datetime

from torchrelay.shared.events import TrainProgressed
from torchrelay.shared.events.data import DatasetRef, TrainJobSpec, TrainProgressData
from torchrelay.shared.events.sweep import SweepSpec
from torchrelay.shared.state import State
from torchrelay.shared.sweep_state import (
    SweepRecord,
    Trial,
    TrialHistory,
    TrialStatus,
    history_key,
    sweep_key,
    trial_run_id,
)

HISTORIES = {
    0: [(0, 2.0), (10, 1.0), (20, 0.6), (30, 0.5)],
    1: [(0, 2.1), (10, 1.1), (20, 0.7), (30, 0.55)],
    2: [(0, 2.2), (10, 1.2), (20, 0.8), (30, 0.6)],
}
"""The completed trials' losses: the median is 1.1 at step 10, 0.7 at step 20."""
WARMUP_STEPS = 10
MIN_TRIALS = 3


def sweep_spec(*, early_stopping: bool = True, metric: str = "loss") -> SweepSpec:
    return SweepSpec.model_validate(
        {
            "space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}},
            "algorithm": "random",
            "objective": {"metric": metric, "direction": "minimize"},
            "max_trials": 4,
            "parallel": 4,
            "early_stopping": (
                {"warmup_steps": WARMUP_STEPS, "min_trials": MIN_TRIALS} if early_stopping else None
            ),
        }
    )


def sweep_record(
    sweep_id: str,
    *,
    completed: int = 3,
    early_stopping: bool = True,
    metric: str = "loss",
) -> SweepRecord:
    """The sweep with its first ``completed`` trials completed, the next one running and the
    rest pending."""
    now = datetime.now(UTC)
    trials = []
    for index in range(4):
        status: TrialStatus = (
            "completed" if index < completed else "running" if index == completed else "pending"
        )
        trials.append(
            Trial(
                index=index,
                params={"lr": 10.0 ** -(index + 1)},
                run_id=trial_run_id(sweep_id, index),
                status=status,
                objective=HISTORIES[index][-1][1] if status == "completed" else None,
            )
        )
    return SweepRecord(
        sweep_id=sweep_id,
        spec=sweep_spec(early_stopping=early_stopping, metric=metric),
        job=TrainJobSpec(
            dataset=DatasetRef(name="digits", version="v1"),
            entrypoint="torchrelay.services.train.examples.digits:train",
            model_name="digits",
        ),
        trials=trials,
        created=now,
        updated=now,
    )


async def store_sweep(state: State, record: SweepRecord) -> None:
    """What the train service stores: the record, and the completed trials' histories (the
    monitor wrote them while they ran)."""
    await state.store("sweeps", SweepRecord).create(sweep_key(record.sweep_id), record)
    histories = state.store("sweeps", TrialHistory)
    for trial in record.trials:
        if trial.status == "completed":
            history = TrialHistory(points=HISTORIES[trial.index])
            await histories.create(history_key(record.sweep_id, trial.index), history)


def progress(
    pipeline_id: str | None, run_id: str, step: int, loss: float, **metrics: float
) -> TrainProgressed:
    return TrainProgressed(
        source="/torchrelay/train",
        subject=run_id,
        pipelineid=pipeline_id,
        data=TrainProgressData(
            run_id=run_id, step=step, epoch=0, loss=loss, samples_per_s=100.0, metrics=metrics
        ),
    )
