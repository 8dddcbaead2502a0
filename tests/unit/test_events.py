"""The event contract: CloudEvents 1.0 structured JSON, one typed class per event type."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jsonschema
import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkCloudEvent

from tests.factories import ingest_requested, staged
from torchrelay.shared.events import (
    EVENT_TYPES,
    DatasetIngestRequested,
    DeadLettered,
    InvalidEvent,
    TrainProgressed,
    decode,
    subject_for_type,
)
from torchrelay.shared.events.schema import (
    all_json_schemas,
    asyncapi_document,
    catalogue_markdown,
)


def test_every_design_event_type_is_defined_and_versioned() -> None:
    names = {t.removeprefix("io.torchrelay.").rsplit(".v", 1)[0] for t in EVENT_TYPES}
    assert names == {
        "pipeline.submitted",
        "pipeline.rejected",
        "dataset.ingest.requested",
        "dataset.staged",
        "dataset.rejected",
        "train.requested",
        "train.restart.requested",
        "train.cancel.requested",
        "train.started",
        "train.progress",
        "train.checkpointed",
        "train.completed",
        "train.failed",
        "model.deploy.requested",
        "model.rollback.requested",
        "model.rollout.started",
        "model.deployed",
        "model.rollout.failed",
        "model.undeploy.requested",
        "model.undeployed",
        "sweep.started",
        "sweep.trial.started",
        "sweep.trial.stopped",
        "sweep.completed",
        "sweep.cancel.requested",
        "platform.prune.requested",
        "platform.pruned",
        "deadletter",
    }
    # Dead letters went to v2 when they stopped embedding the original (bounded size), and
    # progress when a diverged loss stopped failing the step (it is null now).
    assert DeadLettered.event_type == "io.torchrelay.deadletter.v2"
    assert TrainProgressed.event_type == "io.torchrelay.train.progress.v2"
    second = {DeadLettered.event_type, TrainProgressed.event_type}
    assert all(t.endswith(".v1") for t in EVENT_TYPES if t not in second)


def test_subjects_derive_from_types() -> None:
    assert subject_for_type("io.torchrelay.dataset.staged.v1") == "torchrelay.dataset.staged"
    assert DatasetIngestRequested.nats_subject == "torchrelay.dataset.ingest.requested"
    assert TrainProgressed.nats_subject == "torchrelay.train.progress"
    assert DeadLettered.nats_subject == "torchrelay.deadletter"
    with pytest.raises(ValueError, match="does not follow"):
        subject_for_type("com.example.thing")


def test_round_trip_keeps_every_attribute() -> None:
    event = staged(pipelineid="pipe-7", causationid="evt-1", subject="digits")
    wire = json.loads(event.to_json())
    assert wire["specversion"] == "1.0"
    assert wire["type"] == "io.torchrelay.dataset.staged.v1"
    assert wire["pipelineid"] == "pipe-7"
    assert wire["datacontenttype"] == "application/json"
    assert "traceparent" not in wire, "absent optional attributes are omitted, not null"
    assert decode(event.to_json()) == event


def test_an_event_made_with_the_cloudevents_sdk_is_accepted() -> None:
    sdk_event = SdkCloudEvent(
        {
            "type": "io.torchrelay.dataset.ingest.requested.v1",
            "source": "/another/system",
            "pipelineid": "pipe-1",
        },
        {"request_id": "r1", "name": "digits", "source": "sklearn:digits"},
    )
    event = decode(JSONFormat().write(sdk_event), subject="torchrelay.dataset.ingest.requested")
    assert isinstance(event, DatasetIngestRequested)
    assert event.id == sdk_event.get_id()
    assert event.pipelineid == "pipe-1"
    assert event.data.name == "digits"


def test_caused_events_carry_the_pipeline_and_causation() -> None:
    request = ingest_requested(pipelineid="pipe-2")
    follow = staged(**request.caused())
    assert follow.pipelineid == "pipe-2"
    assert follow.causationid == request.id


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"id": "x"}', "no string 'type'"),
        (b'{"type": "io.torchrelay.nope.v1"}', "unknown event type"),
    ],
)
def test_malformed_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        decode(payload)


def test_validation_failures_name_the_fields() -> None:
    wire = json.loads(staged().to_json())
    wire["data"]["files"] = -1
    del wire["source"]
    with pytest.raises(InvalidEvent) as info:
        decode(json.dumps(wire).encode())
    assert "data.files" in str(info.value)
    assert "source" in str(info.value)


def test_unknown_attributes_and_naive_times_are_refused() -> None:
    wire = json.loads(staged().to_json())
    with pytest.raises(InvalidEvent, match="surprise"):
        decode(json.dumps({**wire, "surprise": 1}).encode())
    with pytest.raises(InvalidEvent, match="time"):
        decode(json.dumps({**wire, "time": datetime(2026, 1, 1).isoformat()}).encode())


@pytest.mark.parametrize(
    "time", ["1", 1, "2026-01-01 12:00:00Z", "2026-01-01T12:00Z", "2026-02-30T12:00:00Z", ""]
)
def test_a_time_that_is_not_an_rfc_3339_date_time_is_refused(time: object) -> None:
    """What the exported schema's date-time format refuses (pydantic alone reads "1" as 1970)."""
    wire = json.loads(staged().to_json())
    with pytest.raises(InvalidEvent, match="time"):
        decode(json.dumps({**wire, "time": time}).encode())


@pytest.mark.parametrize(
    ("time", "utc"),
    [
        ("2026-01-01T12:00:00Z", "2026-01-01T12:00:00+00:00"),
        ("2026-01-01T13:30:00.123456789+01:30", "2026-01-01T12:00:00.123456+00:00"),
    ],
)
def test_rfc_3339_times_with_any_offset_are_read(time: str, utc: str) -> None:
    wire = json.loads(staged().to_json())
    event = decode(json.dumps({**wire, "time": time}).encode())
    assert event.time == datetime.fromisoformat(utc)


def test_an_event_on_the_wrong_subject_is_refused() -> None:
    with pytest.raises(InvalidEvent, match=r"belongs on torchrelay\.dataset\.staged"):
        decode(staged().to_json(), subject="torchrelay.train.requested")


def test_events_are_frozen() -> None:
    event = staged()
    with pytest.raises(ValueError, match="frozen"):
        event.id = "other"  # type: ignore[misc]


def test_every_event_validates_against_its_exported_json_schema() -> None:
    schemas = all_json_schemas()
    assert set(schemas) == set(EVENT_TYPES)
    event = json.loads(staged(pipelineid="p").to_json())
    jsonschema.validate(event, schemas["io.torchrelay.dataset.staged.v1"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {**event, "type": "io.torchrelay.dataset.rejected.v1"},
            schemas["io.torchrelay.dataset.staged.v1"],
        )


def test_asyncapi_document_lists_a_channel_and_message_per_event() -> None:
    document = asyncapi_document()
    assert document["asyncapi"].startswith("3.")
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {cls.nats_subject for cls in EVENT_TYPES.values()}
    assert set(document["components"]["messages"]) == {c.__name__ for c in EVENT_TYPES.values()}
    # Every $ref resolves inside the document.
    text = json.dumps(document)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/')[1:]}:
        node = document
        for key in ref.split("/"):
            node = node[key]


def test_the_readme_catalogue_is_current() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start = readme.index("\n", readme.index("<!-- catalogue:start")) + 1
    end = readme.index("<!-- catalogue:end -->")
    assert readme[start:end] == catalogue_markdown(), "run `torchrelay schema catalogue`"
