"""`torchrelay submit --wait` against a real NATS: a refused submission ends the wait."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from torchrelay.client import Client, PipelineRefused
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
