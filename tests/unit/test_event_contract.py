"""The exported JSON Schemas are the contract, and decoding enforces exactly that contract.

For every event type, instances generated from its exported schema (hypothesis-jsonschema) and
mutations of them (a REQUIRED attribute dropped, an attribute set to null, a value of another
JSON type, an unknown field, a NaN literal, a time sent as a number) are judged twice: by a JSON
Schema validator and by :func:`decode`. The two verdicts must agree on every one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from torchrelay.shared.events import EVENT_TYPES, InvalidEvent, decode
from torchrelay.shared.events.envelope import REQUIRED_ATTRIBUTES
from torchrelay.shared.events.schema import all_json_schemas

SCHEMAS = all_json_schemas()
INSTANCES = {event_type: from_schema(schema) for event_type, schema in SCHEMAS.items()}


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """``pattern`` as JSON Schema means it (ECMA-262): ``\\w`` is ASCII and ``$`` is the end of
    the string. Python's ``re`` would let ``$`` match before a trailing newline."""
    if not validator.is_type(instance, "string"):
        return
    if re.search(re.sub(r"\$$", r"\\Z", pattern), instance, flags=re.ASCII) is None:
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


SchemaValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"pattern": _ecma_pattern}
)


def schema_accepts(event_type: str, payload: str) -> bool:
    try:
        instance = json.loads(payload, parse_constant=_refuse_constant)
    except ValueError:
        return False  # not JSON at all: no schema can accept it
    validator = SchemaValidator(
        SCHEMAS[event_type], format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    return validator.is_valid(instance)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decoder_accepts(event_type: str, payload: str) -> bool:
    try:
        event = decode(payload.encode())
    except InvalidEvent:
        return False
    return event.type == event_type


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON document a value sits (object members and array items)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield (*prefix, index)
            yield from _paths(item, (*prefix, index))


def _parent(document: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        document = document[part]
    return document


OTHER_VALUES = st.sampled_from([None, 0, -1, 1.5, "", "x", True, [], {}, "1", 1e300])


@st.composite
def mutated(draw: st.DrawFn, instance: dict[str, Any]) -> str:
    """A serialized instance, left as it is or broken in one place."""
    document = json.loads(json.dumps(instance))
    paths = list(_paths(document))
    kind = draw(
        st.sampled_from(
            [
                "keep",
                "drop_required",
                "drop",
                "null",
                "replace",
                "unknown_field",
                "nan",
                "numeric_time",
            ]
        )
    )
    if kind == "drop_required":
        document.pop(draw(st.sampled_from(REQUIRED_ATTRIBUTES)), None)
    elif kind in {"drop", "null", "replace"} and paths:
        path = draw(st.sampled_from(paths))
        parent = _parent(document, path)
        if kind == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        elif kind == "null":
            parent[path[-1]] = None
        else:
            parent[path[-1]] = draw(OTHER_VALUES)
    elif kind == "unknown_field":
        target = draw(
            st.sampled_from([document, document["data"]] if "data" in document else [document])
        )
        target[draw(st.sampled_from(["surprise", "extra_field"]))] = 1
    elif kind == "numeric_time":
        document["time"] = draw(st.sampled_from([0, 1767225600, 1767225600.5]))
    text = json.dumps(document)
    if kind == "nan":
        text = text.replace("}", ', "nan_attribute": NaN}', 1)
        numbers = list(re.finditer(r'(?<=": )-?\d+(\.\d+)?(?=[,}])', text))
        if numbers:
            match = draw(st.sampled_from(numbers))
            text = (
                text[: match.start()]
                + draw(st.sampled_from(["NaN", "Infinity"]))
                + text[match.end() :]
            )
    return text


@pytest.mark.slow
@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_decode_accepts_exactly_what_the_exported_schema_accepts(
    event_type: str, data: st.DataObject
) -> None:
    instance = data.draw(INSTANCES[event_type], label="instance")
    payload = data.draw(mutated(instance), label="payload")
    assert schema_accepts(event_type, payload) == decoder_accepts(event_type, payload), payload


@pytest.mark.parametrize("event_type", sorted(EVENT_TYPES))
def test_the_schema_requires_every_cloudevents_required_attribute(event_type: str) -> None:
    required = SCHEMAS[event_type]["required"]
    assert set(REQUIRED_ATTRIBUTES) <= set(required)
    assert "data" in required


def _progress(**envelope: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/elsewhere",
        "type": "io.torchrelay.train.progress.v2",
        "data": {"run_id": "r1", "step": 1, "epoch": 0, "loss": 0.5, "samples_per_s": 10.0},
        **envelope,
    }


@pytest.mark.parametrize("attribute", REQUIRED_ATTRIBUTES)
def test_an_event_without_a_required_attribute_is_refused(attribute: str) -> None:
    wire = _progress()
    del wire[attribute]
    with pytest.raises(InvalidEvent, match=attribute if attribute != "type" else "'type'"):
        decode(json.dumps(wire).encode())


def test_an_event_without_an_id_is_not_given_one() -> None:
    """A fresh id would defeat Nats-Msg-Id deduplication: the publisher must choose it."""
    wire = _progress()
    del wire["id"]
    with pytest.raises(InvalidEvent, match="id: a CloudEvents REQUIRED attribute is missing"):
        decode(json.dumps(wire).encode())


@pytest.mark.parametrize("attribute", ["subject", "pipelineid", "causationid", "dataschema"])
def test_a_null_attribute_is_refused(attribute: str) -> None:
    with pytest.raises(InvalidEvent, match=f"{attribute}: null is not allowed"):
        decode(json.dumps(_progress(**{attribute: None})).encode())


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_json_number_literals_are_refused(literal: str) -> None:
    payload = json.dumps(_progress()).replace('"loss": 0.5', f'"loss": {literal}')
    assert literal in payload
    with pytest.raises(InvalidEvent, match="RFC 8259"):
        decode(payload.encode())


def test_nan_inside_free_form_hyperparameters_is_refused_too() -> None:
    wire = json.loads(
        json.dumps(
            {
                "specversion": "1.0",
                "id": "evt-2",
                "source": "/elsewhere",
                "type": "io.torchrelay.train.requested.v1",
                "data": {
                    "spec": {
                        "entrypoint": "torchrelay.services.train.examples.digits:train",
                        "model_name": "digits",
                        "dataset": {"name": "digits", "version": "v1"},
                        "hyperparameters": {"lr": 0.5},
                    }
                },
            }
        )
    )
    payload = json.dumps(wire).replace('"lr": 0.5', '"lr": NaN')
    with pytest.raises(InvalidEvent, match="RFC 8259"):
        decode(payload.encode())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"time": 1767225600}, "time"),
        ({"data": {**_progress()["data"], "step": "1"}}, "data.step"),
        ({"data": {**_progress()["data"], "loss": "0.5"}}, "data.loss"),
        ({"data": {**_progress()["data"], "step": True}}, "data.step"),
        ({"specversion": 1.0}, "specversion"),
    ],
)
def test_types_are_not_coerced(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent, match=re.escape(field)):
        decode(json.dumps(_progress(**change)).encode())


def test_events_built_in_code_still_get_their_defaults() -> None:
    """Defaults are for producers in this code base; the wire gets every attribute."""
    wire = json.loads(decode(json.dumps(_progress()).encode()).to_json())
    assert {"specversion", "id", "source", "type", "time"} <= set(wire)
    assert "subject" not in wire


@pytest.mark.parametrize("kind", [[1], {"a": 1}, 5, None, True])
def test_a_type_that_is_not_a_string_is_refused_not_raised(kind: Any) -> None:
    """Found by the property test: a list as ``type`` once escaped decode as a TypeError."""
    wire = {**_progress(), "type": kind}
    del wire["id"]
    with pytest.raises(InvalidEvent):
        decode(json.dumps(wire).encode())
