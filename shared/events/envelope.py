"""The CloudEvents 1.0 envelope every torchrelay event travels in (structured JSON mode).

One subclass per event type pins ``type`` to a literal and ``data`` to a typed model. Subclasses
register themselves in :data:`EVENT_TYPES`, which is how :func:`decode` finds the class of an
incoming payload; the NATS subject of a type derives from its name in one function,
:func:`subject_for_type`, so services never spell a subject.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar, Union, get_args

import pydantic_core
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from torchrelay.shared.errors import PermanentError

TYPE_PREFIX = "io.torchrelay."
SUBJECT_PREFIX = "torchrelay"
_TYPE_RE = re.compile(r"^io\.torchrelay\.(?P<name>[a-z]+(?:\.[a-z]+)*)\.v(?P<version>[1-9][0-9]*)$")


def subject_for_type(event_type: str) -> str:
    """The NATS subject of an event type: ``io.torchrelay.a.b.v1`` -> ``torchrelay.a.b``."""
    match = _TYPE_RE.match(event_type)
    if match is None:
        raise ValueError(
            f"event type {event_type!r} does not follow io.torchrelay.<domain>.<event>.v<N>"
        )
    return f"{SUBJECT_PREFIX}.{match['name']}"


def new_event_id() -> str:
    return str(uuid.uuid4())


def utc_now() -> datetime:
    return datetime.now(UTC)


# RFC 3339 section 5.6, as JSON Schema's date-time format checks it: pydantic alone also
# reads "1" or 1 as a Unix time and a space for the "T", which the exported schema refuses.
_RFC3339 = re.compile(
    r"\d{4}-(0[1-9]|1[0-2])-\d{2}T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?"
    r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)",
    re.ASCII,
)


def _rfc3339(value: object) -> object:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and _RFC3339.fullmatch(value):
        return datetime.fromisoformat(value)  # a day past the month's end raises ValueError
    raise ValueError("must be an RFC 3339 date-time with an offset, such as 2026-01-31T12:00:00Z")


Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
"""A point in time, on the wire an RFC 3339 string with an offset (Z or +hh:mm)."""


class Data(BaseModel):
    """Base of every event's ``data``: frozen, unknown fields refused, finite numbers only."""

    # Validators are built on first use: a process pays only for the events it handles.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, defer_build=True)

    _integer_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._integer_fields = frozenset(
            name
            for name, field in cls.model_fields.items()
            if field.annotation is int or int in get_args(field.annotation)
        )

    @field_validator("*", mode="before")
    @classmethod
    def _integral_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """JSON Schema's ``integer`` is any number without a fraction (``1.0``, ``1e3``); strict
        validation would refuse those, so they become ints here. ``1.5`` is still refused."""
        if isinstance(value, float) and info.field_name in cls._integer_fields:
            return int(value) if value.is_integer() else value
        return value


NonEmpty = Annotated[str, StringConstraints(min_length=1, max_length=512)]
# CloudEvents extension attribute values are short strings; ids are bounded so a hostile
# publisher cannot blow up KV keys or log lines.
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
]

DataT = TypeVar("DataT", bound=Data)


REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")
"""The CloudEvents 1.0 REQUIRED context attributes: an incoming event must carry each."""

OPTIONAL_ATTRIBUTES = (
    "subject",
    "dataschema",
    "pipelineid",
    "causationid",
    "traceparent",
    "tracestate",
)
"""Optional string attributes: absent or a string, never ``null`` on the wire."""


def _wire_schema(schema: dict[str, Any]) -> None:
    """The JSON Schema says what :func:`decode` enforces: the REQUIRED attributes are
    required (their defaults exist only for events built in code), and an optional attribute
    is a string when present (pydantic would otherwise allow ``null``)."""
    properties = schema.get("properties", {})
    required = schema.setdefault("required", [])
    for name in REQUIRED_ATTRIBUTES:
        if name not in required:
            required.append(name)
        properties.get(name, {}).pop("default", None)
    for name in OPTIONAL_ATTRIBUTES:
        prop = properties.get(name)
        if prop is None or "anyOf" not in prop:
            continue
        not_null = [branch for branch in prop.pop("anyOf") if branch != {"type": "null"}]
        prop.pop("default", None)
        (only,) = not_null
        prop.update(only)


