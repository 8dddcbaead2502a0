"""The monitor's recovery of a stalled run, in memory and over real JetStream KV: a restart
cancel while restarts are left (nothing final on the way), and a run given up once, counted
once. The stall clock starts at the first progress: a start that takes long is no stall,
unless it never reports within the start timeout."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry

from tests.factories import staged
from torchrelay.services.monitor.domain import source_label
from torchrelay.services.monitor.handlers import EventMetrics, Monitor
from torchrelay.services.monitor.settings import MonitorOptions
from torchrelay.shared.errors import TransientError
from torchrelay.shared.events import (
    AnyEvent,
    TrainCancelRequested,
    TrainFailed,
    TrainProgressed,
    TrainRestartRequested,
    TrainStarted,
)
from torchrelay.shared.events.data import (
    DatasetRef,
    TrainFailedData,
    TrainProgressData,
    TrainStartedData,
)
from torchrelay.shared.runtime.metrics import reconciled_counter
from torchrelay.shared.state import State
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(60)
# The scan lease lives 3 checks, and a KV entry lives at least a second.
FAST = MonitorOptions(stall_after_s=0.05, stall_check_s=0.4, backoff_base_s=0)
NEVER_REPORTS = MonitorOptions(
    stall_after_s=3600, start_timeout_s=0.05, stall_check_s=0.4, backoff_base_s=0
)


@pytest.fixture
def state(any_state: State) -> State:
    return any_state


class Recorder:
    """A monitor and what it published."""

    def __init__(self, state: State, options: MonitorOptions = FAST) -> None:
        self.registry = CollectorRegistry()
        self.options = options
        self.published: list[AnyEvent] = []
        self.monitor = Monitor(
            metrics=EventMetrics(self.registry),
            state=state,
            publish=self._publish,
            options=options,
            source="/torchrelay/monitor",
            instance="tests",
            reconciled=reconciled_counter(self.registry),
        )

    async def _publish(self, event: AnyEvent) -> bool:
        self.published.append(event)
        return True

    def of(self, kind: type[AnyEvent]) -> list[AnyEvent]:
        return [e for e in self.published if isinstance(e, kind)]

    def given_up(self) -> float:
        return self.registry.get_sample_value("torchrelay_train_given_up_total") or 0.0

    async def start(self, run_id: str, max_restarts: int, *, report: bool) -> None:
        """Start the run's first attempt; ``report``: and let it report its first progress."""
        await self.monitor.on_event(
            TrainStarted(
                source="/torchrelay/train",
                pipelineid=f"p-{run_id}",
                data=TrainStartedData(
                    run_id=run_id, attempt=0, max_restarts=max_restarts, world_size=1,
                    backend="local", dataset=DatasetRef(name="digits", version="v1"),
                ),
            )
        )  # fmt: skip
        if report:
            await self.monitor.on_event(
                TrainProgressed(
                    source="/torchrelay/train/worker",
                    data=TrainProgressData(
                        run_id=run_id, step=1, epoch=0, loss=1.0, samples_per_s=10.0
                    ),
                )
            )

    async def scan(self, rounds: int) -> None:
        """Let the stall scan run ``rounds`` times."""
        stop = asyncio.Event()
        scan = asyncio.create_task(self.monitor.reconcile(stop), name="test-scan")
        await asyncio.sleep(rounds * self.options.stall_check_s)
        stop.set()
        await scan

    async def stall(
        self, run_id: str, max_restarts: int, *, report: bool = True
    ) -> TrainCancelRequested:
        """Start the run's first attempt and let it fall silent until the monitor cancels it."""
        await self.start(run_id, max_restarts, report=report)
        stop = asyncio.Event()
        scan = asyncio.create_task(self.monitor.reconcile(stop), name="test-scan")
        try:
            await assert_eventually(lambda: bool(self.cancels(run_id)), timeout_s=10)
        finally:
            stop.set()
            await scan
        (cancel,) = self.cancels(run_id)
        return cancel

    def cancels(self, run_id: str) -> list[TrainCancelRequested]:
        """The cancels of ``run_id`` (a scan over a shared bucket sees other tests' runs too)."""
        return [
            e for e in self.published
            if isinstance(e, TrainCancelRequested) and e.data.run_id == run_id
        ]  # fmt: skip


def failed(run_id: str, *, final: bool) -> TrainFailed:
    """The cancelled attempt's end, as the train service reports it."""
    return TrainFailed(
        source="/torchrelay/train",
        pipelineid=f"p-{run_id}",
        data=TrainFailedData(run_id=run_id, attempt=0, reason="cancelled", final=final),
    )


