"""The monitor's reconciliation, in memory and over real JetStream KV: runs that no event in
flight will move (an overdue restart, a start or an end the monitor never heard of) are moved
on through the normal events, once, and counted in ``torchrelay_reconciled_total{kind}``."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.integration.test_monitor_recovery import Recorder
from torchrelay.services.monitor.domain import RunWatch
from torchrelay.services.monitor.settings import MonitorOptions
from torchrelay.shared.events import AnyEvent, TrainFailed, TrainRestartRequested
from torchrelay.shared.events.data import (
    DatasetRef,
    TrainCompletedData,
    TrainFailedData,
    TrainJobSpec,
)
from torchrelay.shared.runs import Outcome, RunRecord, RunStatus, restart_event_id
from torchrelay.shared.state import State, key_part
from torchrelay.shared.testing import assert_eventually

pytestmark = pytest.mark.timeout(60)
# The reconcile lease lives 3 checks, and a KV entry lives at least a second.
OPTIONS = MonitorOptions(
    stall_after_s=120, stall_check_s=0.4, backoff_base_s=1, backoff_cap_s=1, reconcile_grace_s=5
)
LONG_AGO = timedelta(minutes=2)


@pytest.fixture
async def reconciler(any_state: State) -> AsyncIterator[Reconciler]:
    """A monitor over the state; what the test wrote is deleted afterwards (over NATS the
    buckets are shared by every test of the session, and a run left behind would be
    reconciled by the next test's monitor)."""
    reconciler = Reconciler(any_state)
    yield reconciler
    for run_id in reconciler.written:
        await reconciler.runs.delete(key_part(run_id))
        await reconciler.monitor.watches.delete(f"runs.{key_part(run_id)}")


class Reconciler(Recorder):
    """A monitor over ``state``, and what it published; the stream's deduplication is kept
    (an id published twice is stored once)."""

    def __init__(self, state: State) -> None:
        super().__init__(state, OPTIONS)
        self.runs = state.store("runs", RunRecord)
        self.written: set[str] = set()

    async def put_run(self, run: RunRecord) -> None:
        self.written.add(run.run_id)
        await self.runs.put(key_part(run.run_id), run)

    async def put_watch(self, watch: RunWatch) -> None:
        self.written.add(watch.run_id)
        await self.monitor.watches.put(f"runs.{key_part(watch.run_id)}", watch)

    async def _publish(self, event: AnyEvent) -> bool:
        if any(e.id == event.id for e in self.published):
            return False
        self.published.append(event)
        return True

    def about(self, run_id: str, kind: type[AnyEvent] | None = None) -> list[AnyEvent]:
        """What it published about ``run_id`` (the state may hold other tests' runs)."""
        return [
            e
            for e in self.published
            if e.subject == run_id and (kind is None or isinstance(e, kind))
        ]

    def reconciled(self, kind: str) -> float:
        value = self.registry.get_sample_value("torchrelay_reconciled_total", {"kind": kind})
        return value or 0.0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        stop = asyncio.Event()
        loop = asyncio.create_task(self.monitor.reconcile(stop), name="test-reconcile")
        try:
            yield
        finally:
            stop.set()
            await loop

    async def rounds(self, count: int = 3) -> None:
        await asyncio.sleep(OPTIONS.stall_check_s * count)


def run_record(
    run_id: str,
    status: RunStatus,
    attempt: int,
    *,
    outcome: Outcome | None = None,
    ago: timedelta = LONG_AGO,
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        spec=TrainJobSpec(
            dataset=DatasetRef(name="digits", version="v1"),
            entrypoint="torchrelay.services.train.examples.digits:train",
            model_name="digits",
            max_restarts=5,
        ),
        dataset_path="datasets/digits/v1",
        status=status,
        attempt=attempt,
        owner="train-0",
        pipeline_id=f"p-{run_id}",
        reason=outcome.reason if isinstance(outcome, TrainFailedData) else None,
        updated=datetime.now(UTC) - ago,
        outcome=outcome,
    )


def watching(run_id: str, attempt: int, *, ago: timedelta = timedelta(0)) -> RunWatch:
    at = datetime.now(UTC) - ago
    return RunWatch(
        run_id=run_id,
        attempt=attempt,
        max_restarts=5,
        state="running",
        started_at=at,
        attempt_started_at=at,
        pipeline_id=f"p-{run_id}",
    )


def new_run_id() -> str:
    return f"r-{uuid.uuid4().hex[:8]}"


async def test_an_overdue_restart_is_asked_for_once(reconciler: Reconciler) -> None:
    run_id = new_run_id()
    failure = TrainFailedData(run_id=run_id, attempt=1, reason="rank 0 was killed")
    await reconciler.put_run(run_record(run_id, "failed", 1, outcome=failure))
    async with reconciler.running():
        await assert_eventually(lambda: bool(reconciler.about(run_id, TrainRestartRequested)))
        await reconciler.rounds()
    (restart,) = reconciler.about(run_id, TrainRestartRequested)
    assert isinstance(restart, TrainRestartRequested)
    assert restart.id == restart_event_id(run_id, 2), "the id the failure's handler gives it"
    assert (restart.data.attempt, restart.pipelineid) == (2, f"p-{run_id}")
    assert "rank 0 was killed" in restart.data.reason
    assert reconciler.reconciled("restart") == 1.0


async def test_a_restart_still_in_its_backoff_is_left_to_the_failure_event(
    reconciler: Reconciler,
) -> None:
    run_id = new_run_id()
    failure = TrainFailedData(run_id=run_id, attempt=0, reason="boom")
    fresh = run_record(run_id, "failed", 0, outcome=failure, ago=timedelta(0))
    await reconciler.put_run(fresh)
    async with reconciler.running():
        await reconciler.rounds()
    assert reconciler.about(run_id) == []


async def test_a_final_failure_and_an_unannounced_one_get_no_restart(
    reconciler: Reconciler,
) -> None:
    final_id, unsaid_id = new_run_id(), new_run_id()
    final = TrainFailedData(run_id=final_id, attempt=5, reason="boom", final=True)
    await reconciler.put_run(run_record(final_id, "failed", 5, outcome=final))
    unsaid = run_record(
        unsaid_id, "failed", 0, outcome=TrainFailedData(run_id=unsaid_id, reason="boom")
    ).model_copy(update={"announced": False})  # the train service announces it first
    await reconciler.put_run(unsaid)
    async with reconciler.running():
        await reconciler.rounds()
    assert reconciler.about(final_id) == []
    assert reconciler.about(unsaid_id) == []


async def test_an_attempt_the_monitor_never_heard_start_is_watched(reconciler: Reconciler) -> None:
    run_id = new_run_id()
    await reconciler.put_watch(watching(run_id, 1))
    started = run_record(run_id, "running", 2, ago=timedelta(seconds=30))
    await reconciler.put_run(started)
    async with reconciler.running():
        await assert_eventually(lambda: reconciler.reconciled("watch") == 1.0)
    watch = await reconciler.monitor.watches.get(f"runs.{key_part(run_id)}")
    assert watch is not None
    assert (watch.value.attempt, watch.value.state) == (2, "running")
    assert watch.value.attempt_started_at == started.updated, "its stall clock starts there"
    assert reconciler.about(run_id) == [], "not stalled: nothing to cancel"


@pytest.mark.parametrize(
    ("status", "given_up"),
    [("succeeded", 0.0), ("failed", 1.0)],
)
async def test_a_run_that_ended_unheard_is_no_longer_watched(
    reconciler: Reconciler, status: RunStatus, given_up: float
) -> None:
    run_id = new_run_id()
    await reconciler.put_watch(watching(run_id, 0, ago=timedelta(seconds=30)))
    outcome: Outcome = (
        TrainCompletedData(
            run_id=run_id, model_name="digits", model_version=run_id, path="models/digits/x"
        )
        if status == "succeeded"
        else TrainFailedData(run_id=run_id, reason="boom", final=True)
    )
    await reconciler.put_run(run_record(run_id, status, 0, outcome=outcome))
    async with reconciler.running():
        await assert_eventually(lambda: reconciler.reconciled("ended") == 1.0)
        await reconciler.rounds()
    watch = await reconciler.monitor.watches.get(f"runs.{key_part(run_id)}")
    assert watch is not None
    assert watch.value.state == "ended"
    assert reconciler.given_up() == given_up
    assert reconciler.reconciled("ended") == 1.0, "once"
    assert reconciler.about(run_id) == [], "nothing to ask: the run is over"


async def test_a_failure_whose_start_the_monitor_missed_is_restarted_not_given_up(
    reconciler: Reconciler,
) -> None:
    run_id = new_run_id()
    failure = TrainFailedData(run_id=run_id, attempt=3, reason="rank 1 was killed")
    await reconciler.put_run(run_record(run_id, "failed", 3, outcome=failure, ago=timedelta(0)))
    event = TrainFailed(
        source="/torchrelay/train",
        pipelineid=f"p-{run_id}",
        time=datetime.now(UTC) - timedelta(seconds=10),  # its backoff is over
        data=failure,
    )
    await reconciler.monitor.on_event(event)
    (restart,) = reconciler.about(run_id, TrainRestartRequested)
    assert isinstance(restart, TrainRestartRequested)
    assert restart.data.attempt == 4
    assert reconciler.given_up() == 0.0