class CloudEvent(BaseModel, Generic[DataT]):
    """A CloudEvents 1.0 event in structured JSON mode, with torchrelay's extensions.

    Extension attributes: ``pipelineid`` (the pipeline this event belongs to, the correlation
    id) and ``causationid`` (the id of the event that caused this one). ``traceparent`` and
    ``tracestate`` from the CloudEvents distributed-tracing extension are accepted and kept.

    Built in code, ``id``, ``specversion`` and ``time`` get defaults and ``None`` means an
    absent attribute. Decoded from the wire (:func:`decode`) there are no defaults for the
    REQUIRED attributes and no ``null`` attributes: exactly what the exported schema says.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra=_wire_schema,
        defer_build=True,
    )

    event_type: ClassVar[str]
    nats_subject: ClassVar[str]

    specversion: Literal["1.0"] = "1.0"
    id: NonEmpty = Field(
        default_factory=new_event_id, description="Unique per event; the Nats-Msg-Id."
    )
    source: NonEmpty = Field(description="URI-reference of the producer, e.g. /torchrelay/ingest.")
    type: str
    time: Timestamp = Field(default_factory=utc_now)
    subject: NonEmpty | None = Field(
        default=None, description="What the event is about within the source (a run id, a dataset)."
    )
    datacontenttype: Literal["application/json", "application/json; charset=utf-8"] = (
        "application/json"
    )
    dataschema: NonEmpty | None = None
    pipelineid: Identifier | None = Field(
        default=None, description="Correlation id: the pipeline this event belongs to."
    )
    causationid: NonEmpty | None = Field(
        default=None, description="Id of the event that caused this one."
    )
    traceparent: NonEmpty | None = None
    tracestate: NonEmpty | None = None
    data: DataT

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("type")
        default = None if field is None else field.default
        if not isinstance(default, str) or not default.startswith(TYPE_PREFIX):
            # Generic parametrisations (CloudEvent[SomeData]) pass through here too.
            return
        if default in EVENT_TYPES and EVENT_TYPES[default] is not cls:
            raise TypeError(f"event type {default} is defined twice")
        cls.event_type = default
        cls.nats_subject = subject_for_type(default)
        EVENT_TYPES[default] = cls

    def caused(self) -> dict[str, str | None]:
        """Envelope fields for an event this one causes: same pipeline, causation = this id."""
        return {"pipelineid": self.pipelineid, "causationid": self.id}

    def to_json(self) -> bytes:
        """Structured-mode JSON; absent optional attributes are omitted, not null."""
        return self.model_dump_json(exclude_none=True).encode()


AnyEvent = CloudEvent[Any]
EVENT_TYPES: dict[str, type[AnyEvent]] = {}


class InvalidEvent(PermanentError):
    """A payload that is not a valid torchrelay event. Never retried."""


_ADAPTER: TypeAdapter[Any] | None = None
_ADAPTER_SIZE = 0


def _adapter() -> TypeAdapter[Any]:
    """One discriminated union over every registered type: JSON is parsed and validated in a
    single pass in pydantic-core (rebuilt if a type registers later)."""
    global _ADAPTER, _ADAPTER_SIZE  # noqa: PLW0603 - a cache of the registry
    if _ADAPTER is None or len(EVENT_TYPES) != _ADAPTER_SIZE:
        members = tuple(EVENT_TYPES.values())
        union = members[0] if len(members) == 1 else Union[members]  # noqa: UP007
        _ADAPTER = TypeAdapter(Annotated[union, Field(discriminator="type")])  # type: ignore[arg-type]
        _ADAPTER_SIZE = len(EVENT_TYPES)
    return _ADAPTER


def decode(payload: bytes, *, subject: str | None = None) -> AnyEvent:
    """Parse a structured-mode CloudEvent into its registered class, accepting exactly what
    the type's exported JSON Schema accepts.

    Raises :class:`InvalidEvent` with a reason a human can act on: not JSON, not an object,
    an unknown type, a type that does not belong on ``subject``, or the fields that failed.
    """
    if b"NaN" in payload or b"Infinity" in payload:
        # RFC 8259 has no NaN or Infinity, but the validator below takes them: parse strictly
        # (only then: a second parse of every event would cost the hot path).
        try:
            pydantic_core.from_json(payload, allow_inf_nan=False)
        except ValueError as exc:
            raise InvalidEvent(f"payload is not JSON (RFC 8259): {exc}") from exc
    try:
        # Strict: no coercion the schema does not allow (a number for a time, "1" for 1).
        event: AnyEvent = _adapter().validate_json(payload, strict=True)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc, _attribute_problems(_loaded(payload)))) from exc
    problems = _attribute_problems(event)
    if problems:
        raise InvalidEvent(f"{event.type} failed validation: {'; '.join(problems)}")
    if subject is not None and subject != event.nats_subject:
        raise InvalidEvent(
            f"event type {event.type} belongs on {event.nats_subject}, not on {subject}"
        )
    return event


def _loaded(payload: bytes) -> Any:
    try:
        return pydantic_core.from_json(payload)
    except ValueError:
        return None


def _attribute_problems(wire: AnyEvent | Any) -> list[str]:
    """What the models' defaults would hide: no defaults for REQUIRED attributes on the way
    in (a made-up id would defeat deduplication), and no ``null`` attributes. ``wire`` is the
    decoded event (which knows the attributes it was given) or, when validation failed, the
    parsed JSON. A missing or unknown ``type`` is left to the validator, which says so."""
    if isinstance(wire, CloudEvent):
        given: Collection[str] = wire.model_fields_set
        nulls = [
            name for name in OPTIONAL_ATTRIBUTES if name in given and getattr(wire, name) is None
        ]
    elif (
        isinstance(wire, dict) and isinstance(wire.get("type"), str) and wire["type"] in EVENT_TYPES
    ):
        given = wire.keys()
        nulls = [name for name in OPTIONAL_ATTRIBUTES if name in wire and wire[name] is None]
    else:
        return []
    return [
        *(
            f"{name}: a CloudEvents REQUIRED attribute is missing"
            for name in REQUIRED_ATTRIBUTES
            if name not in given
        ),
        *(f"{name}: null is not allowed, leave an absent attribute out" for name in nulls),
    ]


def _describe(exc: ValidationError, attribute_problems: list[str]) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    kind = first["type"]
    if kind == "json_invalid":
        return f"payload is not JSON: {first['msg']}"
    if not first["loc"] and kind in {"dict_type", "model_type", "model_attributes_type"}:
        return "payload must be a JSON object"
    if kind == "union_tag_not_found":
        return "payload has no string 'type' attribute"
    if kind == "union_tag_invalid":
        given = first.get("ctx", {}).get("tag")
        return f"unknown event type {given!r}"
    event_type = str(first["loc"][0]) if first["loc"] else "event"
    problems = "; ".join(
        [
            *attribute_problems,
            *(
                f"{'.'.join(str(p) for p in err['loc'][1:]) or 'event'}: {err['msg']}"
                for err in errors
            ),
        ]
    )
    return f"{event_type} failed validation: {problems}"