async def test_a_stalled_run_with_restarts_left_is_restarted_and_nothing_says_it_failed(
    state: State,
) -> None:
    recorder, run_id = Recorder(state), f"r-{uuid.uuid4().hex[:8]}"
    cancel = await recorder.stall(run_id, max_restarts=1)
    assert cancel.data.restart, "the run goes on: its cancelled attempt is not final"
    await recorder.monitor.on_event(failed(run_id, final=False))
    (restart,) = recorder.of(TrainRestartRequested)
    assert isinstance(restart, TrainRestartRequested)
    assert restart.data.attempt == 1
    assert recorder.of(TrainFailed) == []
    assert recorder.given_up() == 0.0


async def test_an_attempt_that_has_not_reported_yet_is_not_stalled_by_the_stall_time(
    state: State,
) -> None:
    # Its pods may be pending, pulling images or joining the rendezvous: the backend bounds
    # that and says why, not the stall clock (which once cancelled every slow start-up).
    recorder, run_id = Recorder(state), f"r-{uuid.uuid4().hex[:8]}"
    await recorder.start(run_id, max_restarts=1, report=False)
    await recorder.scan(rounds=3)  # each round 8x past stall_after_s
    assert recorder.cancels(run_id) == []
    watch = await recorder.monitor.watches.get(f"runs.{run_id}")
    assert watch is not None
    assert watch.value.state == "running"


async def test_an_attempt_that_never_reports_is_stalled_after_the_start_timeout(
    state: State,
) -> None:
    recorder, run_id = Recorder(state, NEVER_REPORTS), f"r-{uuid.uuid4().hex[:8]}"
    cancel = await recorder.stall(run_id, max_restarts=1, report=False)
    assert cancel.data.restart
    await recorder.monitor.on_event(failed(run_id, final=False))
    (restart,) = recorder.of(TrainRestartRequested)
    assert isinstance(restart, TrainRestartRequested)
    assert restart.data.reason == "no progress within 0.05s of its start"


async def test_a_run_that_reports_often_is_written_once_per_progress_interval(
    state: State,
) -> None:
    # 50 reports over 10 s with progress_record_s=5: the stall clock moves at the first and
    # at the one 5 s later, and a report delivered late never moves it back. The reports go
    # while the stall scan runs, so the monitor may judge them on its live view of the runs.
    options = MonitorOptions(stall_after_s=60, stall_check_s=0.4, progress_record_s=5)
    recorder, run_id = Recorder(state, options), f"r-{uuid.uuid4().hex[:8]}"
    await recorder.start(run_id, max_restarts=1, report=False)
    stop = asyncio.Event()
    scan = asyncio.create_task(recorder.monitor.reconcile(stop), name="test-scan")
    stored = await recorder.monitor.watches.get(f"runs.{run_id}")
    assert stored is not None
    began = stored.value.attempt_started_at
    try:
        await asyncio.sleep(0.5)  # the scan's view takes its first snapshot
        for index in [*range(50), 3]:
            await recorder.monitor.on_event(
                TrainProgressed(
                    source="/torchrelay/train/worker",
                    time=began + timedelta(seconds=index / 5),
                    data=TrainProgressData(
                        run_id=run_id, step=index, epoch=0, loss=1.0, samples_per_s=10.0
                    ),
                )
            )
    finally:
        stop.set()
        await scan
    stored = await recorder.monitor.watches.get(f"runs.{run_id}")
    assert stored is not None
    assert stored.value.last_progress_at == began + timedelta(seconds=5)
    assert recorder.cancels(run_id) == []


def test_progress_is_written_at_most_a_quarter_of_the_stall_time_apart() -> None:
    assert MonitorOptions(stall_after_s=120, progress_record_s=5).progress_every_s == 5
    assert MonitorOptions(stall_after_s=8, progress_record_s=5).progress_every_s == 2


async def test_a_stalled_run_with_no_restart_left_is_given_up_once(state: State) -> None:
    recorder, run_id = Recorder(state), f"r-{uuid.uuid4().hex[:8]}"
    cancel = await recorder.stall(run_id, max_restarts=0)
    assert not cancel.data.restart, "no restart left: the cancel ends the run"
    train_failed = failed(run_id, final=True)
    await recorder.monitor.on_event(train_failed)
    (gave_up,) = recorder.of(TrainFailed)
    assert isinstance(gave_up, TrainFailed)
    assert gave_up.data.final
    assert gave_up.data.reason == "stalled: no progress for 0.05s; its 0 restarts are used"
    # The monitor consumes its own report too, and events are redelivered: still one run.
    await recorder.monitor.on_event(gave_up)
    await recorder.monitor.on_event(train_failed)
    assert recorder.given_up() == 1.0
    assert recorder.of(TrainRestartRequested) == []


