"""`torchrelay submit --wait` against a real NATS: a refused submission ends the wait."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import nats.js.errors
import pytest

from torchrelay.client import Client, PipelineRefused
from torchrelay.shared.errors import Refused
from torchrelay.shared.events.data import PipelineSpec
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key

pytestmark = [pytest.mark.timeout(60)]

SPEC = PipelineSpec.model_validate(
    {
        "name": "digits-demo",
        "dataset": {"name": "digits", "source": "sklearn:digits"},
        "training": {"entrypoint": "m:f", "model_name": "digits"},
    }
)


async def test_waiting_on_a_submission_refused_for_another_spec_ends_with_the_refusal(
    nats_url: str,
) -> None:
    client = await Client.connect(nats_url)
    try:
        # Someone else's pipeline already holds the id, with another dataset.
        theirs = SPEC.model_copy(update={"dataset": SPEC.dataset.model_copy(update={"name": "x"})})
        await client.pipelines.create(
            pipeline_key("nightly-42"),
            PipelineRecord(
                pipeline_id="nightly-42",
                spec=theirs,
                submitted=datetime.now(UTC),
                submitted_event_id="their-event",
            ),
        )
        pipeline_id = await client.submit(SPEC, pipeline_id="nightly-42")
        with pytest.raises(PipelineRefused) as refused:
            await client.wait(pipeline_id, timeout_s=20, show=False)
        assert refused.value.code == "conflicting_spec"
        assert "dataset.name" in refused.value.reason
        assert "new pipelineid" in refused.value.reason
    finally:
        await client.aclose()


async def test_waiting_on_an_existing_pipeline_of_the_same_spec_follows_it(
    nats_url: str,
) -> None:
    client = await Client.connect(nats_url)
    try:
        record = PipelineRecord(
            pipeline_id="nightly-42",
            spec=SPEC,
            submitted=datetime.now(UTC),
            submitted_event_id="their-event",
            status="succeeded",
        )
        await client.pipelines.create(pipeline_key("nightly-42"), record)
        pipeline_id = await client.submit(SPEC, pipeline_id="nightly-42")
        assert await client.wait(pipeline_id, timeout_s=20, show=False) == record
    finally:
        await client.aclose()


async def test_a_wait_returns_as_soon_as_the_record_ends_and_not_before(nats_url: str) -> None:
    client = await Client.connect(nats_url)
    try:
        key = pipeline_key("nightly-43")
        record = PipelineRecord(
            pipeline_id="nightly-43", spec=SPEC, submitted=datetime.now(UTC), status="running"
        )
        revision = await client.pipelines.create(key, record)
        waiting = asyncio.create_task(client.wait("nightly-43", timeout_s=20, show=False))
        await asyncio.sleep(0.3)
        assert not waiting.done(), "a running pipeline is followed on"
        revision = await client.pipelines.update(key, record, revision=revision)  # no change
        ended = record.model_copy(update={"status": "failed"})
        started = time.monotonic()
        await client.pipelines.update(key, ended, revision=revision)
        assert await asyncio.wait_for(waiting, 5) == ended
        assert time.monotonic() - started < 1.0, "the watch saw the write, nothing polled"
    finally:
        await client.aclose()


async def test_a_wait_on_a_pipeline_that_never_ends_times_out(nats_url: str) -> None:
    client = await Client.connect(nats_url)
    try:
        with pytest.raises(TimeoutError, match=r"nightly-44 did not finish in 0\.5s"):
            await client.wait("nightly-44", timeout_s=0.5, show=False)
        running = PipelineRecord(
            pipeline_id="nightly-45", spec=SPEC, submitted=datetime.now(UTC), status="running"
        )
        await client.pipelines.create(pipeline_key("nightly-45"), running)
        with pytest.raises(TimeoutError, match="nightly-45 did not finish"):
            await client.wait("nightly-45", timeout_s=0.5, show=False)
    finally:
        await client.aclose()


async def test_a_pipeline_id_too_long_for_its_training_run_is_refused_before_it_is_published(
    nats_url: str,
) -> None:
    client = await Client.connect(nats_url)
    try:
        pipeline_id = "nightly-" + "9" * 60
        with pytest.raises(Refused, match=r"is too long or has characters a run id cannot"):
            await client.submit(SPEC, pipeline_id=pipeline_id)
        js = client.bus.nc.jetstream()
        try:
            last = await js.get_last_msg(client.bus.settings.name, "torchrelay.pipeline.submitted")
        except nats.js.errors.NotFoundError:
            return  # nothing was ever submitted
        assert pipeline_id.encode() not in last.data, "nothing was published"
    finally:
        await client.aclose()
