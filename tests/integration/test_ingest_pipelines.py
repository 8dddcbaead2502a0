"""Pipelines that name a staged dataset version instead of a source: ingest's handler over the
in-memory state and a real file system (no NATS; tests/integration/test_ingest_service.py runs
the same through the real service).

A named version (or, without one, the newest) is published as ``dataset.staged`` exactly as a
staging of that content would be, and the pipeline's ingest stage succeeds; a version that is
not staged is refused with ``unknown_version``, and the ingest stage fails with the reason.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.integration.in_memory import Published
from torchrelay.services.ingest.handlers import IngestMetrics, Ingestor
from torchrelay.services.ingest.settings import IngestOptions
from torchrelay.services.ingest.staging import Stager, StageRequest
from torchrelay.shared.events import (
    AnyEvent,
    DatasetRejected,
    DatasetStaged,
    PipelineRejected,
    PipelineSubmitted,
)
from torchrelay.shared.events.data import PipelineSpec, PipelineSubmittedData
from torchrelay.shared.pipelines import PipelineRecord, pipeline_key
from torchrelay.shared.state import MemoryState

pytestmark = pytest.mark.timeout(60)


@dataclass
class Ingest:
    ingestor: Ingestor
    published: Published
    sources: Path
    storage: Path

    async def stage_csv(self, name: str, text: str) -> DatasetStaged:
        """Stage a one-file csv dataset as ``dataset.ingest.requested`` would."""
        path = self.sources / f"{uuid.uuid4().hex}.csv"
        path.write_text(text)
        outcome = await self.ingestor.ingest(StageRequest(f"r-{path.stem}", name, str(path)))
        assert isinstance(outcome, DatasetStaged), outcome
        return outcome

    async def submit(self, event: PipelineSubmitted) -> AnyEvent:
        """Hand ``event`` to the handler; what it published last."""
        await self.ingestor.on_pipeline_submitted(event)
        return self.published.events[-1]

    async def record(self, pipeline_id: str) -> PipelineRecord:
        item = await self.ingestor.pipelines.get(pipeline_key(pipeline_id))
        assert item is not None, f"no record of {pipeline_id}"
        return item.value


@pytest.fixture
def ingest(tmp_path: Path) -> Ingest:
    sources, storage = tmp_path / "sources", tmp_path / "storage"
    sources.mkdir()
    options = IngestOptions(allowed_roots=[sources])
    published = Published()
    ingestor = Ingestor(
        stager=Stager(storage, options.limits()),
        options=options,
        state=MemoryState(),
        publish=published,
        metrics=IngestMetrics(CollectorRegistry()),
        source="/torchrelay/ingest",
    )
    return Ingest(ingestor, published, sources, storage)


def submitted(pipeline_id: str, **dataset: str) -> PipelineSubmitted:
    spec = PipelineSpec.model_validate(
        {
            "name": "named",
            "dataset": dataset,
            "training": {"entrypoint": "m:f", "model_name": "blobs"},
            "deploy": {"enabled": False},
        }
    )
    return PipelineSubmitted(
        source="/tests", pipelineid=pipeline_id, data=PipelineSubmittedData(spec=spec)
    )


SAME_CONTENT = ("name", "version", "path", "format", "files", "size_bytes", "manifest_sha256")


async def test_a_named_version_is_published_as_staged_and_the_ingest_stage_succeeds(
    ingest: Ingest,
) -> None:
    older = await ingest.stage_csv("blobs", "x,y\n1,2\n")
    await ingest.stage_csv("blobs", "x,y\n3,4\n")
    event = submitted("p-named", name="blobs", version=older.data.version)

    outcome = await ingest.submit(event)

    assert isinstance(outcome, DatasetStaged)
    assert outcome.data.request_id == "p-named.dataset"
    assert (outcome.pipelineid, outcome.causationid) == ("p-named", event.id)
    assert outcome.data.model_dump(include=set(SAME_CONTENT)) == older.data.model_dump(
        include=set(SAME_CONTENT)
    ), "the same data as a staging of that content"
    record = await ingest.record("p-named")
    assert record.stages["ingest"].status == "succeeded"
    assert record.stages["ingest"].detail == {"dataset": "blobs", "version": older.data.version}
    assert record.status == "running", "train and deploy come next"
    assert sorted(p.name for p in (ingest.storage / "datasets" / "blobs").iterdir()) == sorted(
        e.data.version for e in ingest.published.of(DatasetStaged)[:2]
    ), "nothing new was staged"


async def test_a_name_alone_gets_the_newest_staged_version(ingest: Ingest) -> None:
    await ingest.stage_csv("blobs", "x,y\n1,2\n")
    newest = await ingest.stage_csv("blobs", "x,y\n3,4\n")
    await ingest.stage_csv("others", "x,y\n5,6\n")

    outcome = await ingest.submit(submitted("p-newest", name="blobs"))

    assert isinstance(outcome, DatasetStaged)
    assert outcome.data.version == newest.data.version
    record = await ingest.record("p-newest")
    assert record.stages["ingest"].detail == {"dataset": "blobs", "version": newest.data.version}


async def test_a_redelivered_submission_publishes_the_same_event_for_the_version_chosen_first(
    ingest: Ingest,
) -> None:
    first = await ingest.stage_csv("blobs", "x,y\n1,2\n")
    event = submitted("p-again", name="blobs")
    chosen = await ingest.submit(event)
    await ingest.stage_csv("blobs", "x,y\n3,4\n")  # a newer version, staged meanwhile

    again = await ingest.submit(event)

    assert isinstance(again, DatasetStaged)
    assert again.id == chosen.id, "the stream stores it once"
    assert again.data.version == first.data.version


async def test_an_unknown_version_is_rejected_and_the_ingest_stage_fails_with_the_reason(
    ingest: Ingest,
) -> None:
    staged = await ingest.stage_csv("blobs", "x,y\n1,2\n")
    event = submitted("p-unknown", name="blobs", version="abc")

    outcome = await ingest.submit(event)

    assert isinstance(outcome, DatasetRejected)
    assert outcome.data.code == "unknown_version"
    reason = (
        f"dataset 'blobs' has no version 'abc' (staged versions, newest first: "
        f"{staged.data.version})"
    )
    assert outcome.data.reason == reason
    assert (outcome.data.request_id, outcome.data.source) == ("p-unknown.dataset", "staged:abc")
    record = await ingest.record("p-unknown")
    assert record.status == "failed"
    assert record.stages["ingest"].status == "failed"
    assert record.stages["ingest"].reason == f"unknown_version: {reason}"
    assert (await ingest.submit(event)).id == outcome.id, "a redelivery: the same rejection"


async def test_a_dataset_with_no_staged_version_is_rejected_with_how_to_stage_one(
    ingest: Ingest,
) -> None:
    await ingest.stage_csv("blobs", "x,y\n1,2\n")

    outcome = await ingest.submit(submitted("p-nothing", name="nothing"))

    assert isinstance(outcome, DatasetRejected)
    assert outcome.data.code == "unknown_version"
    assert outcome.data.reason == (
        "no version of dataset 'nothing' is staged yet: stage one first "
        "(POST /v1/datasets, or give the spec a source)"
    )
    record = await ingest.record("p-nothing")
    assert record.stages["ingest"].status == "failed"
    assert record.stages["ingest"].reason is not None
    assert "no version of dataset 'nothing' is staged yet" in record.stages["ingest"].reason


async def test_a_version_whose_folder_is_gone_from_storage_is_not_staged(ingest: Ingest) -> None:
    older = await ingest.stage_csv("blobs", "x,y\n1,2\n")
    newest = await ingest.stage_csv("blobs", "x,y\n3,4\n")
    shutil.rmtree(ingest.storage / newest.data.path)

    fallback = await ingest.submit(submitted("p-fallback", name="blobs"))
    gone = await ingest.submit(submitted("p-gone", name="blobs", version=newest.data.version))

    assert isinstance(fallback, DatasetStaged)
    assert fallback.data.version == older.data.version
    assert isinstance(gone, DatasetRejected)
    assert gone.data.code == "unknown_version"
    assert f"(staged versions, newest first: {older.data.version})" in gone.data.reason


async def test_a_named_version_in_another_format_than_the_spec_says_is_rejected(
    ingest: Ingest,
) -> None:
    staged = await ingest.stage_csv("blobs", "x,y\n1,2\n")

    outcome = await ingest.submit(
        submitted("p-format", name="blobs", version=staged.data.version, format="npz")
    )

    assert isinstance(outcome, DatasetRejected)
    assert outcome.data.code == "invalid_data"
    assert outcome.data.reason == "the request says npz, but the files are csv"


def swept(pipeline_id: str, **sweep: object) -> PipelineSubmitted:
    base = submitted(pipeline_id, name="blobs", source="sklearn:digits").data.spec
    spec = PipelineSpec.model_validate(
        {
            **base.model_dump(mode="json"),
            "sweep": {
                "space": {"lr": {"type": "choice", "values": [0.1, 0.01]}},
                "algorithm": "grid",
                "objective": {"metric": "accuracy", "direction": "maximize"},
                "max_trials": 2,
                **sweep,
            },
        }
    )
    return PipelineSubmitted(
        source="/tests", pipelineid=pipeline_id, data=PipelineSubmittedData(spec=spec)
    )


@pytest.mark.parametrize(
    ("pipeline_id", "sweep", "reason"),
    [
        (
            "p-bad-range",
            {"algorithm": "random", "space": {"lr": {"type": "uniform", "low": 1, "high": 0.1}}},
            "invalid sweep: lr: uniform needs low < high, got low=1.0, high=0.1",
        ),
        (
            "p-grid",
            {"space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}}},
            "grid needs choice or int parameters; lr is a continuous range",
        ),
        ("p-" + "x" * 60, {}, "is too long or has characters a run id cannot"),
        ("p:colon", {}, "is too long or has characters a run id cannot"),
    ],
)
async def test_a_sweep_that_cannot_run_is_refused_at_submission_with_the_reason(
    ingest: Ingest, pipeline_id: str, sweep: dict[str, object], reason: str
) -> None:
    answer = await ingest.submit(swept(pipeline_id, **sweep))
    assert isinstance(answer, PipelineRejected)
    assert (answer.data.code, answer.data.pipeline_id) == ("invalid_sweep", pipeline_id)
    assert reason in answer.data.reason
    assert await ingest.ingestor.pipelines.get(pipeline_key(pipeline_id)) is None, "nothing kept"
    assert not ingest.published.of(DatasetStaged), "nothing staged"


@pytest.mark.parametrize("pipeline_id", ["p-" + "x" * 60, "team:exp-1"])
async def test_a_pipeline_id_its_training_run_cannot_be_named_after_is_refused_at_submission(
    ingest: Ingest, pipeline_id: str
) -> None:
    """Refused before its dataset is staged, not when its training would start."""
    answer = await ingest.submit(submitted(pipeline_id, name="blobs", source="sklearn:digits"))

    assert isinstance(answer, PipelineRejected)
    assert (answer.data.code, answer.data.pipeline_id) == ("invalid_pipeline_id", pipeline_id)
    assert answer.data.reason.startswith(
        f"the pipeline id {pipeline_id!r} is too long or has characters a run id cannot: its "
        f"training run would be '{pipeline_id}.train'"
    )
    assert await ingest.ingestor.pipelines.get(pipeline_key(pipeline_id)) is None, "nothing kept"
    assert not ingest.published.of(DatasetStaged), "nothing staged"


async def test_the_longest_pipeline_id_a_training_run_can_be_named_after_is_accepted(
    ingest: Ingest,
) -> None:
    pipeline_id = "p" * (64 - len(".train"))
    answer = await ingest.submit(submitted(pipeline_id, name="blobs", source="sklearn:digits"))
    assert isinstance(answer, DatasetStaged)