async def test_a_restart_waits_out_its_backoff_on_the_bus_not_in_a_handler(state: State) -> None:
    recorder = Recorder(state, MonitorOptions(stall_after_s=60, backoff_base_s=30))
    run_id = f"r-{uuid.uuid4().hex[:8]}"
    await recorder.monitor.on_event(
        TrainStarted(
            source="/torchrelay/train",
            data=TrainStartedData(
                run_id=run_id, attempt=0, max_restarts=2, world_size=1, backend="local",
                dataset=DatasetRef(name="digits", version="v1"),
            ),
        )
    )  # fmt: skip
    failure = failed(run_id, final=False)
    with pytest.raises(TransientError) as not_due:
        await recorder.monitor.on_event(failure)  # returns at once: the bus holds the wait
    assert 28 < not_due.value.delay_s <= 30
    assert recorder.of(TrainRestartRequested) == []

    # The same event redelivered once the backoff is over (counted from when it failed),
    # to this replica or any other: the restart is asked for then.
    later = failure.model_copy(update={"time": failure.time - timedelta(seconds=31)})
    await Recorder(state).monitor.on_event(later)
    await recorder.monitor.on_event(later)
    assert [e.data.attempt for e in recorder.of(TrainRestartRequested)] == [1]
    counted = recorder.registry.get_sample_value(
        "torchrelay_events_total", {"type": failure.type, "source": source_label(failure.source)}
    )
    assert counted == 1.0, "an event that came back counts once"


async def test_an_attempt_that_trained_before_it_failed_is_restarted_without_backoff(
    state: State,
) -> None:
    recorder = Recorder(state, MonitorOptions(stall_after_s=60, backoff_base_s=30))
    run_id = f"r-{uuid.uuid4().hex[:8]}"
    await recorder.start(run_id, max_restarts=2, report=True)
    await recorder.monitor.on_event(failed(run_id, final=False))  # no TransientError: no wait
    assert [e.data.attempt for e in recorder.of(TrainRestartRequested)] == [1]


async def test_a_dataset_staged_without_a_request_is_counted_not_retried(state: State) -> None:
    # Staged with no ingest request behind it (nothing was timed): it once raised, so the
    # monitor retried it until it was dead-lettered.
    recorder = Recorder(state)
    event = staged(source="/torchrelay/ingest")
    assert event.data.request_id is None
    await recorder.monitor.on_event(event)
    counted = recorder.registry.get_sample_value(
        "torchrelay_events_total", {"type": event.type, "source": source_label(event.source)}
    )
    assert counted == 1.0


def started(run_id: str, attempt: int) -> TrainStarted:
    return TrainStarted(
        source="/torchrelay/train",
        data=TrainStartedData(
            run_id=run_id, attempt=attempt, max_restarts=5, world_size=1, backend="local",
            dataset=DatasetRef(name="digits", version="v1"),
        ),
    )  # fmt: skip


async def test_a_failure_handled_before_its_attempts_start_asks_for_the_next_restart(
    state: State,
) -> None:
    # Replicas and redeliveries handle one run's events out of order.
    recorder = Recorder(state, MonitorOptions(backoff_base_s=0))
    run_id = f"r-{uuid.uuid4().hex[:8]}"
    await recorder.monitor.on_event(started(run_id, 0))
    attempt_1_failed = TrainFailed(
        source="/torchrelay/train",
        data=TrainFailedData(run_id=run_id, attempt=1, reason="rank 0 was killed"),
    )
    await recorder.monitor.on_event(attempt_1_failed)  # before attempt 1's start
    (restart,) = recorder.of(TrainRestartRequested)
    assert isinstance(restart, TrainRestartRequested)
    assert restart.data.attempt == 2, "the next restart, not attempt 1's again"
    await recorder.monitor.on_event(started(run_id, 2))
    await recorder.monitor.on_event(started(run_id, 1))  # late: must not rewind the watch
    await recorder.monitor.on_event(attempt_1_failed)  # a redelivery: already followed up
    watch = await recorder.monitor.watches.get(f"runs.{run_id}")
    assert watch is not None
    assert (watch.value.attempt, watch.value.state) == (2, "running")
    assert len(recorder.of(TrainRestartRequested)) == 1
    assert recorder.given_up() == 0.0
