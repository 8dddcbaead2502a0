"""The monitor times a pipeline from the submission that owns its id: a repeated submission (a
no-op) or a conflicting one (refused) starts no clock, in memory and over real JetStream KV."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import CollectorRegistry

from torchrelay.client import DEMO
from torchrelay.services.monitor.handlers import EventMetrics, Monitor, Stamp
from torchrelay.services.monitor.settings import MonitorOptions
from torchrelay.shared.events import AnyEvent, PipelineSubmitted, SweepCompleted
from torchrelay.shared.events.data import PipelineSpec, PipelineSubmittedData, SweepCompletedData
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key
from torchrelay.shared.runtime.metrics import reconciled_counter
from torchrelay.shared.state import State

pytestmark = pytest.mark.timeout(60)
SPEC = PipelineSpec.model_validate(DEMO)


async def _ignore(_: AnyEvent) -> bool:
    return True


@pytest.fixture
def state(any_state: State) -> State:
    return any_state


def _monitor(state: State) -> Monitor:
    return Monitor(
        metrics=EventMetrics(CollectorRegistry()),
        state=state,
        publish=_ignore,
        options=MonitorOptions(),
        source="/tests",
        instance="tests",
        reconciled=reconciled_counter(CollectorRegistry()),
    )


def _submitted(pipeline_id: str, spec: PipelineSpec = SPEC) -> PipelineSubmitted:
    return PipelineSubmitted(
        source="/elsewhere", pipelineid=pipeline_id, data=PipelineSubmittedData(spec=spec)
    )


async def _owned_by(state: State, event: PipelineSubmitted) -> None:
    """What ingest stores for the submission that created the pipeline."""
    record = PipelineRecord(
        pipeline_id=str(event.pipelineid),
        spec=event.data.spec,
        submitted=event.time,
        submitted_event_id=event.id,
    )
    await state.store("pipelines", PipelineRecord).create(pipeline_key(record.pipeline_id), record)


async def test_the_owning_submission_starts_the_clock_once(state: State) -> None:
    monitor, clocks = _monitor(state), state.store("monitor", Stamp)
    pipeline_id = f"p-{uuid.uuid4().hex[:8]}"
    first = _submitted(pipeline_id)
    await monitor.on_event(first)  # before ingest stored the record
    await _owned_by(state, first)
    started = await clocks.get(f"pipeline.{pipeline_id}")
    assert started is not None
    await monitor.on_event(first)  # a redelivery
    again = await clocks.get(f"pipeline.{pipeline_id}")
    assert again is not None
    assert again.revision == started.revision, "a redelivery does not restart the clock"


@pytest.mark.parametrize("conflicting", [False, True])
async def test_a_repeated_or_refused_submission_starts_no_clock(
    state: State, conflicting: bool
) -> None:
    monitor, clocks = _monitor(state), state.store("monitor", Stamp)
    pipeline_id = f"p-{uuid.uuid4().hex[:8]}"
    await _owned_by(state, _submitted(pipeline_id))  # the pipeline ran and ended: no clock
    spec = SPEC.model_copy(update={"name": "other"}) if conflicting else SPEC
    await monitor.on_event(_submitted(pipeline_id, spec))
    assert await clocks.get(f"pipeline.{pipeline_id}") is None


async def test_a_sweep_ingest_refuses_starts_no_clock_and_its_end_stops_one(state: State) -> None:
    monitor, clocks = _monitor(state), state.store("monitor", Stamp)
    sweep = {
        "space": {"lr": {"type": "uniform", "low": 0.5, "high": 0.1}},  # low > high
        "algorithm": "random",
        "objective": {"metric": "accuracy", "direction": "maximize"},
        "max_trials": 2,
    }
    refused = PipelineSpec.model_validate({**DEMO, "sweep": sweep})
    pipeline_id = f"p-{uuid.uuid4().hex[:8]}"
    await monitor.on_event(_submitted(pipeline_id, refused))
    assert await clocks.get(f"pipeline.{pipeline_id}") is None, "nothing would ever stop it"

    sound = PipelineSpec.model_validate(
        {**DEMO, "sweep": {**sweep, "space": {"lr": {"type": "uniform", "low": 0.1, "high": 1}}}}
    )
    pipeline_id = f"p-{uuid.uuid4().hex[:8]}"
    await monitor.on_event(_submitted(pipeline_id, sound))
    stamp = await clocks.get(f"pipeline.{pipeline_id}")
    assert stamp is not None
    assert stamp.value.sweep
    nobody = SweepCompleted(
        source="/torchrelay/train",
        pipelineid=pipeline_id,
        data=SweepCompletedData(
            sweep_id=pipeline_id,
            metric="accuracy",
            direction="maximize",
            model_name="digits",
            completed=0,
            stopped=0,
            failed=2,
            reason="no trial of the sweep completed (0 stopped early, 2 failed)",
        ),
    )
    await monitor.on_event(nobody)
    assert await clocks.get(f"pipeline.{pipeline_id}") is None, "the sweep's end stopped it"
