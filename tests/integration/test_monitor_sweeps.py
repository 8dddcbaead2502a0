"""The monitor's part of a sweep, in memory and over real JetStream: each running trial's
progress goes into its objective history, and a trial worse than the median of the completed
trials after its warm-up is stopped (the stop written into the trial, then one cancel on the
bus, whichever replica and however often the report is handled). The progress of runs that are
not trials costs no request. The metrics show each running sweep's trials and best objective."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prometheus_client import CollectorRegistry

from tests.integration.watching import watching
from tests.sweep_factories import (
    HISTORIES,
    WARMUP_STEPS,
    progress,
    store_sweep,
    sweep_record,
)
from torchrelay.services.monitor.handlers import EventMetrics, Monitor
from torchrelay.services.monitor.settings import MonitorOptions
from torchrelay.shared.bus.port import Publish
from torchrelay.shared.events import AnyEvent, TrainCancelRequested, TrainFailed
from torchrelay.shared.events.data import TrainFailedData
from torchrelay.shared.runtime.metrics import reconciled_counter
from torchrelay.shared.state import KvState, State, Store
from torchrelay.shared.sweep_state import (
    SweepRecord,
    TrialHistory,
    history_key,
    sweep_key,
    trial_run_id,
)
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def state(any_state: State) -> State:
    return any_state


class Replica:
    """A monitor, its metrics and what it published."""

    def __init__(self, state: State, publish: Publish | None = None) -> None:
        self.registry = CollectorRegistry()
        self.published: list[AnyEvent] = []
        self.monitor = Monitor(
            metrics=EventMetrics(self.registry),
            state=state,
            publish=publish or self._record,
            options=MonitorOptions(),
            source="/torchrelay/monitor",
            instance="tests",
            reconciled=reconciled_counter(self.registry),
        )

    async def _record(self, event: AnyEvent) -> bool:
        self.published.append(event)
        return True

    def cancels(self) -> list[AnyEvent]:
        return [e for e in self.published if isinstance(e, TrainCancelRequested)]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def _sweep_id() -> str:
    return f"sweep-{uuid.uuid4().hex[:8]}"


async def _stored(state: State, sweep_id: str) -> SweepRecord:
    found = await state.store("sweeps", SweepRecord).get(sweep_key(sweep_id))
    assert found is not None
    return found.value


async def _history(state: State, sweep_id: str, index: int) -> list[tuple[int, float]]:
    found = await state.store("sweeps", TrialHistory).get(history_key(sweep_id, index))
    return [] if found is None else found.value.points


async def test_a_diverging_trial_is_stopped_once_by_two_replicas_over_jetstream(
    nats_url: str,
) -> None:
    sweep_id = _sweep_id()
    run_id = f"{sweep_id}.trial-3"
    async with watching(nats_url, "test-sweep-cancels", [TrainCancelRequested]) as pair:
        bus, watcher = pair
        state = await KvState.open(bus.nc.jetstream())
        await store_sweep(state, sweep_record(sweep_id))
        one, two = Replica(state, bus.publish), Replica(state, bus.publish)
        diverged = progress(sweep_id, run_id, 20, 5.0)  # the median at step 20 is 0.7
        # One replica follows the running sweeps, the other reads the record from the bucket.
        async with one.monitor.sweeps.running:
            await assert_eventually(lambda: sweep_key(sweep_id) in one.monitor.sweeps.running)
            await one.monitor.on_event(diverged)
            await one.monitor.on_event(diverged)  # a redelivery
            await two.monitor.on_event(diverged)  # the same report on another replica
            await two.monitor.on_event(progress(sweep_id, run_id, 21, 6.0))  # before the cancel

        cancel = await watcher.one(TrainCancelRequested, run_id=run_id)
        await asyncio.sleep(0.5)  # time for a second one to arrive, were there one
        assert len(watcher.of(TrainCancelRequested, run_id=run_id)) == 1
        assert cancel.data.restart is False, "a stopped trial ends: no restart"
        assert cancel.pipelineid == sweep_id
        assert cancel.subject == run_id
        assert "median stopping" in cancel.data.reason

        trial = (await _stored(state, sweep_id)).trials[3]
        assert trial.status == "running", "the train service ends it when its run ends"
        assert trial.stop_requested == cancel.data.reason
        assert await _history(state, sweep_id, 3) == [(20, 5.0), (21, 6.0)]
        stopped = [r.sample("torchrelay_sweep_trials_stopped_total") for r in (one, two)]
        assert sum(s or 0.0 for s in stopped) == 1, "one stop, counted by one replica"


@pytest.mark.parametrize(
    ("completed", "step", "loss", "why"),
    [
        (3, WARMUP_STEPS - 1, 50.0, "during warm-up"),
        (2, 20, 50.0, "before min_trials trials completed"),
        (3, 20, 0.7, "at the median"),
        (3, 20, 0.3, "better than the median"),
    ],
)
async def test_a_trial_goes_on(
    state: State, completed: int, step: int, loss: float, why: str
) -> None:
    sweep_id = _sweep_id()
    run_id = f"{sweep_id}.trial-{completed}"
    await store_sweep(state, sweep_record(sweep_id, completed=completed))
    replica = Replica(state)
    await replica.monitor.on_event(progress(sweep_id, run_id, step, loss))
    assert replica.cancels() == [], why
    assert (await _stored(state, sweep_id)).trials[completed].stop_requested is None, why
    assert await _history(state, sweep_id, completed) == [(step, loss)], "its report is kept"


async def test_a_stop_written_by_a_replica_that_died_before_publishing_is_published(
    state: State,
) -> None:
    sweep_id = _sweep_id()
    run_id = f"{sweep_id}.trial-3"
    record = sweep_record(sweep_id)
    trials = [*record.trials[:3], record.trials[3].model_copy(update={"stop_requested": "worse"})]
    await store_sweep(state, record.model_copy(update={"trials": trials}))
    replica = Replica(state)
    await replica.monitor.on_event(progress(sweep_id, run_id, 30, 0.4))  # better by now
    (cancel,) = replica.cancels()
    assert cancel.data.reason == "worse", "the stop written is the one asked for"
    assert cancel.data.restart is False


async def test_a_sweep_without_early_stopping_keeps_histories_and_stops_nothing(
    state: State,
) -> None:
    sweep_id = _sweep_id()
    run_id = f"{sweep_id}.trial-3"
    await store_sweep(state, sweep_record(sweep_id, early_stopping=False))
    replica = Replica(state)
    await replica.monitor.on_event(progress(sweep_id, run_id, 20, 50.0))
    assert replica.cancels() == []
    assert (await _stored(state, sweep_id)).trials[3].stop_requested is None
    assert await _history(state, sweep_id, 3) == [(20, 50.0)]


async def test_progress_of_a_running_trial_is_appended_once_and_by_its_objective(
    state: State,
) -> None:
    sweep_id = _sweep_id()
    run_id = f"{sweep_id}.trial-3"
    await store_sweep(state, sweep_record(sweep_id, metric="accuracy"))
    replica = Replica(state)
    await replica.monitor.on_event(progress(sweep_id, run_id, 1, 2.0, accuracy=0.4))
    await replica.monitor.on_event(progress(sweep_id, run_id, 2, 1.8))  # no accuracy: skipped
    report = progress(sweep_id, run_id, 3, 1.7, accuracy=0.6)
    await replica.monitor.on_event(report)
    await replica.monitor.on_event(report)  # a redelivery adds nothing
    assert await _history(state, sweep_id, 3) == [(1, 0.4), (3, 0.6)]
    # A late report of a completed trial changes its history no more.
    await replica.monitor.on_event(progress(sweep_id, f"{sweep_id}.trial-0", 40, 0.1))
    assert await _history(state, sweep_id, 0) == HISTORIES[0]


class Counting:
    """A store that counts the requests sent through it."""

    def __init__(self, store: Store[SweepRecord]) -> None:
        self.store = store
        self.gets = 0

    async def get(self, key: str) -> object:
        self.gets += 1
        return await self.store.get(key)


async def test_progress_of_a_run_that_is_not_a_trial_costs_no_request(state: State) -> None:
    sweep_id = _sweep_id()
    await store_sweep(state, sweep_record(sweep_id))
    before = await state.store("sweeps", SweepRecord).get(sweep_key(sweep_id))
    replica = Replica(state)
    counting = Counting(replica.monitor.sweeps.records)
    replica.monitor.sweeps.records = counting  # type: ignore[assignment]
    # A plain pipeline's run, and a run of the sweep's pipeline that no trial runs.
    await replica.monitor.on_event(progress("plain", "plain-run", 20, 50.0))
    await replica.monitor.on_event(progress(sweep_id, f"{sweep_id}-extra", 20, 50.0))
    await replica.monitor.on_event(progress(None, "alone", 20, 50.0))
    assert counting.gets == 0, "no read of the sweeps bucket"
    # Named like a trial but in no sweep: one read, nothing written.
    await replica.monitor.on_event(progress("plain", "plain.trial-0", 20, 50.0))
    assert counting.gets == 1
    assert await _history(state, "plain", 0) == []
    assert replica.cancels() == []
    assert await state.store("sweeps", SweepRecord).get(sweep_key(sweep_id)) == before
    assert await _history(state, sweep_id, 3) == []


async def test_the_metrics_show_each_running_sweeps_trials_and_best_objective(
    state: State,
) -> None:
    sweep_id = _sweep_id()
    await store_sweep(state, sweep_record(sweep_id))
    replica = Replica(state)
    view = replica.monitor.sweeps.running
    async with view:
        await assert_eventually(lambda: sweep_key(sweep_id) in view)
        trials = "torchrelay_sweep_trials"
        assert replica.sample(trials, sweep=sweep_id, status="completed") == 3
        assert replica.sample(trials, sweep=sweep_id, status="running") == 1
        assert replica.sample(trials, sweep=sweep_id, status="stopped") == 0
        best = replica.sample("torchrelay_sweep_best_objective", sweep=sweep_id, metric="loss")
        assert best == 0.5
        # A sweep that ends leaves the metrics (the labels stay bounded by running sweeps).
        records = state.store("sweeps", SweepRecord)
        ended = (await _stored(state, sweep_id)).model_copy(update={"status": "completed"})
        await records.put(sweep_key(sweep_id), ended)
        await assert_eventually(lambda: sweep_key(sweep_id) not in view)
        assert replica.sample(trials, sweep=sweep_id, status="completed") is None


@pytest.mark.parametrize(("stopped", "given_up"), [(True, 0.0), (False, 1.0)])
async def test_a_trial_its_sweep_stopped_is_not_a_run_given_up_on(
    state: State, stopped: bool, given_up: float
) -> None:
    sweep_id = _sweep_id()
    record = sweep_record(sweep_id)
    if stopped:
        trials = list(record.trials)
        trials[3] = trials[3].model_copy(update={"stop_requested": "median stopping: worse"})
        record = record.model_copy(update={"trials": trials})
    await store_sweep(state, record)
    replica = Replica(state)
    run_id = trial_run_id(sweep_id, 3)
    ended = TrainFailed(
        source="/torchrelay/train",
        subject=run_id,
        pipelineid=sweep_id,
        data=TrainFailedData(run_id=run_id, reason="cancelled by request", final=True),
    )
    await replica.monitor.on_event(ended)  # the view has not caught up: read from the bucket
    assert replica.sample("torchrelay_train_given_up_total") == given_up
